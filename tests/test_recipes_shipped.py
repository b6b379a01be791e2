"""The shipped recipes stay in step with the schema."""

from pathlib import Path

import yaml

from compressor.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_reference_recipe_spells_out_every_default():
    # reference.yaml documents every option with its default: if a field is added or a default
    # changes in compressor/recipe.py, this fails until the reference is updated.
    reference = load_recipe(RECIPES / "reference.yaml")
    assert reference == Recipe(output="runs/reference")
    raw = yaml.safe_load((RECIPES / "reference.yaml").read_text())
    assert raw == Recipe(output="runs/reference").model_dump(mode="json")


def test_default_recipe_is_the_documented_embedded_default():
    r = load_recipe(RECIPES / "smollm2-w4g64.yaml")
    assert r.model.source == "smollm2-135m"
    (kind, q), = r.stage_list()
    assert (kind, q.method, q.bits, q.group_size, q.sym) == ("quantize", "gptq", 4, 64, True)
    assert (r.data.calibration.samples, r.data.calibration.seq_len) == (64, 512)
    assert r.output == "runs/smollm2-w4g64"


def test_readme_option_table_is_generated_from_the_schema():
    # README's option table is `python -m compressor.recipe`; regenerate it when the schema changes.
    from compressor.recipe import schema_markdown

    readme = (RECIPES.parent / "README.md").read_text()
    assert schema_markdown() in readme
