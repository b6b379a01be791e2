"""Recipe loading: the schema, every error class, `--set` overrides and the generated docs.

Every recipe error must reach the user as ONE line naming the file, the key path, the bad value
and what is allowed, so each test below checks all four pieces of the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import RecipeError, UserError
from compressor.quantize import QuantizeStage
from compressor.recipe import Recipe, load_recipe, schema_markdown, split_key_path
from compressor.stages import stage_kinds
from compressor.stages.quantize import check_group_size

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def recipe_error(tmp_path: Path, text: str, overrides: list[str] = ()) -> tuple[RecipeError, str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "a recipe error is one line"
    assert message.startswith(f"{path}: "), "the message names the file first"
    return info.value, message, path


# ------------------------------------------------------------------------------ loading
def test_full_recipe_loads_with_every_value(tmp_path):
    path = write(
        tmp_path,
        """
model: {source: some/model, dtype: float16, device: cpu}
data:
  calibration: {source: wikitext2, samples: 16, seq_len: 256, seed: 3}
  evaluation: {source: python-docs, seq_len: 1024, max_windows: 4}
stages:
  - quantize: {method: rtn, bits: 3, group_size: -1, static_groups: false, sym: false, skip: ["*.down_proj"]}
evaluate: {dense: false}
export: {max_shard_size: 500MB}
compute: {calibration_batch_size: 4, threads: 2}
output: runs/x
""",
    )
    r = load_recipe(path)
    assert (r.model.source, r.model.dtype, r.model.device) == ("some/model", "float16", "cpu")
    assert (r.data.calibration.source, r.data.calibration.samples, r.data.calibration.seq_len) == ("wikitext2", 16, 256)
    assert r.data.calibration.seed == 3 and r.data.evaluation.max_windows == 4
    [(kind, q)] = r.stage_list()
    assert kind == "quantize"
    assert (q.method, q.bits, q.group_size, q.sym, q.static_groups) == ("rtn", 3, -1, False, False)
    assert q.skip == ["*.down_proj"] and q.desc_act is True  # an unset option keeps its default
    assert r.evaluate.dense is False and r.evaluate.perplexity is True
    assert r.export.max_shard_size == "500MB"
    assert (r.compute.calibration_batch_size, r.compute.threads) == (4, 2)
    assert r.output == "runs/x"


def test_an_explicit_empty_mapping_and_no_file_give_the_defaults(tmp_path):
    """An empty *file* is an error (tests/test_input_hardening.py): it is more likely an accident."""
    assert load_recipe(write(tmp_path, "{}\n")) == Recipe()
    assert load_recipe(None) == Recipe()
    defaults = Recipe()
    [(kind, q)] = defaults.stage_list()
    assert kind == "quantize" and q == QuantizeStage()
    assert defaults.model.source == "smollm2-135m" and q.bits == 4 and q.skip == ["lm_head"]


def test_model_string_is_shorthand_for_source(tmp_path):
    short = load_recipe(write(tmp_path, "model: smollm2-135m\n", "a.yaml"))
    long = load_recipe(write(tmp_path, "model: {source: smollm2-135m}\n", "b.yaml"))
    assert short == long
    assert short.model.source == "smollm2-135m"
    other = load_recipe(write(tmp_path, "model: ./elsewhere\n", "c.yaml"))
    assert other.model.source == "./elsewhere" and other.model.dtype == "auto"


def test_shipped_recipes_load():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "the repository ships at least one recipe"
    for path in recipes:
        r = load_recipe(path)
        assert r.stage_list(), path
    smollm2 = load_recipe(REPO / "recipes" / "smollm2-w4g64.yaml")
    [(_, q)] = smollm2.stage_list()
    assert (q.bits, q.group_size, q.desc_act, q.static_groups, q.mse) == (4, 64, True, True, True)
    assert smollm2.model.source == "smollm2-135m"


def test_schema_markdown_documents_every_option():
    md = schema_markdown()
    for name, field in QuantizeStage.model_fields.items():
        assert f"`stages[i].quantize.{name}`" in md, name
        assert field.description and field.description in md, name
    for key in ("model.source", "data.calibration.samples", "data.evaluation.seq_len", "evaluate.dense",
                "export.max_shard_size", "compute.calibration_batch_size", "output"):  # fmt: skip
        assert f"`{key}`" in md, key


# ------------------------------------------------------------------------------- errors
def test_unknown_top_level_key(tmp_path):
    exc, msg, _ = recipe_error(tmp_path, "model: smollm2-135m\nstagez: []\n")
    assert exc.path == "stagez"
    assert "stagez: [] is not allowed: unknown key" in msg


def test_unknown_nested_key(tmp_path):
    exc, msg, _ = recipe_error(tmp_path, "stages:\n  - quantize: {bits: 4, bitz: 3}\n")
    assert exc.path == "stages[0].quantize.bitz" and exc.value == 3
    assert "stages[0].quantize.bitz: 3 is not allowed: unknown key" in msg


def test_unknown_key_message_lists_the_allowed_keys(tmp_path):
    _, msg, _ = recipe_error(tmp_path, "stages:\n  - quantize: {bitz: 3}\n")
    assert "bits" in msg.split("bitz", 2)[-1] and "group_size" in msg


def test_wrong_type(tmp_path):
    exc, msg, _ = recipe_error(tmp_path, 'data:\n  calibration: {samples: "many"}\n')
    assert exc.path == "data.calibration.samples" and exc.value == "many"
    assert "data.calibration.samples: 'many' is not allowed:" in msg
    assert "valid integer" in msg


@pytest.mark.parametrize(
    "text, path, value, allowed",
    [
        ("stages: [{quantize: {bits: 5}}]", "stages[0].quantize.bits", 5, "2, 3, 4 or 8"),
        ("stages: [{quantize: {group_size: 0}}]", "stages[0].quantize.group_size", 0, "-1 or a positive integer"),
        ("stages: [{quantize: {group_size: -3}}]", "stages[0].quantize.group_size", -3, "-1 or a positive integer"),
        ("data: {calibration: {samples: -1}}", "data.calibration.samples", -1, "greater than or equal to 1"),
        ("stages: [{quantize: {damp_percent: 2}}]", "stages[0].quantize.damp_percent", 2, "less than 1"),
        ("data: {evaluation: {seq_len: 4}}", "data.evaluation.seq_len", 4, "greater than or equal to 8"),
        ("export: {max_shard_size: lots}", "export.max_shard_size", "lots", "'2GB'"),
    ],
)
def test_out_of_range(tmp_path, text, path, value, allowed):
    exc, msg, _ = recipe_error(tmp_path, text + "\n")
    assert exc.path == path and exc.value == value
    assert f"{path}: {value!r} is not allowed: " in msg
    assert allowed in msg


def test_cross_field_rules_are_located_at_the_stage(tmp_path):
    exc, msg, _ = recipe_error(tmp_path, "stages: [{quantize: {group_size: -1}}]\n")
    assert exc.path == "stages[0].quantize" and "static_groups needs a group_size other than -1" in msg
    exc, msg, _ = recipe_error(tmp_path, "stages: [{quantize: {damp_percent: 0.5, max_damp_percent: 0.1}}]\n")
    assert exc.path == "stages[0].quantize" and "max_damp_percent must be >= damp_percent" in msg
    # group_size -1 is fine once static groups are off
    r = load_recipe(write(tmp_path, "stages: [{quantize: {group_size: -1, static_groups: false}}]\n", "ok.yaml"))
    assert r.stages[0].quantize.group_size == -1


@pytest.mark.parametrize(
    "stage, value",
    [
        ("{quantize: {bits: 4}, prune: {sparsity: 0.5}}", {"quantize": {"bits": 4}, "prune": {"sparsity": 0.5}}),
        ("{quantise: {bits: 4}}", {"quantise": {"bits": 4}}),
        ("quantize", "quantize"),
    ],
    ids=["two-keys", "unknown-kind", "not-a-mapping"],
)
def test_bad_stage(tmp_path, stage, value):
    exc, msg, _ = recipe_error(tmp_path, f"stages:\n  - quantize: {{bits: 4}}\n  - {stage}\n")
    assert exc.path == "stages[1]" and exc.value == value
    assert f"stages[1]: {value!r} is not allowed: " in msg
    assert "each stage is a mapping with exactly one key, one of: " in msg
    for kind in stage_kinds():
        assert kind in msg.split("one of: ")[1]


def test_group_size_must_divide_the_layer_widths():
    r = load_recipe(None, ["stages[0].quantize.group_size=128"])
    with pytest.raises(RecipeError) as info:
        check_group_size(r.stage_list()[0][1], 0, {"a.q_proj": 576, "a.down_proj": 1536, "b.q_proj": 576}, "my.yaml")
    exc, msg = info.value, str(info.value)
    assert exc.path == "stages[0].quantize.group_size" and exc.value == 128
    assert msg.startswith("my.yaml: stages[0].quantize.group_size: 128 is not allowed: ")
    assert "[576, 1536]" in msg and "-1" in msg
    assert "64" in msg.split("e.g.")[1]  # suggests group sizes that do divide both
    assert "\n" not in msg
    # the ones that divide pass
    for ok in (64, 192, -1):
        r = load_recipe(None, [f"stages[0].quantize.group_size={ok}", "stages[0].quantize.static_groups=false"])
        check_group_size(r.stage_list()[0][1], 0, {"a": 576, "b": 1536})


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_recipe(missing)
    assert str(info.value) == f"{missing}: recipe file not found"


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\nstages:\n  - quantize: {bits: 4\noutput: x\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid YAML at line ")
    assert "line 4," in msg and "\n" not in msg
    path = write(tmp_path, "a: b\n c: d\n", "indent.yaml")
    with pytest.raises(UserError, match=r"not valid YAML at line 2, column 3"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- quantize\n- prune\n", "just a string\n", "42\n"])
def test_recipe_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: a recipe is a mapping of sections (model, data, stages, ...)"


# ---------------------------------------------------------------------------- overrides
def test_set_bracket_and_dotted_index(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\nstages: [{quantize: {bits: 4, group_size: 32}}]\n")
    for key in ("stages[0].quantize.bits", "stages.0.quantize.bits"):
        r = load_recipe(path, [f"{key}=3"])
        q = r.stages[0].quantize
        assert q.bits == 3 and q.group_size == 32  # the rest of the stage is kept
    assert split_key_path("stages[0].quantize.bits") == split_key_path("stages.0.quantize.bits") == [
        "stages", 0, "quantize", "bits"
    ]


def test_set_fills_sections_the_recipe_never_wrote(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\n")
    r = load_recipe(path, ["data.calibration.samples=8", "stages[0].quantize.bits=8"])
    assert r.data.calibration.samples == 8
    assert r.data.calibration.seq_len == 512  # the rest from the defaults
    assert r.stages[0].quantize.bits == 8 and r.stages[0].quantize.group_size == 64


def test_set_model_string_then_a_model_key(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\n")
    r = load_recipe(path, ["model=foo/bar", "model.dtype=float16"])
    assert (r.model.source, r.model.dtype) == ("foo/bar", "float16")
    r = load_recipe(path, ["model.dtype=bfloat16"])  # the string shorthand becomes a mapping
    assert (r.model.source, r.model.dtype) == ("smollm2-135m", "bfloat16")


def test_set_values_are_yaml(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\n")
    r = load_recipe(path, ["model.trust_remote_code=true", "stages[0].quantize.skip=[a, b]",
                           "stages[0].quantize.damp_percent=0.05", "output=runs/with=sign"])  # fmt: skip
    assert r.model.trust_remote_code is True
    assert r.stages[0].quantize.skip == ["a", "b"]
    assert r.stages[0].quantize.damp_percent == 0.05
    assert r.output == "runs/with=sign"  # only the first '=' separates key and value


def test_set_value_is_validated_like_the_file(tmp_path):
    path = write(tmp_path, "model: smollm2-135m\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages[0].quantize.bits=5"])
    assert info.value.path == "stages[0].quantize.bits" and str(info.value).startswith(f"{path}: ")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["data.calibration.samplez=5"])
    assert info.value.path == "data.calibration.samplez"


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("stages[3].quantize.bits=3", "--set stages[3].quantize.bits: index [3] is out of range"),
        ("stages.1.quantize.bits=3", "--set stages.1.quantize.bits: index [1] is out of range"),
        ("stages[0]..bits=3", "--set stages[0]..bits: malformed key path"),
        ("stages[x].quantize.bits=3", "--set stages[x].quantize.bits: malformed key path"),
        ("stages[0].quan-tize.bits=3", "--set stages[0].quan-tize.bits: malformed key path"),
        ("stages[0].quantize.bits", "--set stages[0].quantize.bits: expected KEY.PATH=VALUE"),
        ("output.name=x", "--set output.name: output is not a mapping"),
        ("output.a.b=x", "--set output.a.b: 'a' is below a value that is not a mapping"),
    ],
)
def test_set_errors(tmp_path, assignment, expected):
    path = write(tmp_path, "model: smollm2-135m\nstages: [{quantize: {bits: 4}}]\noutput: runs/a\n")
    with pytest.raises(UserError) as info:
        load_recipe(path, [assignment])
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)
