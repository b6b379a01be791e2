"""A stage kind is one module: this file adds a toy kind through the registry alone and runs it.

The toy stage scales every MLP down-projection by a factor. Nothing in compressor/ knows about
it: the recipe accepts it, `compress validate` describes it, README-style docs list its option,
`pipeline.run` runs it and the report records it; removing it makes it an unknown stage again.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import Field

from compressor.errors import RecipeError
from compressor.options import Options
from compressor.pipeline import run, validate
from compressor.recipe import load_recipe, schema_markdown
from compressor.report import StageReport
from compressor.stages import RecipeFacts, StageContext, StageKind, register_stage, stage_kinds, unregister_stage


class ScaleDownProj(Options):
    factor: float = Field(0.5, gt=0, description="Multiply every mlp.down_proj weight by this.")


def _check(facts: RecipeFacts, options: ScaleDownProj, index: int) -> list[str]:
    if options.factor > 10:
        raise RecipeError(facts.recipe_file, f"stages[{index}].scale_down_proj.factor", options.factor, "at most 10")
    return [f"stages[{index}]: the toy stage ran its check on {len(facts.widths)} linears"]


def _run(ctx: StageContext, options: ScaleDownProj, index: int) -> StageReport:
    scaled = {}
    with torch.no_grad():
        for name, module in ctx.model.named_modules():
            if name.endswith("mlp.down_proj"):
                module.weight.mul_(options.factor)
                scaled[name] = {"relative_error": abs(1 - options.factor)}
    return StageReport(layers=scaled)


@pytest.fixture
def toy_kind():
    kind = register_stage(StageKind(name="scale_down_proj", options=ScaleDownProj, run=_run, check=_check,
                                    summary=lambda o: f"x{o.factor}"))  # fmt: skip
    yield kind
    unregister_stage("scale_down_proj")


def _recipe(tiny_llama_dir, out, stages, *extra):
    return load_recipe(None, [
        f"model={tiny_llama_dir}", "data.calibration={samples: 2, seq_len: 32}", "data.evaluation={seq_len: 64, max_windows: 1}",
        f"stages={stages}", f"output={out}", *extra,
    ])  # fmt: skip


def test_a_toy_stage_kind_runs_through_the_registry_alone(toy_kind, tiny_llama_dir, tmp_path):
    assert list(stage_kinds())[-1] == "scale_down_proj"
    assert "| `stages[i].scale_down_proj.factor` | float | `0.5` | Multiply every mlp.down_proj weight by this. |" in schema_markdown()
    stages = "[{scale_down_proj: {factor: 0.25}}, {quantize: {group_size: 32}}]"
    checked = validate(_recipe(tiny_llama_dir, tmp_path / "out", stages))
    assert checked.warnings == [f"stages[0]: the toy stage ran its check on {checked.linears_to_compress} linears"]
    with pytest.raises(RecipeError, match=r"stages\[0\].scale_down_proj.factor: 11.0 is not allowed: at most 10"):
        validate(_recipe(tiny_llama_dir, tmp_path / "out", "[{scale_down_proj: {factor: 11}}, {quantize: {}}]"))

    result = run(_recipe(tiny_llama_dir, tmp_path / "out", stages), progress=False)
    toy, quantize = result.report.stages
    assert toy.kind == "scale_down_proj" and toy.options == {"factor": 0.25} and toy.measurement["seconds"] >= 0
    assert sorted(toy.layers) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert quantize.kind == "quantize" and quantize.layers
    report = json.loads((result.output / "report.json").read_text())
    assert report["stages"][0]["kind"] == "scale_down_proj" and report["recipe"]["stages"][0] == {"scale_down_proj": {"factor": 0.25}}
    assert "scale_down_proj" in (result.output / "recipe.yaml").read_text()


def test_the_toy_stage_changes_the_model(toy_kind, tiny_llama_dir, tmp_path):
    """Its run really ran: the dense export of (x0.25) differs from the model by exactly that factor."""
    from transformers import AutoModelForCausalLM

    result = run(_recipe(tiny_llama_dir, tmp_path / "out", "[{scale_down_proj: {factor: 0.25}}]", "export.format=dense",
                         "evaluate.perplexity=false"), progress=False)  # fmt: skip
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).model.layers[0].mlp.down_proj.weight
    after = AutoModelForCausalLM.from_pretrained(result.output).model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(after.float(), (before * 0.25).half().float())


def test_an_unregistered_kind_is_an_unknown_stage(toy_kind):
    load_recipe(None, ["stages=[{scale_down_proj: {}}]"])
    unregister_stage("scale_down_proj")
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["stages=[{scale_down_proj: {}}]"])
    assert err.value.path == "stages[0]" and "one of: quantize, prune, distill" in str(err.value)


def test_a_toy_kinds_unknown_option_lists_its_keys(toy_kind):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["stages=[{scale_down_proj: {factr: 2}}]"])
    assert err.value.path == "stages[0].scale_down_proj.factr" and "allowed keys: factor" in str(err.value)
