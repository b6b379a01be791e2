"""The `quantize` stage kind: GPTQ or RTN on every block linear (compressor/quantize.py)."""

from __future__ import annotations

from compressor.architectures import architecture_of
from compressor.engine import is_skipped
from compressor.errors import RecipeError
from compressor.export.gptq import permutes_g_idx
from compressor.quantize import QuantizeStage, quantize_
from compressor.report import StageReport
from compressor.stages.registry import RecipeFacts, StageContext, StageKind, register_stage, stage_kind


def check_group_size(options: QuantizeStage, index: int, layer_in_features: dict[str, int], file: str = "") -> None:
    """The group size divides the input width of every linear the stage quantizes."""
    widths = sorted({w for name, w in layer_in_features.items() if not is_skipped(name, options.skip)})
    if options.group_size == -1 or not widths:
        return
    if any(w % options.group_size for w in widths):
        common = sorted({d for d in range(16, min(widths) + 1) if all(w % d == 0 for w in widths)})
        raise RecipeError(file, f"stages[{index}].quantize.group_size", options.group_size,
                          f"must be -1 or divide every quantized layer's input width {widths} "
                          f"(e.g. {', '.join(map(str, common[-4:]))})")  # fmt: skip


def check(facts: RecipeFacts, options: QuantizeStage, index: int) -> list[str]:
    # (At most one quantize stage per recipe: pipeline.validate checks that, an artifact holds one grid.)
    stages = facts.recipe.stage_list()
    if not any(stage_kind(kind).reshapes_model(o) for kind, o in stages[:index]):  # else checked when it runs
        check_group_size(options, index, facts.widths, facts.recipe_file)
    if facts.recipe.export.format == "gptq" and permutes_g_idx(options.desc_act, options.static_groups, options.group_size):
        return [f"stages[{index}].quantize: desc_act true with static_groups false writes a permuted g_idx, "
                "which vLLM refuses to load (transformers, GPTQModel and compress load it); "
                "set static_groups: true for an artifact that every loader serves"]  # fmt: skip
    return []


def run(ctx: StageContext, options: QuantizeStage, index: int) -> StageReport:
    check_group_size(options, index, architecture_of(ctx.model).layer_in_features(ctx.model), ctx.recipe_file)
    # Zeros left by an earlier prune stage are a mask that GPTQ keeps.
    engine = ctx.engine(f"stage {index} quantize ({options.method})")
    outcome = quantize_(ctx.model, options, ctx.calibration_ids, engine, keep_zeros=ctx.sparsity is not None)
    ctx.quantized, ctx.quantization = outcome.quantized, options
    return StageReport(layers=outcome.layers)


QUANTIZE = register_stage(StageKind(
    name="quantize", options=QuantizeStage, run=run, check=check, summary=lambda o: o.method, quantization=lambda o: o,
))  # fmt: skip
