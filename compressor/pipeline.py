"""`compress run`: recipe -> model -> stages -> perplexity -> artifact + report.

Nothing is written until the artifact is complete: it is assembled in a temporary directory
next to `output` and renamed into place at the end (see `artifacts.directory.atomic_output_dir`).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compressor.architectures import architecture_of
from compressor.blockwise import check_whole_model_fits, choose_blockwise, round_to_fp16_, run_blockwise
from compressor.data import calibration_batch, evaluation_tokens
from compressor.engine import EngineOptions, is_skipped
from compressor.errors import RecipeError, UserError
from compressor.structured import parameter_count
from compressor.evaluation.perplexity import perplexity
from compressor.artifacts.directory import atomic_output_dir, check_output_dir, write_manifest
from compressor.export.gptq import expected_size_bytes, gptq_quantization_config, permutes_g_idx, write_dense_checkpoint, write_gptq_checkpoint
from compressor.models import load_config, load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from compressor.monitor import measure
from compressor.prune import prune_, sparsity_config, sparsity_summary
from compressor.quantize import quantize_
from compressor.recipe import Recipe, check_against_model, parse_size

log = logging.getLogger(__name__)


def quantized_layer_widths(model_or_config, recipe: Recipe) -> dict[str, int]:
    """Input width of every block linear a quantize stage would touch (for recipe checks)."""
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(model_or_config)
    widths = architecture_of(model).layer_in_features(model)
    skips = [p for kind, st in recipe.stage_list() if kind == "quantize" for p in st.skip]
    return {n: w for n, w in widths.items() if not is_skipped(n, skips)}


# Export formats that hold a quantize stage's weights; all but gptq are converted from a GPTQ checkpoint.
QUANTIZED_FORMATS = ("gptq", "onnx", "gguf", "compressed-tensors")


def validate(recipe: Recipe, recipe_file: str = "") -> dict[str, Any]:
    """Everything `run` checks before heavy work, without loading weights."""
    stages = recipe.stage_list()
    quantize_stages = [i for i, (kind, _) in enumerate(stages) if kind == "quantize"]
    if len(quantize_stages) > 1:
        raise RecipeError(recipe_file, f"stages[{quantize_stages[1]}]", "quantize", "at most one quantize stage per recipe")
    for i, (kind, opts) in enumerate(stages):
        if kind == "distill" and any(k == "prune" and o.method != "structured" for k, o in stages[:i]):
            raise RecipeError(recipe_file, f"stages[{i}]", "distill",
                              "training after unstructured/N:M pruning would refill the pruned weights; "
                              "distill before that prune stage (structured pruning before distill is fine)")  # fmt: skip
        if kind in ("prune", "distill") and quantize_stages and i > quantize_stages[0]:
            raise RecipeError(recipe_file, f"stages[{i}]", kind, f"{kind} stages must come before the quantize stage")
        if kind == "prune" and opts.joint_quantize:
            nxt = stages[i + 1] if i + 1 < len(stages) else None
            if nxt is None or nxt[0] != "quantize" or nxt[1].method != "gptq":
                raise RecipeError(recipe_file, f"stages[{i}].prune.joint_quantize", True,
                                  "needs a `quantize: {method: gptq}` stage right after it")  # fmt: skip
    if recipe.export.format in QUANTIZED_FORMATS and not quantize_stages:
        raise RecipeError(recipe_file, "export.format", recipe.export.format,
                          "needs a quantize stage in `stages` (or use export.format: dense)")  # fmt: skip
    if recipe.export.checkpoint_format != "gptq" and recipe.export.format != "gptq":
        raise RecipeError(recipe_file, "export.checkpoint_format", recipe.export.checkpoint_format,
                          f"applies to export.format gptq only (this recipe exports {recipe.export.format})")  # fmt: skip
    if recipe.export.format == "dense" and quantize_stages:
        raise RecipeError(recipe_file, "export.format", "dense", "a recipe with a quantize stage exports format gptq")
    source = resolve_source(recipe.model.source)
    config = load_config(source, recipe.model.revision, recipe.model.trust_remote_code)
    architecture_of(config)
    if recipe.export.format == "onnx":
        _check_onnx_exportable(recipe, config, quantize_stages[0], recipe_file)
    if recipe.export.format == "gguf":
        from compressor.export.gguf import check_recipe_exportable

        i = quantize_stages[0]
        q = stages[i][1]
        try:
            check_recipe_exportable(q.bits, q.sym, q.group_size, q.desc_act, q.static_groups)
        except UserError as exc:
            raise RecipeError(recipe_file, "export.format", "gguf", f"stages[{i}].quantize: {exc}") from None
    if recipe.export.format == "compressed-tensors":
        from compressor.export.compressed_tensors import RECIPE_FIX, SUPPORTED_BITS

        i = quantize_stages[0]
        q = stages[i][1]
        if q.bits not in SUPPORTED_BITS:
            raise RecipeError(recipe_file, "export.format", "compressed-tensors",
                              f"stages[{i}].quantize.bits {q.bits}: compressed-tensors export holds bits 4 and 8")  # fmt: skip
        if permutes_g_idx(q.desc_act, q.static_groups, q.group_size):
            raise RecipeError(recipe_file, "export.format", "compressed-tensors",
                              f"a permuted g_idx (desc_act without static groups) has no compressed-tensors form; set {RECIPE_FIX.replace('[i]', f'[{i}]')}")  # fmt: skip
    widths = quantized_layer_widths(config, recipe)
    if not any(kind == "prune" and opts.method == "structured" for kind, opts in stages):
        check_against_model(recipe, widths, recipe_file)  # structured pruning changes widths: checked later
    for i, (kind, opts) in enumerate(stages):
        if kind == "prune" and opts.nm():
            m = opts.nm()[1]
            bad = sorted({w for w in widths.values() if w % m})
            if bad:
                raise RecipeError(recipe_file, f"stages[{i}].prune.pattern", opts.pattern,
                                  f"M must divide every pruned layer's input width (got widths {bad})")  # fmt: skip
    warnings = []
    for i in quantize_stages:
        q = stages[i][1]
        if recipe.export.format == "gptq" and permutes_g_idx(q.desc_act, q.static_groups, q.group_size):
            warnings.append(f"stages[{i}].quantize: desc_act true with static_groups false writes a permuted g_idx, "
                            "which vLLM refuses to load (transformers, GPTQModel and compress load it); "
                            "set static_groups: true for an artifact that every loader serves")  # fmt: skip
    return {"source": source, "config": config, "quantized_linears": len(widths), "warnings": warnings}


def _check_onnx_exportable(recipe: Recipe, config, stage_index: int, recipe_file: str) -> None:
    """Fail before any work if export.format onnx cannot express this model or bit width."""
    from compressor.errors import UserError
    from compressor.export.onnx import MATMUL_NBITS_BITS, decoder_shape

    bits = recipe.stage_list()[stage_index][1].bits
    if bits not in MATMUL_NBITS_BITS:
        raise RecipeError(recipe_file, f"stages[{stage_index}].quantize.bits", bits,
                          f"export.format onnx needs bits {', '.join(map(str, MATMUL_NBITS_BITS))} (what MatMulNBits runs)")  # fmt: skip
    try:
        decoder_shape(config)
    except UserError as exc:
        raise RecipeError(recipe_file, "export.format", "onnx", str(exc)) from None


@dataclass
class RunResult:
    output: Path
    report: dict[str, Any]
    model: nn.Module | None  # the compressed model in memory, equal to what the artifact holds (None: blockwise)


def _run_blockwise(recipe: Recipe, recipe_file: str, checked: dict, device, dtype, overwrite: bool, progress: bool,
                   started: float, timings: dict) -> RunResult:  # fmt: skip
    """`run` for a model read one block at a time (compressor/blockwise.py); the same artifact and report."""
    from compressor.report import write_report

    out = Path(recipe.output)
    calib = recipe.data.calibration
    with atomic_output_dir(out, overwrite) as tmp:
        parts = run_blockwise(recipe, recipe_file, checked, device, dtype, tmp, progress, timings)
        dense_ppl, compressed_ppl = parts["perplexity"]["dense"], parts["perplexity"]["compressed"]
        report: dict[str, Any] = {
            "model": parts["model"],
            "environment": parts["environment"],
            "recipe": recipe.model_dump(mode="json"),
            "calibration": {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed},
            "perplexity": parts["perplexity"],
            "stages": parts["stages"],
            "sparsity": parts["sparsity"],
            "quantization_config": parts["quantization_config"],
            "timings": timings,
        }
        if dense_ppl and compressed_ppl:
            report["perplexity"]["increase"] = compressed_ppl["perplexity"] / dense_ppl["perplexity"] - 1
        weights = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        report["size"] = {
            "artifact_weights_bytes": weights,
            "ideal_bytes": parts["ideal_bytes"],
            "dense_fp16_bytes": parts["dense_fp16_bytes"],
            "artifact_over_ideal": weights / parts["ideal_bytes"],
            "artifact_over_dense_fp16": weights / parts["dense_fp16_bytes"],
        }
        report["total_seconds"] = time.perf_counter() - started
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        write_report(tmp, report)
        write_manifest(tmp)
    log.info("wrote %s", out)
    if recipe.push is not None:
        from compressor.hub import push

        p = recipe.push
        push(out, p.repo, private=p.private, revision=p.revision, overwrite=p.overwrite, dry_run=p.dry_run, echo=log.info)
    return RunResult(out, report, None)


def _unique_parameter_bytes(model: nn.Module, bytes_per: int = 2) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * bytes_per
    return total


def _round_to_fp16_(model: nn.Module, quantized: set[str]) -> None:
    """The artifact stores every unquantized float tensor in fp16; make memory match it.

    Quantized weights are left alone: scale * (code - zero) is exact in float32 but not always
    representable in fp16, and the runtime dequantizes in float32 too.
    """
    round_to_fp16_(model, {id(model.get_submodule(name).weight) for name in quantized})


def _distill_stage(model, teacher, tokenizer, options, recipe: Recipe, eval_ids, i: int, resume: bool, progress: bool):
    """Run one distill stage; returns (student, report). The student may be a different model."""
    from compressor.data import token_ids
    from compressor.distill import distill_, student_from_teacher_layers

    key = f"stages[{i}].distill"
    dtype = next(model.parameters()).dtype
    if options.teacher != "input":
        teacher = load_model(resolve_source(options.teacher, key=f"{key}.teacher"), dtype)
    if options.student == "keep_layers":
        student = student_from_teacher_layers(teacher, options.keep_layers)
    elif options.student != "current":
        student = load_model(resolve_source(options.student, key=f"{key}.student"), dtype)
    else:
        student = model
    checkpoints = Path(options.checkpoint_dir or f"{recipe.output}.distill-ckpt") / f"stage{i}"
    train_ids = token_ids(tokenizer, recipe.data.calibration, "calibration")  # never the evaluation part
    report = distill_(
        student, teacher, options, train_ids, eval_ids, recipe.data.evaluation.seq_len,
        checkpoints if options.checkpoint_every else None, resume=resume, key=key, progress=progress,
        eval_batch_size=recipe.data.evaluation.batch_size, final_max_windows=recipe.data.evaluation.max_windows,
    )  # fmt: skip
    student.requires_grad_(False)
    student.eval()
    return student, report, checkpoints


def run(
    recipe: Recipe, recipe_file: str = "", overwrite: bool = False, progress: bool = True, resume: bool = False
) -> RunResult:
    """Run the recipe. `resume`: a distill stage continues from its latest checkpoint."""
    started = time.perf_counter()
    out = Path(recipe.output)
    overwrite = overwrite or recipe.export.overwrite
    check_output_dir(out, overwrite)  # fail before the expensive part
    if recipe.compute.threads:
        torch.set_num_threads(recipe.compute.threads)
    checked = validate(recipe, recipe_file)
    for warning in checked["warnings"]:
        log.warning("%s", warning)
    source = checked["source"]
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    timings: dict[str, dict] = {}
    if choose_blockwise(recipe, recipe_file, source, checked["config"], dtype):
        return _run_blockwise(recipe, recipe_file, checked, device, dtype, overwrite, progress, started, timings)
    check_whole_model_fits(recipe, checked["config"], dtype)

    with measure() as m:
        tokenizer = load_tokenizer(source, recipe.model.revision, recipe.model.trust_remote_code)
        model = load_model(source, dtype, recipe.model.revision, recipe.model.trust_remote_code)
    timings["load model"] = m.to_dict()
    log.info("loaded %s (%s, %.1fM parameters) in %.1f s", source.label, model.config.model_type,
             parameter_count(model) / 1e6, m.seconds)  # fmt: skip
    dense_fp16_bytes = _unique_parameter_bytes(model)
    calib = recipe.data.calibration
    ev = recipe.data.evaluation
    with measure() as m:
        calibration_ids = calibration_batch(tokenizer, calib)
        eval_ids = evaluation_tokens(tokenizer, ev) if recipe.evaluate.perplexity else None
    timings["prepare data"] = m.to_dict()

    def evaluate(label: str) -> dict | None:
        if eval_ids is None:
            return None
        model.to(device)
        with measure() as m:
            result = perplexity(model, eval_ids, ev.seq_len, ev.batch_size, ev.max_windows, progress, f"perplexity ({label})")
        model.to("cpu")
        timings[f"evaluate {label}"] = m.to_dict()
        log.info("%s perplexity %.4f over %d tokens", label, result.perplexity, result.tokens)
        return result.to_dict()

    dense_ppl = evaluate("dense") if recipe.evaluate.dense else None
    # A distill stage's default teacher is the model as it entered the pipeline.
    needs_teacher = any(kind == "distill" and o.teacher == "input" for kind, o in recipe.stage_list())
    teacher = copy.deepcopy(model) if needs_teacher else None
    distill_curves, checkpoint_dirs = [], []

    stages_report, quantized, qstage, sparsity, pruned_names = [], {}, None, None, set()
    stages = recipe.stage_list()
    fused_into_previous = False
    for i, (kind, options) in enumerate(stages):
        if fused_into_previous:  # the quantize stage already ran inside joint SparseGPT+GPTQ
            stages_report.append({"kind": kind, "options": options.model_dump(), "fused_into": f"stages[{i - 1}]",
                                  "measurement": stages_report[-1]["measurement"], "layers": {}})  # fmt: skip
            fused_into_previous = False
            continue
        engine = EngineOptions(
            device=device,
            batch_size=recipe.compute.calibration_batch_size,
            max_activation_gb=recipe.compute.max_activation_gb,
            progress=progress,
            desc=f"stage {i} {kind}" + (f" ({options.method})" if hasattr(options, "method") else ""),
        )
        entry: dict[str, Any] = {"kind": kind, "options": options.model_dump()}
        with measure() as m:
            if kind == "distill":
                model, report_, ckpt = _distill_stage(model, teacher, tokenizer, options, recipe, eval_ids, i, resume, progress)
                entry["distill"] = report_
                distill_curves.append((i, report_))
                checkpoint_dirs.append(ckpt)
            elif kind == "quantize":
                check_against_model(recipe, quantized_layer_widths(model, recipe), recipe_file)
                outcome = quantize_(model, options, calibration_ids, engine, keep_zeros=sparsity is not None)
                quantized, qstage, entry["layers"] = outcome.quantized, options, outcome.layers
            else:
                joint = stages[i + 1][1] if options.joint_quantize else None
                outcome = prune_(model, options, calibration_ids, engine, joint, key=f"stages[{i}].prune")
                entry["layers"] = outcome.layers
                if outcome.structured is not None:
                    entry["structured"] = outcome.structured
                else:
                    sparsity = {**sparsity_summary(model, outcome.layers), "structure": options.pattern or "unstructured",
                                "method": options.method}  # fmt: skip
                    entry["sparsity"] = sparsity
                    pruned_names.update(outcome.layers)
                if joint is not None:
                    # One pass did both; the grids were fixed per group up front (static groups).
                    quantized, fused_into_previous = outcome.quantized, True
                    qstage = joint.model_copy(update={"desc_act": False, "static_groups": True})
        entry["measurement"] = m.to_dict()
        stages_report.append(entry)
        log.info("stage %d %s done in %.1f s", i, kind, m.seconds)

    _round_to_fp16_(model, set(quantized))
    compressed_ppl = evaluate("compressed")

    quant_config = None
    if qstage is not None:
        quant_config = gptq_quantization_config(
            bits=qstage.bits, group_size=qstage.group_size, sym=qstage.sym, desc_act=qstage.desc_act,
            static_groups=qstage.static_groups, damp_percent=qstage.damp_percent,
            true_sequential=qstage.true_sequential, checkpoint_format=recipe.export.checkpoint_format,
        )  # fmt: skip
    if sparsity is not None:
        model.config.compressor_sparsity = sparsity_config(sparsity, pruned_names, [p for kind, o in stages if kind == "prune" for p in o.skip])
    report: dict[str, Any] = {
        "model": {
            "source": source.label,
            "model_type": model.config.model_type,
            "parameters": parameter_count(model),
        },
        "environment": {
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "recipe": recipe.model_dump(mode="json"),
        "calibration": {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed},
        "perplexity": {"source": ev.source, "dense": dense_ppl, "compressed": compressed_ppl},
        "stages": stages_report,
        "sparsity": sparsity,
        "quantization_config": quant_config,
        "timings": timings,
    }
    if dense_ppl and compressed_ppl:
        report["perplexity"]["increase"] = compressed_ppl["perplexity"] / dense_ppl["perplexity"] - 1

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` only the main process writes
        return RunResult(out, report, model)
    with atomic_output_dir(out, overwrite) as tmp:
        shard_size = parse_size(recipe.export.max_shard_size)
        with measure() as m:
            converted = None
            write_gptq = lambda d: write_gptq_checkpoint(d, model, quantized, quant_config, tokenizer, shard_size)  # noqa: E731
            # For the converted formats the GPTQ checkpoint is the exact intermediate: written to a
            # temporary directory, converted into `tmp`, then deleted.
            if recipe.export.format == "onnx":
                from compressor.export.onnx import convert_checkpoint_dir, onnx_bytes

                converted = convert_checkpoint_dir(write_gptq, tmp, progress=progress)
            elif recipe.export.format == "gguf":
                from compressor.export import gguf

                converted = gguf.convert_checkpoint_dir(write_gptq, tmp, name=out.name, progress=progress)
            elif recipe.export.format == "compressed-tensors":
                from compressor.export import compressed_tensors

                converted = compressed_tensors.convert_checkpoint_dir(write_gptq, tmp, progress=progress)
            elif quant_config is not None:
                write_gptq_checkpoint(tmp, model, quantized, quant_config, tokenizer, shard_size)
            else:
                write_dense_checkpoint(tmp, model, tokenizer, shard_size)
        timings["export"] = m.to_dict()
        # For converted formats the sizes stay those of the GPTQ weights (what `ideal` describes); the
        # converted file's size is added below.
        weights = converted["gptq_weights_bytes"] if converted else sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        ideal = expected_size_bytes(model, quantized)
        report["size"] = {
            "artifact_weights_bytes": weights,
            "ideal_bytes": ideal,
            "dense_fp16_bytes": dense_fp16_bytes,
            "artifact_over_ideal": weights / ideal,
            "artifact_over_dense_fp16": weights / dense_fp16_bytes,
        }
        if recipe.export.format == "onnx":
            report["size"]["onnx_bytes"] = onnx_bytes(tmp)
            report["size"]["onnx_over_gptq"] = report["size"]["onnx_bytes"] / weights
        if recipe.export.format == "gguf":
            report["size"]["gguf_bytes"] = converted["gguf_bytes"]
            report["size"]["gguf_over_gptq"] = converted["gguf_bytes"] / weights
        if recipe.export.format == "compressed-tensors":
            report["size"]["compressed_tensors_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        report["total_seconds"] = time.perf_counter() - started
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        from compressor.report import write_report

        write_report(tmp, report)
        if distill_curves:
            from compressor.distill import plot_distill_curves

            for i, rep in distill_curves:
                plot_distill_curves(rep, tmp / f"distill_stage{i}.png")
        write_manifest(tmp)
    log.info("wrote %s", out)
    if recipe.push is not None:  # only after the artifact is complete on disk
        from compressor.hub import push

        p = recipe.push
        push(out, p.repo, private=p.private, revision=p.revision, overwrite=p.overwrite, dry_run=p.dry_run, echo=log.info)
    for ckpt in checkpoint_dirs:  # the artifact is complete: nothing is left to resume
        shutil.rmtree(ckpt, ignore_errors=True)
        if ckpt.parent.name.endswith(".distill-ckpt") and ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
            ckpt.parent.rmdir()
    return RunResult(out, report, model)
