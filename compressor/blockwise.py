"""`compress run` for models larger than memory: one pass over the decoder blocks, each read from
the safetensors files, compressed, written and freed before the next.

The pass (`compute.load: blockwise`, or `auto` when the model would not fit):

1. The architecture is built on the meta device (compressor/lazy.py); the embeddings are read.
   The first block's inputs are captured for the calibration samples and for the evaluation
   windows (once as loaded, for the dense perplexity, once with the embeddings rounded to float16
   as the artifact stores them, for the compressed one); the embeddings go to the artifact and
   are freed.
2. For each block: read it (upcast to the compute dtype); run the dense evaluation stream through
   it; let the layer-wise engine compress it on the calibration activations (the same
   `run_layerwise`, with a visitor); round its other tensors to float16 as the artifact stores
   them; run the compressed evaluation stream through it; write its tensors to the artifact's
   shards (compressor/export/shards.py); free it.
3. The final norm and lm_head score both evaluation streams and are written last.

Peak memory is one block in the compute dtype + its Hessians and GPTQ working copies + the
calibration and evaluation activations, whatever the model's size. The artifact, the
perplexities and the report are those of the whole-model path (tests/test_blockwise.py checks the
bytes on a small model): the same operations run on the same values in the same order.

One layer-wise pass per run: a quantize stage, or a prune stage (unstructured or N:M), or a
prune stage with `joint_quantize`. Stages that need the whole model at once (distill,
structured pruning) or a second pass, and ONNX export, need `compute.load: whole`.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.architectures import architecture_of
from compressor.data import calibration_batch, evaluation_tokens
from compressor.engine import EngineOptions, capture_block_inputs, run_layerwise
from compressor.errors import RecipeError, UserError
from compressor.evaluation.perplexity import BlockwisePerplexity, evaluation_windows
from compressor.lazy import LazyModel, move_buffers, parameter_count
from compressor.models import ResolvedSource
from compressor.monitor import measure
from compressor.recipe import Recipe
from compressor.report import StageReport

log = logging.getLogger(__name__)


def blockwise_reason(recipe: Recipe) -> str | None:
    """Why this recipe cannot run block by block (None when it can)."""
    stages = recipe.stage_list()
    kinds = [kind for kind, _ in stages]
    if recipe.export.format in ("onnx", "gguf", "compressed-tensors"):
        return f"export.format {recipe.export.format} converts the whole checkpoint at the end (blockwise writes gptq or dense)"
    for kind, options in stages:
        if kind == "distill":
            return "a distill stage trains the whole model"
        if kind == "prune" and options.method == "structured":
            return "structured pruning scores the whole model"
    one_pass = kinds == ["quantize"] or kinds == ["prune"] or (kinds == ["prune", "quantize"] and stages[0][1].joint_quantize)
    if not one_pass:
        return f"stages {kinds} take more than one pass over the blocks (one quantize or prune stage, or prune with joint_quantize)"
    return None


def model_directory(source: ResolvedSource, revision: str | None) -> Path:
    """The local directory holding `source`'s safetensors (a Hub id is downloaded into the Hub cache)."""
    if source.kind == "local":
        return Path(source.path)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as exc:  # noqa: BLE001 - any download failure is the user's to fix
            raise UserError(f"model.source: {source.label!r} could not be downloaded: {str(exc).splitlines()[0][:300]}") from None
    raise UserError(f"model.source: {source.label!r} is a GGUF file, which transformers dequantizes whole; "
                    "blockwise loading needs a safetensors model directory or Hub id (or compute.load: whole)")  # fmt: skip


def choose_blockwise(recipe: Recipe, recipe_file: str, source: ResolvedSource, config, dtype: torch.dtype) -> bool:
    """Whether `compress run` goes block by block (compute.load, and for auto the memory it would need)."""
    mode = recipe.compute.load
    if mode == "whole":
        return False
    reason = blockwise_reason(recipe) or (None if source.kind in ("local", "hub") else "the source is a GGUF file (loaded whole)")
    if mode == "blockwise":
        if reason:
            raise RecipeError(recipe_file, "compute.load", "blockwise", reason)
        return True
    need = whole_model_bytes(config, dtype)
    available = available_memory_bytes()
    if need <= available / 2:
        return False
    if reason:
        log.warning("the model needs ~%.1f GB in %s and %.1f GB are available, but it cannot run block by block: %s",
                    need / 1e9, str(dtype).replace("torch.", ""), available / 1e9, reason)  # fmt: skip
        return False
    log.info("compute.load auto: the model needs ~%.1f GB in %s, %.1f GB are available: going block by block",
             need / 1e9, str(dtype).replace("torch.", ""), available / 1e9)  # fmt: skip
    return True


def whole_model_bytes(config, dtype: torch.dtype) -> int:
    return parameter_count(config) * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def check_whole_model_fits(recipe: Recipe, config, dtype: torch.dtype) -> None:
    """One-line error, before loading, when the model (and a distill teacher copy) cannot fit in memory."""
    from compressor.stages import stage_kind

    copies = 2 if any(stage_kind(kind).needs_input_model(o) for kind, o in recipe.stage_list()) else 1
    need = copies * whole_model_bytes(config, dtype)
    available = available_memory_bytes()
    if need > available:
        why = blockwise_reason(recipe)
        hint = f"compute.load: blockwise cannot help here ({why})" if why else "set compute.load: blockwise"
        raise UserError(
            f"model.source: {recipe.model.source!r} needs ~{need / 1e9:.1f} GB to load whole in "
            f"{str(dtype).replace('torch.', '')}{' (model + distill teacher)' if copies > 1 else ''}, "
            f"but {available / 1e9:.1f} GB are available; {hint}"
        )


class _BlockWriter:
    """The engine's visitor: loads each block, runs the evaluation streams, writes and frees it."""

    def __init__(self, lazy: LazyModel, arch, writer, algorithm, dense, compressed, sizes: dict, checkpoint_format: str = "gptq"):
        self.lazy, self.arch, self.writer, self.algorithm = lazy, arch, writer, algorithm
        self.checkpoint_format = checkpoint_format  # gptq (v1) or gptq_v2: how qzeros are stored
        self.dense, self.compressed = dense, compressed
        self.sizes = sizes  # {"ideal": bytes}: the artifact's ideal size, summed as blocks are written
        self.block_seconds: list[float] = []
        self._started = 0.0

    def before_block(self, index: int, block: nn.Module) -> None:
        self._started = time.perf_counter()
        self.lazy.load(f"{self.arch.blocks}.{index}")
        if self.dense is not None:
            self.dense.advance(block)

    def after_block(self, index: int, block: nn.Module) -> None:
        from compressor.export.gptq import stored_tensors

        prefix = f"{self.arch.blocks}.{index}"
        quantized = {name: qw for name, qw in getattr(self.algorithm, "quantized", {}).items() if name.startswith(prefix + ".")}
        keep = {id(self.lazy.model.get_submodule(name).weight) for name in quantized}
        round_to_fp16_(block, keep)
        if self.compressed is not None:
            self.compressed.advance(block)
        state = {f"{prefix}.{name}": t for name, t in block.state_dict().items()}
        for name, tensor in stored_tensors(state, quantized, self.checkpoint_format).items():
            self.writer.add(name, tensor)
        self.sizes["ideal"] += ideal_bytes(state, quantized)
        for name in quantized:  # packed and written: nothing of the block stays in memory
            del self.algorithm.quantized[name]
        self.lazy.release(prefix)
        self.block_seconds.append(time.perf_counter() - self._started)


def round_to_fp16_(module: nn.Module, keep: set[int]) -> None:
    """The artifact stores unquantized float tensors in float16; make memory match. `keep`: ids of
    the parameters left alone (quantized weights: exact in float32, not always in float16)."""
    for p in module.parameters():
        if p.is_floating_point() and id(p) not in keep:
            p.data = p.data.half().to(p.dtype)


def ideal_bytes(state: dict[str, torch.Tensor], quantized: dict) -> int:
    """export.gptq.expected_size_bytes for part of a model."""
    from compressor.export.gptq import quantized_bytes

    plain = {n: t for n, t in state.items() if n.removesuffix(".weight") not in quantized}
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in plain.values()) + sum(
        quantized_bytes(qw) for qw in quantized.values()
    )


def run_blockwise(recipe: Recipe, recipe_file: str, source: ResolvedSource, config, device: torch.device, dtype: torch.dtype,
                  tmp: Path, progress: bool, timings: dict) -> dict[str, Any]:  # fmt: skip
    """Compress `recipe`'s model block by block into the (empty, temporary) artifact directory
    `tmp`; returns the report's sections (model, perplexity, stages, quantization config, size)."""
    from compressor.export.gptq import gptq_quantization_config, stored_tensors, write_checkpoint_files
    from compressor.export.shards import ShardWriter
    from compressor.models import load_tokenizer
    from compressor.prune import PruneLayerwise, sparsity_config, sparsity_summary
    from compressor.quantize import GPTQLayerwise
    from compressor.recipe import parse_size

    with measure() as m:
        directory = model_directory(source, recipe.model.revision)
        tokenizer = load_tokenizer(source, recipe.model.revision, recipe.model.trust_remote_code)
        lazy = LazyModel.open(directory, dtype, device, config, recipe.model.trust_remote_code)
        model, arch = lazy.model, architecture_of(lazy.model)
        move_buffers(model, device)  # the rotary tables; parameters stay meta until loaded
    timings["open model"] = m.to_dict()
    parameters = parameter_count(model.config)
    log.info("opened %s block by block (%s, %.1fM parameters, %d blocks)", source.label, model.config.model_type,
             parameters / 1e6, len(arch.block_list(model)))  # fmt: skip

    calib, ev = recipe.data.calibration, recipe.data.evaluation
    with measure() as m:
        calibration_ids = calibration_batch(tokenizer, calib)
        windows = evaluation_windows(model, evaluation_tokens(tokenizer, ev), ev.seq_len, ev.max_windows) if recipe.evaluate.perplexity else None
    timings["prepare data"] = m.to_dict()

    stages = recipe.stage_list()
    kind, options = stages[0]
    joint = stages[1][1] if len(stages) > 1 else None
    algorithm = GPTQLayerwise(options) if kind == "quantize" else PruneLayerwise(options, joint)
    engine = EngineOptions(
        device=device, batch_size=recipe.compute.calibration_batch_size, max_activation_gb=recipe.compute.max_activation_gb,
        progress=progress, desc=f"stage 0 {kind} ({options.method}, blockwise)",
        true_sequential=options.true_sequential if kind == "quantize" else True, skip=tuple(options.skip),
    )  # fmt: skip

    sizes = {"ideal": 0}
    embeddings = model.get_submodule(arch.embeddings)
    with measure() as m:
        lazy.load(arch.embeddings)
        dense = None
        if windows is not None and recipe.evaluate.dense:
            dense = BlockwisePerplexity(windows, capture_block_inputs(model, arch, windows, ev.batch_size, device))
    timings["capture dense evaluation inputs"] = m.to_dict()

    shard_size = parse_size(recipe.export.max_shard_size)
    writer = ShardWriter(tmp, shard_size)
    visitor = _BlockWriter(lazy, arch, writer, algorithm, dense, None, sizes, recipe.export.checkpoint_format)
    first_block = visitor.before_block

    def before_first_block(index: int, block: nn.Module) -> None:
        # The calibration inputs are captured (run_layerwise did it with the embeddings as loaded):
        # now the compressed evaluation stream starts from the float16 embeddings, which are written and freed.
        if index == 0:
            round_to_fp16_(embeddings, set())
            if windows is not None:
                visitor.compressed = BlockwisePerplexity(windows, capture_block_inputs(model, arch, windows, ev.batch_size, device))
            state = {f"{arch.embeddings}.{n}": t for n, t in embeddings.state_dict().items()}
            for name, tensor in stored_tensors(state, {}).items():
                writer.add(name, tensor)
            sizes["ideal"] += ideal_bytes(state, {})
            lazy.release(arch.embeddings)
        first_block(index, block)

    visitor.before_block = before_first_block
    with measure() as m:
        layers = run_layerwise(model, arch, calibration_ids, algorithm, engine, visitor)
    stage_entry = StageReport(kind=kind, options=options.model_dump(), layers=layers, measurement=m.to_dict(),
                              seconds_per_block=[round(s, 2) for s in visitor.block_seconds])  # fmt: skip
    log.info("stage 0 %s done in %.1f s (%.1f s per block)", kind, m.seconds, m.seconds / max(len(visitor.block_seconds), 1))
    sparsity = None
    if kind == "prune":
        sparsity = {**sparsity_summary(model, layers), "structure": options.pattern or "unstructured", "method": options.method}
        stage_entry.sparsity = sparsity
        model.config.compressor_sparsity = sparsity_config(sparsity, layers, options.skip)

    with measure() as m:
        norm = lazy.load(arch.final_norm)
        head = lazy.load(arch.lm_head)
        dense_ppl = dense.finish(norm, head).to_dict() if dense is not None else None
        round_to_fp16_(norm, set())
        round_to_fp16_(head, set())
        compressed_ppl = visitor.compressed.finish(norm, head).to_dict() if visitor.compressed is not None else None
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {f"{arch.final_norm}.{n}": t for n, t in norm.state_dict().items()}
        if not tied:
            state.update({f"{arch.lm_head}.{n}": t for n, t in head.state_dict().items()})
        for name, tensor in stored_tensors(state, {}).items():
            writer.add(name, tensor)
        sizes["ideal"] += ideal_bytes(state, {})
    timings["evaluate (final norm + lm_head)"] = m.to_dict()

    with measure() as m:
        writer.close()
        quant_config = None
        stage_with_grid = options if kind == "quantize" else joint
        if stage_with_grid is not None:
            if kind == "prune":  # joint: the grids were fixed per group up front
                stage_with_grid = stage_with_grid.model_copy(update={"desc_act": False, "static_groups": True})
            quant_config = gptq_quantization_config(
                bits=stage_with_grid.bits, group_size=stage_with_grid.group_size, sym=stage_with_grid.sym,
                desc_act=stage_with_grid.desc_act, static_groups=stage_with_grid.static_groups,
                damp_percent=stage_with_grid.damp_percent, true_sequential=stage_with_grid.true_sequential,
                checkpoint_format=recipe.export.checkpoint_format,
            )  # fmt: skip
        write_checkpoint_files(tmp, model, quant_config, tokenizer, generation_config_dir=directory)
    timings["export (config, tokenizer)"] = m.to_dict()

    for label, ppl in (("dense", dense_ppl), ("compressed", compressed_ppl)):
        if ppl:
            log.info("%s perplexity %.4f over %d tokens", label, ppl["perplexity"], ppl["tokens"])
    return {
        "model": {"source": source.label, "model_type": model.config.model_type, "parameters": parameters},
        "environment": {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "load": "blockwise"},  # fmt: skip
        "dense": dense_ppl,
        "compressed": compressed_ppl,
        "stages": [stage_entry] + ([StageReport(kind="quantize", options=joint.model_dump(), fused_into="stages[0]",
                                                measurement=stage_entry.measurement)] if joint is not None else []),  # fmt: skip
        "sparsity": sparsity,
        "quantization_config": quant_config,
        "ideal_bytes": sizes["ideal"],
        "dense_fp16_bytes": parameters * 2,
    }
