"""The `prune` stage kind: unstructured or N:M pruning on the layer-wise engine (compressor/prune.py),
or structured pruning of channels, heads or layers (compressor/structured.py)."""

from __future__ import annotations

from compressor.engine import is_skipped
from compressor.errors import RecipeError
from compressor.prune import PruneStage, prune_, sparsity_config, sparsity_summary
from compressor.report import StageReport
from compressor.stages.registry import RecipeFacts, StageContext, StageKind, register_stage


def check(facts: RecipeFacts, options: PruneStage, index: int) -> list[str]:
    stages, file = facts.recipe.stage_list(), facts.recipe_file
    if any(kind == "quantize" for kind, _ in stages[:index]):
        raise RecipeError(file, f"stages[{index}]", "prune", "prune stages must come before the quantize stage")
    if options.joint_quantize:
        nxt = stages[index + 1] if index + 1 < len(stages) else None
        if nxt is None or nxt[0] != "quantize" or nxt[1].method != "gptq":
            raise RecipeError(file, f"stages[{index}].prune.joint_quantize", True, "needs a `quantize: {method: gptq}` stage right after it")
    if options.nm():
        m = options.nm()[1]
        bad = sorted({w for name, w in facts.widths.items() if w % m and not is_skipped(name, options.skip)})
        if bad:
            raise RecipeError(file, f"stages[{index}].prune.pattern", options.pattern,
                              f"M must divide every pruned layer's input width (got widths {bad})")  # fmt: skip
    return []


def run(ctx: StageContext, options: PruneStage, index: int) -> StageReport:
    stages = ctx.recipe.stage_list()
    joint = stages[index + 1][1] if options.joint_quantize else None
    engine = ctx.engine(f"stage {index} prune ({options.method})")
    outcome = prune_(ctx.model, options, ctx.calibration_ids, engine, joint, key=f"stages[{index}].prune")
    report = StageReport(layers=outcome.layers)
    ctx.prune_skips.extend(options.skip)
    if outcome.structured is not None:
        report.structured = outcome.structured
    else:
        ctx.sparsity = report.sparsity = {**sparsity_summary(ctx.model, outcome.layers),
                                          "structure": options.pattern or "unstructured", "method": options.method}  # fmt: skip
        ctx.pruned_names.update(outcome.layers)
    if ctx.sparsity is not None:  # config.json says the weights are sparse (vLLM, people)
        ctx.model.config.compressor_sparsity = sparsity_config(ctx.sparsity, ctx.pruned_names, ctx.prune_skips)
    if joint is not None:
        # One pass did both; the grids were fixed per group up front (static groups).
        ctx.quantized, ctx.fused[index + 1] = outcome.quantized, index
        ctx.quantization = joint.model_copy(update={"desc_act": False, "static_groups": True})
    return report


PRUNE = register_stage(StageKind(
    name="prune", options=PruneStage, run=run, check=check, summary=lambda o: o.method,
    reshapes_model=lambda o: o.method == "structured",
))  # fmt: skip
