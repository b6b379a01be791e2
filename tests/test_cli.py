"""The `compress` command line end to end on the tiny random Llama (in-process via CliRunner).

`compressor.cli.main` runs with standalone_mode=False and calls sys.exit itself, so CliRunner
sees a SystemExit: the documented exit code is `result.exit_code`, and an escaped exception
would show up as a non-SystemExit `result.exception`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from compressor import runtime
from compressor.artifacts.directory import verify_manifest
from compressor.recipe import load_recipe
from conftest import assert_user_error, invoke




def write_recipe(path, model_dir, output, **quantize) -> None:
    recipe = {
        "model": str(model_dir),
        "data": {"calibration": {"samples": 4, "seq_len": 64}, "evaluation": {"seq_len": 128, "max_windows": 2}},
        "stages": [{"quantize": {"bits": 4, "group_size": 32, **quantize}}],
        "output": str(output),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama_dir):
    """(recipe path, artifact dir, CliRunner result) of one `compress run` on the tiny Llama."""
    root = tmp_path_factory.mktemp("cli")
    recipe, out = root / "tiny.yaml", root / "out"
    write_recipe(recipe, tiny_llama_dir, out)
    result = invoke("run", recipe, "--no-progress")
    return recipe, out, result


def read_report(out):
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------- run
def test_run_writes_the_artifact(artifact):
    recipe, out, result = artifact
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "report.json", "report.md", "layer_errors.png",
                 "recipe.yaml", "manifest.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")], "no temporary directory left"

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, 32, True, False)
    assert qc["meta"]["act_order"] is True and qc["static_groups"] is True  # act-order at quantization, g_idx in order
    assert runtime.is_gptq_artifact(out)
    assert verify_manifest(out) is True
    listed = set(json.loads((out / "manifest.json").read_text())["files"])
    assert listed == {p.name for p in out.iterdir() if p.name != "manifest.json"}

    report = read_report(out)
    ppl = report["perplexity"]
    dense, compressed = ppl["dense"], ppl["compressed"]
    for res in (dense, compressed):
        assert (res["windows"], res["seq_len"], res["tokens"]) == (2, 128, 2 * 127)
        assert res["perplexity"] > 1
    assert compressed["perplexity"] != dense["perplexity"]
    assert ppl["increase"] == pytest.approx(compressed["perplexity"] / dense["perplexity"] - 1)
    assert report["calibration"]["samples"] == 4 and report["calibration"]["seq_len"] == 64
    size = report["size"]
    assert size["artifact_over_ideal"] == pytest.approx(size["artifact_weights_bytes"] / size["ideal_bytes"])
    assert 1.0 <= size["artifact_over_ideal"] < 1.05  # packed, little overhead
    assert 0 < size["artifact_over_dense_fp16"] < 1  # smaller than fp16 (the 49152 x 64 embedding dominates)
    assert size["artifact_weights_bytes"] == (out / "model.safetensors").stat().st_size
    [st] = report["stages"]
    assert st["kind"] == "quantize" and st["options"]["bits"] == 4 and st["options"]["group_size"] == 32
    assert st["measurement"]["seconds"] > 0 and st["measurement"]["peak_rss_mb"] > 0
    assert len(st["layers"]) == 14
    for name, layer in st["layers"].items():
        assert name.startswith("model.layers.") and 0 < layer["relative_error"] < 0.1, name

    md = (out / "report.md").read_text()
    assert f"{compressed['perplexity']:.4f}" in md and f"{dense['perplexity']:.4f}" in md
    assert "layer_errors.png" in md
    assert (out / "layer_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(out / "recipe.yaml") == load_recipe(recipe)  # the resolved recipe, reloadable

    stdout = result.stdout
    assert f"artifact: {out}" in stdout
    assert f"dense {dense['perplexity']:.4f} -> compressed {compressed['perplexity']:.4f}" in stdout


def test_eval_reproduces_the_reported_perplexity(artifact):
    _, out, _ = artifact
    result = invoke("eval", out, "--seq-len", "128", "--max-windows", "2")
    assert result.exit_code == 0, result.output
    m = re.search(r"perplexity (\d+\.\d{4}) on python-docs \(2 windows x 128 tokens, 254 predicted tokens\)", result.stdout)
    assert m, result.stdout
    reported = read_report(out)["perplexity"]["compressed"]["perplexity"]
    # The artifact is the model that was evaluated: same weights (quantized ones exact in float32,
    # the rest rounded to fp16), same kernels, same protocol, so the same number.
    assert m.group(1) == f"{reported:.4f}"
    dense = read_report(out)["perplexity"]["dense"]["perplexity"]
    assert m.group(1) != f"{dense:.4f}"


def test_generate(artifact):
    _, out, _ = artifact
    result = invoke("generate", out, "hello", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    text = result.stdout.rstrip("\n")
    assert text.startswith("hello") and len(text) > len("hello")
    again = invoke("generate", out, "hello", "--max-new-tokens", "5")
    assert again.stdout == result.stdout  # greedy: deterministic


def test_info(artifact):
    _, out, _ = artifact
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    assert "GPTQ artifact, bits=4, group_size=32, sym=True, desc_act=False (quantized in act-order" in result.stdout
    assert re.search(r"manifest: verified \(\d+ files\)", result.stdout), result.stdout
    ppl = read_report(out)["perplexity"]
    assert f"compressed {ppl['compressed']['perplexity']:.4f}" in result.stdout
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert re.match(r"compressor \S+, torch \S+, python \S+\n", result.stdout)
    assert re.search(r"architectures: .*llama.*mistral.*qwen2", result.stdout)


def test_info_on_a_recipe_prints_it_resolved(artifact):
    recipe, _, _ = artifact
    result = invoke("info", recipe)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["stages"][0]["quantize"]["group_size"] == 32
    assert printed["stages"][0]["quantize"]["damp_percent"] == 0.01  # defaults filled in


def test_validate(artifact):
    recipe, out, _ = artifact
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{recipe}: ok: model ")
    assert "(llama)" in result.stdout and "14 linears to compress" in result.stdout
    assert "stages [quantize(gptq)]" in result.stdout and f"output {out}" in result.stdout
    skipped = invoke("validate", recipe, "--set", "stages[0].quantize.skip=['*.down_proj']")
    assert skipped.exit_code == 0 and "12 linears to compress" in skipped.stdout
    assert "warning" not in result.stderr
    dynamic = invoke("validate", recipe, "--set", "stages[0].quantize.static_groups=false")
    assert dynamic.exit_code == 0 and "vLLM refuses" in dynamic.stderr and "static_groups: true" in dynamic.stderr


def test_existing_output_needs_overwrite(artifact, tmp_path):
    recipe, out, _ = artifact
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    manifest = (target / "manifest.json").read_bytes()
    refused = invoke("run", recipe, "--no-progress", "--set", f"output={target}")
    assert_user_error(refused, f"output: {target} already exists", "--overwrite")
    assert (target / "manifest.json").read_bytes() == manifest

    replaced = invoke("run", recipe, "--no-progress", "--overwrite",
                      "--set", f"output={target}", "--set", "data.calibration.samples=2")  # fmt: skip
    assert replaced.exit_code == 0, replaced.output
    assert verify_manifest(target) is True
    assert (target / "manifest.json").read_bytes() != manifest
    report = read_report(target)
    assert report["calibration"]["samples"] == 2  # --set took effect
    assert report["recipe"]["data"]["calibration"]["samples"] == 2
    assert read_report(out)["calibration"]["samples"] == 4  # the original artifact is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy.")], "no temporary directory left"


# -------------------------------------------------------------------------- bad input
def test_bad_bits_in_a_real_process(tmp_path, tiny_llama_dir):
    """The real entry point: exit 2, one line on stderr, no traceback, nothing written."""
    recipe = tmp_path / "bad.yaml"
    write_recipe(recipe, tiny_llama_dir, tmp_path / "out", bits=5)
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {recipe}: stages[0].quantize.bits: 5 is not allowed: input should be 2, 3, 4 or 8\n"
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    for command in ("run", "validate"):
        assert_user_error(invoke(command, missing), f"{missing}: recipe file not found")


def test_missing_model_path(tmp_path):
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, tmp_path / "no-such-model", tmp_path / "out")
    err = assert_user_error(invoke("run", recipe, "--no-progress"), "model.source", str(tmp_path / "no-such-model"))
    assert "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide_the_model(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, tiny_llama_dir, tmp_path / "out", group_size=48)
    for command in ("run", "validate"):
        assert_user_error(invoke(command, recipe), f"{recipe}: stages[0].quantize.group_size: 48 is not allowed", "[64, 128]")
    assert not (tmp_path / "out").exists()


def test_bad_set_override(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, tiny_llama_dir, tmp_path / "out")
    assert_user_error(invoke("validate", recipe, "--set", "stages[2].quantize.bits=3"), "index [2] is out of range")
    assert_user_error(invoke("validate", recipe, "--set", "stages[0].quantize.bits=7"), "stages[0].quantize.bits: 7")


def test_two_quantize_stages(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "r.yaml"
    write_recipe(recipe, tiny_llama_dir, tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data["stages"].append({"quantize": {"bits": 8, "group_size": 32}})
    recipe.write_text(yaml.safe_dump(data))
    assert_user_error(invoke("validate", recipe), f"{recipe}: stages[1]: 'quantize' is not allowed", "at most one quantize stage")


def test_eval_of_a_missing_model(tmp_path):
    assert_user_error(invoke("eval", tmp_path / "nothing-here"), "MODEL", "does not exist")


def test_unknown_command_is_a_usage_error():
    result = invoke("compres")
    assert result.exit_code == 2 and "No such command" in result.stderr


# ------------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "command, specific",
    [
        ([], ["compress run recipes/smollm2-w4g64.yaml", "validate", "generate", "--debug"]),
        (["run"], ["RECIPE", "--overwrite", "--set", "manifest"]),
        (["validate"], ["RECIPE", "group sizes", "--set"]),
        (["eval"], ["MODEL_OR_ARTIFACT", "--seq-len", "--max-windows", "Protocol"]),
        (["generate"], ["PROMPT", "--max-new-tokens", "--temperature", "greedy"]),
        (["info"], ["[PATH]", "artifact or a recipe"]),
    ],
)
def test_help(command, specific):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    for text in specific:
        assert text in result.stdout, text
