"""The `distill` stage kind: train the model (or a smaller student) to match a teacher (compressor/distill.py)."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from compressor.data import token_ids
from compressor.distill import DistillStage, distill_, plot_distill_curves, student_from_teacher_layers
from compressor.errors import RecipeError
from compressor.models import load_model, resolve_source
from compressor.report import StageReport
from compressor.stages.registry import RecipeFacts, StageContext, StageKind, register_stage


def check(facts: RecipeFacts, options: DistillStage, index: int) -> list[str]:
    stages, file = facts.recipe.stage_list(), facts.recipe_file
    if any(kind == "prune" and o.method != "structured" for kind, o in stages[:index]):
        raise RecipeError(file, f"stages[{index}]", "distill",
                          "training after unstructured/N:M pruning would refill the pruned weights; "
                          "distill before that prune stage (structured pruning before distill is fine)")  # fmt: skip
    if any(kind == "quantize" for kind, _ in stages[:index]):
        raise RecipeError(file, f"stages[{index}]", "distill", "distill stages must come before the quantize stage")
    return []


def _remove_checkpoints(checkpoints: Path) -> None:
    """The artifact is complete: nothing is left to resume."""
    shutil.rmtree(checkpoints, ignore_errors=True)
    parent = checkpoints.parent
    if parent.name.endswith(".distill-ckpt") and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def run(ctx: StageContext, options: DistillStage, index: int) -> StageReport:
    """The student may be another model: it replaces `ctx.model`."""
    recipe, key = ctx.recipe, f"stages[{index}].distill"
    dtype = next(ctx.model.parameters()).dtype
    teacher = ctx.input_model
    if options.teacher != "input":
        teacher = load_model(resolve_source(options.teacher, key=f"{key}.teacher"), dtype)
    if options.student == "keep_layers":
        student = student_from_teacher_layers(teacher, options.keep_layers)
    elif options.student != "current":
        student = load_model(resolve_source(options.student, key=f"{key}.student"), dtype)
    else:
        student = ctx.model
    checkpoints = Path(options.checkpoint_dir or f"{recipe.output}.distill-ckpt") / f"stage{index}"
    train_ids = token_ids(ctx.tokenizer, recipe.data.calibration, "calibration")  # never the evaluation part
    curves = distill_(
        student, teacher, options, train_ids, ctx.eval_ids, recipe.data.evaluation.seq_len,
        checkpoints if options.checkpoint_every else None, resume=ctx.resume, key=key, progress=ctx.progress,
        eval_batch_size=recipe.data.evaluation.batch_size, final_max_windows=recipe.data.evaluation.max_windows,
    )  # fmt: skip
    student.requires_grad_(False)
    student.eval()
    ctx.model = student
    ctx.artifact_writers.append(lambda directory: plot_distill_curves(curves, directory / f"distill_stage{index}.png"))
    ctx.after_export.append(partial(_remove_checkpoints, checkpoints))
    return StageReport(distill=curves)


DISTILL = register_stage(StageKind(
    name="distill", options=DistillStage, run=run, check=check, summary=lambda o: o.loss,
    needs_input_model=lambda o: o.teacher == "input",
))  # fmt: skip
