"""`compress run`: recipe -> model -> stages -> perplexity -> artifact + report.

Nothing is written until the artifact is complete: it is assembled in a temporary directory
next to `output` and renamed into place at the end (see `artifacts.directory.atomic_output_dir`).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compressor.architectures import architecture_of
from compressor.artifacts.directory import atomic_output_dir, check_output_dir, write_manifest
from compressor.blockwise import check_whole_model_fits, choose_blockwise, round_to_fp16_, run_blockwise
from compressor.data import calibration_batch, evaluation_tokens
from compressor.engine import is_skipped
from compressor.errors import RecipeError, UserError
from compressor.evaluation.perplexity import perplexity
from compressor.export.gptq import expected_size_bytes, gptq_quantization_config, permutes_g_idx, write_dense_checkpoint, write_gptq_checkpoint
from compressor.models import ResolvedSource, load_config, load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from compressor.monitor import measure
from compressor.recipe import Recipe, parse_size
from compressor.report import ModelFacts, PerplexityReport, RunReport, SizeReport, StageReport, write_report
from compressor.stages import RecipeFacts, StageContext, stage_kind
from compressor.structured import parameter_count

log = logging.getLogger(__name__)


# Export formats that hold quantized weights; all but gptq are converted from a GPTQ checkpoint.
QUANTIZED_FORMATS = ("gptq", "onnx", "gguf", "compressed-tensors")


@dataclass
class CheckedRecipe:
    """What `validate` found: the resolved model source, its config, and warnings to show."""

    source: ResolvedSource
    config: Any
    linears_to_compress: int  # block linears some stage touches (before any structured pruning)
    warnings: list[str]


def quantization_stages(recipe: Recipe) -> list[tuple[int, Any]]:
    """(index, grid) of each stage that quantizes weights (what the export checks against)."""
    grids = [(i, stage_kind(kind).quantization(options)) for i, (kind, options) in enumerate(recipe.stage_list())]
    return [(i, grid) for i, grid in grids if grid is not None]


def validate(recipe: Recipe, recipe_file: str = "") -> CheckedRecipe:
    """Everything `run` checks before heavy work, without loading weights."""
    grids = quantization_stages(recipe)
    _check_export_needs(recipe, grids, recipe_file)
    source = resolve_source(recipe.model.source)
    config = load_config(source, recipe.model.revision, recipe.model.trust_remote_code)
    architecture_of(config)
    with torch.device("meta"):  # shapes only, no memory
        from transformers import AutoModelForCausalLM

        shapes = AutoModelForCausalLM.from_config(config)
    facts = RecipeFacts(recipe, recipe_file, config, architecture_of(shapes).layer_in_features(shapes))
    warnings = []
    for i, (kind, options) in enumerate(recipe.stage_list()):
        warnings += stage_kind(kind).check(facts, options, i)
    if grids and recipe.export.format != "gptq":
        _check_export_grid(recipe, config, *grids[0], recipe_file)
    skips = [getattr(options, "skip", []) for _, options in recipe.stage_list()]
    touched = [name for name in facts.widths if not all(is_skipped(name, s) for s in skips)]
    return CheckedRecipe(source, config, len(touched), warnings)


def _check_export_needs(recipe: Recipe, grids: list, recipe_file: str) -> None:
    """export.* against the stages: a quantized format needs quantized weights, and the reverse."""
    export = recipe.export
    if len(grids) > 1:
        raise RecipeError(recipe_file, f"stages[{grids[1][0]}]", "quantize", "at most one quantize stage per recipe")
    if export.format in QUANTIZED_FORMATS and not grids:
        raise RecipeError(recipe_file, "export.format", export.format,
                          "needs a quantize stage in `stages` (or use export.format: dense)")  # fmt: skip
    if export.checkpoint_format != "gptq" and export.format != "gptq":
        raise RecipeError(recipe_file, "export.checkpoint_format", export.checkpoint_format,
                          f"applies to export.format gptq only (this recipe exports {export.format})")  # fmt: skip
    if export.format == "dense" and grids:
        raise RecipeError(recipe_file, "export.format", "dense", "a recipe with a quantize stage exports format gptq")


def _check_export_grid(recipe: Recipe, config, index: int, q, recipe_file: str) -> None:
    """Fail before any work if the converted export format cannot hold this grid or model."""
    fmt = recipe.export.format
    if fmt == "onnx":
        from compressor.export.onnx import MATMUL_NBITS_BITS, check_bits, decoder_shape

        try:
            check_bits(q.bits)
        except UserError:
            raise RecipeError(recipe_file, f"stages[{index}].quantize.bits", q.bits,
                              f"export.format onnx needs bits {', '.join(map(str, MATMUL_NBITS_BITS))} (what MatMulNBits runs)") from None  # fmt: skip
        try:
            decoder_shape(config)
        except UserError as exc:
            raise RecipeError(recipe_file, "export.format", "onnx", str(exc)) from None
    elif fmt == "gguf":
        from compressor.export.gguf import check_recipe_exportable

        try:
            check_recipe_exportable(q.bits, q.sym, q.group_size, q.desc_act, q.static_groups)
        except UserError as exc:
            raise RecipeError(recipe_file, "export.format", "gguf", f"stages[{index}].quantize: {exc}") from None
    elif fmt == "compressed-tensors":
        from compressor.export.compressed_tensors import RECIPE_FIX, SUPPORTED_BITS

        if q.bits not in SUPPORTED_BITS:
            raise RecipeError(recipe_file, "export.format", "compressed-tensors",
                              f"stages[{index}].quantize.bits {q.bits}: compressed-tensors export holds bits 4 and 8")  # fmt: skip
        if permutes_g_idx(q.desc_act, q.static_groups, q.group_size):
            raise RecipeError(recipe_file, "export.format", "compressed-tensors",
                              f"a permuted g_idx (desc_act without static groups) has no compressed-tensors form; set {RECIPE_FIX.replace('[i]', f'[{index}]')}")  # fmt: skip


@dataclass
class RunResult:
    output: Path
    report: RunReport
    model: nn.Module | None  # the compressed model in memory, equal to what the artifact holds (None: blockwise)


def _environment(device, dtype) -> dict[str, Any]:
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip


def _calibration_facts(recipe: Recipe) -> dict[str, Any]:
    calib = recipe.data.calibration
    return {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed}


def _size_report(weights: int, ideal: int, dense_fp16_bytes: int) -> SizeReport:
    return SizeReport(artifact_weights_bytes=weights, ideal_bytes=ideal, dense_fp16_bytes=dense_fp16_bytes,
                      artifact_over_ideal=weights / ideal, artifact_over_dense_fp16=weights / dense_fp16_bytes)  # fmt: skip


def _perplexity_report(source: str, dense: dict | None, compressed: dict | None) -> PerplexityReport:
    increase = compressed["perplexity"] / dense["perplexity"] - 1 if dense and compressed else None
    return PerplexityReport(source=source, dense=dense, compressed=compressed, increase=increase)


def _finish_artifact(tmp: Path, recipe: Recipe, report: RunReport, started: float, writers=()) -> None:
    """The files every artifact gets last: the resolved recipe, the report, extra files, the manifest."""
    report.total_seconds = time.perf_counter() - started
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    write_report(tmp, report)
    for write in writers:
        write(tmp)
    write_manifest(tmp)


def _publish(out: Path, recipe: Recipe) -> None:
    """Push to the Hub, only after the artifact is complete on disk."""
    if recipe.push is not None:
        from compressor.hub import push

        p = recipe.push
        push(out, p.repo, private=p.private, revision=p.revision, overwrite=p.overwrite, dry_run=p.dry_run, echo=log.info)


def _run_blockwise(recipe: Recipe, recipe_file: str, checked: CheckedRecipe, device, dtype, overwrite: bool, progress: bool,
                   started: float, timings: dict) -> RunResult:  # fmt: skip
    """`run` for a model read one block at a time (compressor/blockwise.py); the same artifact and report."""
    out = Path(recipe.output)
    with atomic_output_dir(out, overwrite) as tmp:
        parts = run_blockwise(recipe, recipe_file, checked.source, checked.config, device, dtype, tmp, progress, timings)
        weights = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        report = RunReport(
            model=ModelFacts(**parts["model"]),
            environment=parts["environment"],
            recipe=recipe.model_dump(mode="json"),
            calibration=_calibration_facts(recipe),
            perplexity=_perplexity_report(recipe.data.evaluation.source, parts["dense"], parts["compressed"]),
            stages=parts["stages"],
            sparsity=parts["sparsity"],
            quantization_config=parts["quantization_config"],
            timings=timings,
            size=_size_report(weights, parts["ideal_bytes"], parts["dense_fp16_bytes"]),
        )  # fmt: skip
        _finish_artifact(tmp, recipe, report, started)
    log.info("wrote %s", out)
    _publish(out, recipe)
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


def run_stages(ctx: StageContext) -> list[StageReport]:
    """Run the recipe's stages in order on `ctx.model` (a stage may replace it); one report each."""
    reports: list[StageReport] = []
    for i, (kind, options) in enumerate(ctx.recipe.stage_list()):
        if i in ctx.fused:  # it already ran inside an earlier stage's pass (prune with joint_quantize)
            host = reports[ctx.fused[i]]
            reports.append(StageReport(kind=kind, options=options.model_dump(), fused_into=f"stages[{ctx.fused[i]}]",
                                       measurement=host.measurement))  # fmt: skip
            continue
        with measure() as m:
            report = stage_kind(kind).run(ctx, options, i)
        report.kind, report.options, report.measurement = kind, options.model_dump(), m.to_dict()
        reports.append(report)
        log.info("stage %d %s done in %.1f s", i, kind, m.seconds)
    return reports


def _export(tmp: Path, recipe: Recipe, ctx: StageContext, quant_config: dict | None, dense_fp16_bytes: int,
            progress: bool, timings: dict) -> SizeReport:  # fmt: skip
    """Write the model in `recipe.export.format` into `tmp`; the sizes for the report."""
    model, fmt = ctx.model, recipe.export.format
    shard_size = parse_size(recipe.export.max_shard_size)
    with measure() as m:
        converted = None
        write_gptq = lambda d: write_gptq_checkpoint(d, model, ctx.quantized, quant_config, ctx.tokenizer, shard_size)  # noqa: E731
        # For the converted formats the GPTQ checkpoint is the exact intermediate: written to a
        # temporary directory, converted into `tmp`, then deleted.
        if fmt == "onnx":
            from compressor.export.onnx import convert_checkpoint_dir

            converted = convert_checkpoint_dir(write_gptq, tmp, progress=progress)
        elif fmt == "gguf":
            from compressor.export import gguf

            converted = gguf.convert_checkpoint_dir(write_gptq, tmp, name=Path(recipe.output).name, progress=progress)
        elif fmt == "compressed-tensors":
            from compressor.export import compressed_tensors

            converted = compressed_tensors.convert_checkpoint_dir(write_gptq, tmp, progress=progress)
        elif quant_config is not None:
            write_gptq(tmp)
        else:
            write_dense_checkpoint(tmp, model, ctx.tokenizer, shard_size)
    timings["export"] = m.to_dict()
    # For converted formats the sizes stay those of the GPTQ weights (what `ideal` describes); the
    # converted file's size is added.
    weights = converted["gptq_weights_bytes"] if converted else sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    size = _size_report(weights, expected_size_bytes(model, ctx.quantized), dense_fp16_bytes)
    if fmt == "onnx":
        from compressor.export.onnx import onnx_bytes

        size.onnx_bytes = onnx_bytes(tmp)
        size.onnx_over_gptq = size.onnx_bytes / weights
    if fmt == "gguf":
        size.gguf_bytes = converted["gguf_bytes"]
        size.gguf_over_gptq = converted["gguf_bytes"] / weights
    if fmt == "compressed-tensors":
        size.compressed_tensors_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    return size


def run(
    recipe: Recipe, recipe_file: str = "", overwrite: bool = False, progress: bool = True, resume: bool = False
) -> RunResult:
    """Run the recipe: load, run the stages, evaluate, export, publish.

    `resume`: a distill stage continues from its latest checkpoint.
    """
    started = time.perf_counter()
    out = Path(recipe.output)
    overwrite = overwrite or recipe.export.overwrite
    check_output_dir(out, overwrite)  # fail before the expensive part
    if recipe.compute.threads:
        torch.set_num_threads(recipe.compute.threads)
    checked = validate(recipe, recipe_file)
    for warning in checked.warnings:
        log.warning("%s", warning)
    source = checked.source
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    timings: dict[str, dict] = {}
    if choose_blockwise(recipe, recipe_file, source, checked.config, dtype):
        return _run_blockwise(recipe, recipe_file, checked, device, dtype, overwrite, progress, started, timings)
    check_whole_model_fits(recipe, checked.config, dtype)

    with measure() as m:
        tokenizer = load_tokenizer(source, recipe.model.revision, recipe.model.trust_remote_code)
        model = load_model(source, dtype, recipe.model.revision, recipe.model.trust_remote_code)
    timings["load model"] = m.to_dict()
    log.info("loaded %s (%s, %.1fM parameters) in %.1f s", source.label, model.config.model_type,
             parameter_count(model) / 1e6, m.seconds)  # fmt: skip
    dense_fp16_bytes = _unique_parameter_bytes(model)
    ev = recipe.data.evaluation
    with measure() as m:
        calibration_ids = calibration_batch(tokenizer, recipe.data.calibration)
        eval_ids = evaluation_tokens(tokenizer, ev) if recipe.evaluate.perplexity else None
    timings["prepare data"] = m.to_dict()

    def evaluate(model: nn.Module, label: str) -> dict | None:
        if eval_ids is None:
            return None
        model.to(device)
        with measure() as m:
            result = perplexity(model, eval_ids, ev.seq_len, ev.batch_size, ev.max_windows, progress, f"perplexity ({label})")
        model.to("cpu")
        timings[f"evaluate {label}"] = m.to_dict()
        log.info("%s perplexity %.4f over %d tokens", label, result.perplexity, result.tokens)
        return result.to_dict()

    dense_ppl = evaluate(model, "dense") if recipe.evaluate.dense else None
    ctx = StageContext(recipe, recipe_file, model, tokenizer, calibration_ids, eval_ids, device, progress, resume)
    if any(stage_kind(kind).needs_input_model(options) for kind, options in recipe.stage_list()):
        ctx.input_model = copy.deepcopy(model)  # e.g. a distill stage's default teacher
    stage_reports = run_stages(ctx)
    model = ctx.model
    _round_to_fp16_(model, set(ctx.quantized))
    compressed_ppl = evaluate(model, "compressed")

    q = ctx.quantization
    quant_config = None if q is None else gptq_quantization_config(
        bits=q.bits, group_size=q.group_size, sym=q.sym, desc_act=q.desc_act, static_groups=q.static_groups,
        damp_percent=q.damp_percent, true_sequential=q.true_sequential, checkpoint_format=recipe.export.checkpoint_format,
    )  # fmt: skip
    report = RunReport(
        model=ModelFacts(source=source.label, model_type=model.config.model_type, parameters=parameter_count(model)),
        environment=_environment(device, dtype),
        recipe=recipe.model_dump(mode="json"),
        calibration=_calibration_facts(recipe),
        perplexity=_perplexity_report(ev.source, dense_ppl, compressed_ppl),
        stages=stage_reports,
        sparsity=ctx.sparsity,
        quantization_config=quant_config,
        timings=timings,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` only the main process writes
        return RunResult(out, report, model)
    with atomic_output_dir(out, overwrite) as tmp:
        report.size = _export(tmp, recipe, ctx, quant_config, dense_fp16_bytes, progress, timings)
        _finish_artifact(tmp, recipe, report, started, ctx.artifact_writers)
    log.info("wrote %s", out)
    _publish(out, recipe)
    for cleanup in ctx.after_export:
        cleanup()
    return RunResult(out, report, model)
