"""Knowledge distillation: train a student to reproduce a frozen teacher's next-token distribution.

The `distill` stage of a recipe (options: `DistillStage` below, losses:
`compressor.algorithms.distill_losses`). Typical use is to recover what pruning or layer removal
lost (Minitron: prune, then distill from the unpruned model with forward KL on the logits).

The training loop, `distill_`, in brief:
- Models: the teacher is frozen (eval mode, no gradients) and only runs forward. Every student
  parameter is trained (embeddings and norms included). A half-precision student is trained in
  float32 (AdamW's updates are far below fp16's resolution) and cast back at the end.
- Data: the micro-batch of (step, micro) is `batch_size` windows of `seq_len` tokens of the
  training stream, at offsets drawn uniformly by a `torch.Generator` seeded with a hash of
  (seed, step, micro) (`training_batch`). It is a pure function of those numbers, so no data
  loader state is needed to resume: step s after a resume sees what it would have seen anyway.
- Optimizer: AdamW with weight decay on matrices only (norm weights and biases are not decayed,
  the usual practice: decaying a norm's gain towards 0 only harms). Learning rate: linear warm-up
  over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step (`lr_factor`).
  Gradients are clipped to `max_grad_norm` (the norm before clipping is recorded).
- Accumulation: `grad_accum` micro-batches per optimizer step through `Accelerator.accumulate`
  (`accelerator.backward` divides each micro-batch's loss by grad_accum, so the gradient is the
  mean over the step's micro-batches, as with one batch of grad_accum * batch_size sequences).
- Evaluation: perplexity by the spine's protocol (`compressor.evaluation.perplexity`) on the
  first `eval_windows` windows of the evaluation stream at step 0 and every `eval_every` steps,
  and on all windows at the end (after the student is cast back to its dtype).
- Checkpoints: every `checkpoint_every` steps and after the last step, one file
  `<checkpoint_dir>/checkpoint.pt` (student, optimizer, scheduler, step, histories, RNG states),
  written to a temporary file in the same directory and renamed over the previous one, so a kill
  at any moment leaves either the old or the new checkpoint, whole. A checkpoint records the
  options that shape the trajectory and a hash of the training data; resuming with others is an
  error. Resuming gives the same parameters, bit for bit on CPU, as a run that was never stopped.

Several GPUs: the loop runs through `accelerate.Accelerator` (`prepare` wraps the student in
DDP, `accumulate` skips the gradient all-reduce on all but the last micro-batch of a step), so
launching the same program with `accelerate launch --multi_gpu --num_processes N -m compressor.cli
run recipe.yaml` trains data-parallel with no other change here. Each process draws
N * batch_size windows per micro-batch from the same seeded generator and takes its own slice, so
one optimizer step sees N * batch_size * grad_accum sequences and a run is deterministic for a
given N (N is part of the checkpoint's fingerprint). Every process evaluates (the same numbers
everywhere); only the main process writes checkpoints, and every process resumes from the same
file (a shared file system is assumed). Everything else in `compress run` also runs once per
process, so only the main process should write the artifact. On CUDA the forward passes run
under bf16 autocast (`mixed_precision="bf16"`) with float32 master weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from compressor.algorithms.distill_losses import combined_loss
from compressor.architectures import architecture_of
from compressor.errors import UserError
from compressor.evaluation.perplexity import perplexity
from compressor.options import Options
from compressor.structured import keep_decoder_layers_, parameter_count

log = logging.getLogger(__name__)


# The options of a recipe's `distill` stage (registered by compressor.stages.distill).
class DistillStage(Options):
    teacher: str = Field(
        "input",
        description="`input` (the model as it entered the pipeline, before any stage) or any model source.",
    )
    student: str = Field(
        "current",
        description="`current` (the model as the previous stages left it), or any model source "
        "(a smaller model), or `keep_layers` (the teacher with only `keep_layers` kept).",
    )
    keep_layers: list[int] | None = Field(None, description="With student: keep_layers, the teacher layers to keep.")
    loss: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl", description="Logit distillation loss (Minitron: forward KL on logits works best)."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models; the KL is scaled by T^2.")
    lm_weight: float = Field(
        0.0, ge=0, le=1, description="Mix with the ordinary next-token loss: (1-w) * KD + w * LM (1 = plain fine-tuning)."
    )
    hidden_loss: Literal["none", "mse", "cosine"] = Field("none", description="Optional hidden-state loss.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state loss.")
    layer_map: dict[int, int] = Field(
        default_factory=dict, description="Hidden-state loss pairs: student layer -> teacher layer (outputs of those blocks)."
    )
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, ge=0, description="Seed for data order and anything random.")
    eval_every: int = Field(50, ge=0, description="Perplexity on the evaluation data every N steps (0: only at the end).")
    eval_windows: int | None = Field(2, ge=1, description="Windows used by the periodic evaluations (None: all).")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: never); `compress run --resume` continues.")
    checkpoint_dir: str | None = Field(None, description="Where checkpoints go (default: `<output>.distill-ckpt`).")

    @model_validator(mode="after")
    def _consistent(self) -> "DistillStage":
        if self.student == "keep_layers" and not self.keep_layers:
            raise ValueError("student: keep_layers needs a non-empty `keep_layers` list")
        if self.keep_layers and self.student != "keep_layers":
            raise ValueError("`keep_layers` needs student: keep_layers")
        if self.hidden_loss != "none" and (not self.layer_map or self.hidden_weight <= 0):
            raise ValueError("a hidden_loss needs a `layer_map` and a positive `hidden_weight`")
        return self

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# The options that shape the training trajectory. A checkpoint written under other values cannot
# be continued; evaluation and checkpoint cadence may change between a run and its resume.
TRAJECTORY_OPTIONS = (
    "teacher", "student", "keep_layers", "loss", "temperature", "lm_weight", "hidden_loss", "hidden_weight",
    "layer_map", "steps", "batch_size", "grad_accum", "seq_len", "lr", "weight_decay", "warmup_steps",
    "min_lr_ratio", "max_grad_norm", "seed",
)  # fmt: skip


# ----------------------------------------------------------------------------- pure functions
def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based) of `steps`.

    Warm-up: (step + 1) / (warmup_steps + 1), so the first step already learns and step
    `warmup_steps` is the first at the peak. Then cosine from 1 at step `warmup_steps` down to
    `min_lr_ratio` at the last step, steps - 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / span) if span > 0 else 0.0
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit generator seed that depends only on (seed, step, micro).

    sha256 rather than Python's hash(): stable across processes, versions and PYTHONHASHSEED,
    and neighbouring (step, micro) pairs give unrelated streams."""
    digest = hashlib.sha256(f"compressor.distill:{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def training_batch(
    train_ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    micro: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The [batch_size, seq_len] windows of micro-batch (step, micro) for process `rank`.

    world_size * batch_size offsets are drawn uniformly from [0, T - seq_len]; process `rank`
    takes the rank-th slice of them, so with one process this is the whole draw."""
    g = torch.Generator().manual_seed(batch_seed(seed, step, micro))
    offsets = torch.randint(0, train_ids.numel() - seq_len + 1, (batch_size * world_size,), generator=g)
    offsets = offsets[rank * batch_size : (rank + 1) * batch_size]
    return train_ids[offsets[:, None] + torch.arange(seq_len)]


# ----------------------------------------------------------------------------- student
def student_from_teacher_layers(
    teacher: nn.Module, keep_layers: list[int], key: str = "stages[i].distill"
) -> nn.Module:
    """A deep copy of `teacher` keeping only the decoder layers `keep_layers` (increasing indices).

    The result is an ordinary model of the same class: `num_hidden_layers` and the per-layer config
    lists (`layer_types`, ...) are rewritten and each attention's `layer_idx` (the KV cache slot)
    renumbered 0..n-1, so generation with a cache and save/load with plain transformers work.
    The dropped layers are never copied (a deepcopy memo maps them to None), so the copy costs
    only the memory of what is kept. The teacher is not modified.
    """
    arch = architecture_of(teacher)
    blocks = arch.block_list(teacher)
    total = len(blocks)
    keep = [int(i) for i in keep_layers]
    missing = [i for i in keep if not 0 <= i < total]
    if not keep or missing:
        raise UserError(
            f"{key}.keep_layers: {keep_layers}: "
            + (f"layer(s) {missing} do not exist; " if missing else "keep at least one layer; ")
            + f"the teacher has {total} layers (0..{total - 1})"
        )
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise UserError(f"{key}.keep_layers: {keep_layers}: list each layer once, in increasing order")

    memo: dict[int, Any] = {id(blocks[i]): None for i in range(total) if i not in keep}
    student = copy.deepcopy(teacher, memo)
    keep_decoder_layers_(student, keep, f"{key}.keep_layers", f"the teacher with only layers {keep}")
    return student


# ----------------------------------------------------------------------------- training
def distill_(
    student: nn.Module,
    teacher: nn.Module,
    options: DistillStage,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor | None,
    eval_seq_len: int,
    checkpoint_dir: Path | str | None,
    resume: bool = False,
    key: str = "stages[i].distill",
    progress: bool = True,
    eval_batch_size: int = 1,
    final_max_windows: int | None = None,
) -> dict:
    """Train `student` in place to match `teacher` on `train_ids`; returns the report.

    `train_ids` ([T] int64) is the training token stream (the recipe's calibration data, never the
    evaluation data); `eval_ids` ([T] int64 or None) the evaluation stream. `checkpoint_dir`
    None disables checkpoints. `resume`: continue from the checkpoint in `checkpoint_dir` if one
    is there (logged either way). `eval_batch_size`: windows per forward in evaluations;
    `final_max_windows`: cap on the final evaluation's windows (None: all, the default). The
    student and teacher end on the device, in the dtype and mode, with the `requires_grad` flags
    they came with.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    wall_start = time.perf_counter()
    train_ids = train_ids.reshape(-1).long().cpu()
    _check_inputs(student, teacher, options, train_ids, key)

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if cuda else "no",
        gradient_accumulation_steps=options.grad_accum,
        # The schedule counts optimizer steps; accelerate would otherwise step it num_processes times.
        step_scheduler_with_optimizer=False,
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    main = accelerator.is_main_process
    set_seed(options.seed)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    fingerprint = _fingerprint(options, train_ids, student, world)
    state = _resume_state(ckpt_path, resume, fingerprint, key)

    student_saved, teacher_saved = _ModelState(student), _ModelState(teacher)
    model, hooks, bar = student, [], None
    try:
        teacher.eval()
        teacher.requires_grad_(False)
        teacher.to(device)
        if student_saved.dtype in (torch.float16, torch.bfloat16):
            student.float()
        student.requires_grad_(True)
        student.train()

        decay = [p for p in student.parameters() if p.dim() >= 2]
        no_decay = [p for p in student.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=options.lr,
        )

        def schedule(step: int) -> float:
            return lr_factor(step, options.steps, options.warmup_steps, options.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
        history: dict[str, Any] = {"loss": [], "kd": [], "lm": [], "hidden": [], "lr": [], "grad_norm": [], "eval": []}
        start = 0
        if state is not None:
            accelerator.unwrap_model(model).load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history, start = state["history"], state["step"]
            _set_rng_state(state["rng"])

        hooks, captured = _hidden_hooks(student, teacher, options)
        needs_teacher = options.lm_weight < 1 or options.hidden_loss != "none"
        tokens_per_step = options.batch_size * options.grad_accum * options.seq_len * world
        train_seconds = 0.0

        def evaluate(step: int) -> None:
            if eval_ids is None:
                return
            model.eval()
            ppl = perplexity(accelerator.unwrap_model(model), eval_ids, eval_seq_len, eval_batch_size,
                             options.eval_windows, False, f"{key} eval")  # fmt: skip
            model.train()
            history["eval"].append([step, ppl.perplexity])
            log.info("%s: step %d perplexity %.4f (%d windows)", key, step, ppl.perplexity, ppl.windows)

        if start == 0 and options.eval_every:
            evaluate(0)
        bar = tqdm(total=options.steps, initial=start, desc=f"{key}", unit="step", disable=not (progress and main))
        for step in range(start, options.steps):
            t0 = time.perf_counter()
            lr_now = scheduler.get_last_lr()[0]
            sums: dict[str, torch.Tensor] = {}
            grad_norm = None
            for micro in range(options.grad_accum):
                ids = training_batch(train_ids, options.seq_len, options.batch_size, options.seed, step, micro,
                                     rank, world).to(device)  # fmt: skip
                with accelerator.accumulate(model):
                    teacher_logits = None
                    if needs_teacher:
                        with torch.no_grad(), accelerator.autocast():
                            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    student_logits = model(input_ids=ids, use_cache=False).logits
                    pairs = [(captured["student"][s], captured["teacher"][t]) for s, t in options.layer_map.items()]
                    pairs = pairs if options.hidden_loss != "none" else []
                    total, parts = combined_loss(
                        student_logits, teacher_logits, ids, loss=options.loss, temperature=options.temperature,
                        lm_weight=options.lm_weight, hidden_loss=options.hidden_loss,
                        hidden_weight=options.hidden_weight, hidden_pairs=pairs,
                    )  # fmt: skip
                    captured["student"].clear()
                    captured["teacher"].clear()
                    accelerator.backward(total)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
                    optimizer.step()  # the prepared optimizer steps only on the last micro-batch
                    optimizer.zero_grad(set_to_none=True)
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0) + value / options.grad_accum
            if grad_norm is None:  # accelerate's accumulation counter is out of step with ours
                raise RuntimeError(f"{key}: step {step} ended without an optimizer step")
            scheduler.step()
            means = _reduce_mean(accelerator, sums)
            history["loss"].append(means["total"])
            for name in ("kd", "lm", "hidden"):
                if name in means:
                    history[name].append(means[name])
            history["lr"].append(lr_now)
            history["grad_norm"].append(float(grad_norm))
            train_seconds += time.perf_counter() - t0
            done = step + 1
            bar.set_postfix(loss=f"{means['total']:.4f}", lr=f"{lr_now:.2e}",
                            tok_s=f"{(done - start) * tokens_per_step / max(train_seconds, 1e-9):.0f}")  # fmt: skip
            bar.update(1)
            if options.eval_every and done % options.eval_every == 0:
                evaluate(done)
            due = options.checkpoint_every and (done % options.checkpoint_every == 0 or done == options.steps)
            if ckpt_path is not None and due:
                if main:
                    _save_checkpoint(ckpt_path, {
                        "format": CHECKPOINT_FORMAT, "step": done, "fingerprint": fingerprint,
                        "student": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history, "rng": _rng_state(),
                    })  # fmt: skip
                accelerator.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
        for hook in hooks:
            hook.remove()
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the autocast forward wrapper
        accelerator.free_memory()
        student_saved.restore(student)
        teacher_saved.restore(teacher)

    final = None
    if eval_ids is not None:
        student.eval()
        final = perplexity(student, eval_ids, eval_seq_len, eval_batch_size, final_max_windows, progress and main,
                           f"{key} final eval")  # fmt: skip
        student_saved.restore(student)
        log.info("%s: final perplexity %.4f over %d windows", key, final.perplexity, final.windows)

    trained_tokens = (options.steps - start) * tokens_per_step
    return {
        "steps": options.steps,
        "resumed_from": start if state is not None else None,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": options.steps * tokens_per_step,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": train_seconds,
        "tokens_per_second": trained_tokens / train_seconds if train_seconds > 0 else None,
        "loss": options.loss,
        "loss_history": history["loss"],
        "loss_parts": {name: history[name] for name in ("kd", "lm", "hidden") if history[name]},  # unweighted
        "loss_weights": {"kd": 1 - options.lm_weight, "lm": options.lm_weight,
                         "hidden": options.hidden_weight if options.hidden_loss != "none" else 0.0},  # fmt: skip
        "lr_history": history["lr"],
        "grad_norm_history": history["grad_norm"],
        "eval_history": history["eval"],
        "eval_windows": options.eval_windows,
        "eval_seq_len": eval_seq_len,
        "final_perplexity": final.perplexity if final is not None else None,
        "final_eval": final.to_dict() if final is not None else None,  # windows, tokens, mean NLL
        "teacher_parameters": parameter_count(teacher),
        "student_parameters": parameter_count(student),
        "device": str(device),
        "num_processes": world,
        "mixed_precision": "bf16" if cuda else "no",
        "checkpoint": str(ckpt_path) if ckpt_path is not None and options.checkpoint_every else None,
    }


# ----------------------------------------------------------------------------- plot
def plot_distill_curves(report: dict, path: Path | str) -> Path:
    """PNG: training loss per step (left) and evaluation perplexity per evaluation (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    losses = report.get("loss_history") or []
    ax_loss.plot(range(1, len(losses) + 1), losses, label="total")
    # The weighted contributions, when the total mixes several (an unweighted part, such as the LM
    # loss recorded at weight 0, would only squash the scale).
    weights = report.get("loss_weights") or {}
    parts = {n: v for n, v in (report.get("loss_parts") or {}).items()
             if weights.get(n, 0) > 0 and len(v) == len(losses)}  # fmt: skip
    if len(parts) > 1:
        for name, values in parts.items():
            ax_loss.plot(range(1, len(values) + 1), [weights[name] * v for v in values],
                         label=f"{weights[name]:g} x {name}", alpha=0.7, linewidth=0.8)  # fmt: skip
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title=f"training loss ({report.get('loss', 'kd')})")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    evals = report.get("eval_history") or []
    if evals:
        steps, ppls = zip(*evals)
        windows = report.get("eval_windows")
        ax_ppl.plot(steps, ppls, marker="o", label=f"first {windows} windows" if windows else "all windows")
    final = report.get("final_perplexity")
    if final is not None:
        windows = (report.get("final_eval") or {}).get("windows")
        ax_ppl.scatter([report.get("steps", len(losses))], [final], color="red", zorder=3,
                       label=f"final, {f'{windows} windows' if windows else 'all windows'}: {final:.3f}")  # fmt: skip
    ax_ppl.set(xlabel="optimizer step", ylabel="perplexity", title="evaluation perplexity")
    ax_ppl.grid(alpha=0.3)
    if evals or final is not None:
        ax_ppl.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- helpers
def _vocab_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


def _check_inputs(student, teacher, options: DistillStage, train_ids: torch.Tensor, key: str) -> None:
    if student is teacher:
        raise UserError(f"{key}: the student and the teacher are the same model object")
    n_s, n_t = parameter_count(student), parameter_count(teacher)
    if n_s > n_t:
        raise UserError(
            f"{key}: the student has {n_s:,} parameters, more than the teacher's {n_t:,}; "
            "the pair looks swapped"
        )
    v_s, v_t = _vocab_rows(student), _vocab_rows(teacher)
    if v_s != v_t:
        raise UserError(
            f"{key}: teacher and student have different vocabularies (teacher {v_t} tokens, student {v_s}); "
            "distillation on logits needs the same tokenizer"
        )
    blocks_s = architecture_of(student).block_list(student)
    blocks_t = architecture_of(teacher).block_list(teacher)
    for s, t in options.layer_map.items():
        for who, index, blocks in (("student", s, blocks_s), ("teacher", t, blocks_t)):
            if not 0 <= index < len(blocks):
                raise UserError(
                    f"{key}.layer_map: {who} layer {index} (in {s}: {t}) does not exist; "
                    f"the {who} has {len(blocks)} layers (0..{len(blocks) - 1})"
                )
        if options.hidden_loss != "none" and student.config.hidden_size != teacher.config.hidden_size:
            raise UserError(
                f"{key}.hidden_loss: the student's hidden width {student.config.hidden_size} differs from the "
                f"teacher's {teacher.config.hidden_size}; a hidden-state loss needs equal widths"
            )
    need = options.seq_len + 1
    if train_ids.numel() < need:
        raise UserError(
            f"{key}.seq_len: training windows of {options.seq_len} tokens need at least {need} tokens of "
            f"calibration data, but it has {train_ids.numel()}; lower seq_len or add data (data.calibration.samples)"
        )
    if train_ids.numel() and (int(train_ids.min()) < 0 or int(train_ids.max()) >= v_s):
        raise UserError(f"{key}: the training data holds token ids outside the vocabulary of {v_s} tokens")
    for who, model in (("student", student), ("teacher", teacher)):
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and options.seq_len > max_pos:
            raise UserError(f"{key}.seq_len: {options.seq_len} exceeds the {who}'s context length {max_pos}")


class _ModelState:
    """Device, dtype, mode and requires_grad flags of a model, to put back after training."""

    def __init__(self, model: nn.Module):
        first = next(model.parameters())
        self.device, self.dtype, self.training = first.device, first.dtype, model.training
        self.flags = [p.requires_grad for p in model.parameters()]

    def restore(self, model: nn.Module) -> None:
        model.to(device=self.device, dtype=self.dtype)
        model.train(self.training)
        for p, flag in zip(model.parameters(), self.flags):
            p.requires_grad_(flag)
            p.grad = None


def _hidden_hooks(student, teacher, options: DistillStage):
    """Forward hooks that keep the outputs of the blocks named in layer_map (only if used)."""
    captured: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
    if options.hidden_loss == "none":
        return [], captured

    def keep(store: dict, index: int):
        def hook(module, args, output):
            store[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    hooks = []
    blocks_s = architecture_of(student).block_list(student)
    blocks_t = architecture_of(teacher).block_list(teacher)
    for s, t in options.layer_map.items():
        hooks.append(blocks_s[s].register_forward_hook(keep(captured["student"], s)))
        hooks.append(blocks_t[t].register_forward_hook(keep(captured["teacher"], t)))
    return hooks, captured


def _reduce_mean(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[n], dtype=torch.float32).reshape(()) for n in names])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean")
    return dict(zip(names, values.cpu().tolist()))


def _fingerprint(options: DistillStage, train_ids: torch.Tensor, student: nn.Module, world: int) -> dict:
    dumped = options.model_dump(mode="json")
    shapes = json.dumps([[n, list(p.shape)] for n, p in student.state_dict().items()])
    return {
        **{name: dumped[name] for name in TRAJECTORY_OPTIONS},
        "train_tokens": train_ids.numel(),
        "train_sha256": hashlib.sha256(train_ids.numpy().tobytes()).hexdigest(),
        "student_shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
        "num_processes": world,
    }


def _resume_state(path: Path | None, resume: bool, fingerprint: dict, key: str) -> dict | None:
    if path is None:
        if resume:
            log.info("%s: resume requested but checkpoints are off; starting from step 0", key)
        return None
    if not path.is_file():
        if resume:
            log.info("%s: no checkpoint in %s; starting from step 0", key, path.parent)
        return None
    if not resume:
        log.warning("%s: %s holds a checkpoint; starting from step 0 and replacing it (pass --resume to continue)",
                    key, path)  # fmt: skip
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UserError(
            f"{key}: cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{key}: {path} is not a distill checkpoint of this version; delete it to start over")
    saved = state["fingerprint"]
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        raise UserError(
            f"{key}: the checkpoint {path} was written with other {', '.join(differ)}; "
            "run without --resume (or delete it) to start over"
        )
    log.info("%s: resuming from the checkpoint of step %d in %s", key, state["step"], path)
    return state


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a temporary file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a kill during a write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
