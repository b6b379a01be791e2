"""`compress push` and compressor.hub: the model card, the upload plan, and the one-commit upload (fake HfApi)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor import hub
from compressor.cli import main
from compressor.errors import ArtifactError, UserError
from compressor.pipeline import run
from compressor.recipe import load_recipe

REPO = "someone/tiny-w4"


def _recipe(tiny_llama_dir, out: Path, stages: str, *extra: str):
    return load_recipe(None, [
        f"model={tiny_llama_dir}",
        "data.calibration={samples: 4, seq_len: 64}",
        "data.evaluation={seq_len: 128, max_windows: 2}",
        f"stages={stages}",
        f"output={out}",
        *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def gptq_artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "gptq"
    r = _recipe(tiny_llama_dir, out, "[{prune: {method: sparsegpt, sparsity: 0.5}}, {quantize: {group_size: 32}}]")
    return run(r, progress=False).output


@pytest.fixture(scope="module")
def dense_artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "dense"
    r = _recipe(tiny_llama_dir, out, "[{prune: {method: wanda, sparsity: 0.5}}]", "export.format=dense")
    return run(r, progress=False).output


@pytest.fixture
def artifact_copy(gptq_artifact, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(gptq_artifact, dst)
    return dst


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


class FakeApi:
    def __init__(self, exists=False, fail=None):
        self.exists, self.fail, self.calls = exists, fail, []

    def repo_exists(self, repo_id, token=None):
        self.calls.append(("repo_exists", repo_id, token))
        return self.exists

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, branch, token=None, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, token=None, revision=None, commit_message=None):
        if self.fail:
            raise self.fail
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, {"files": files, "revision": revision}))


def _names(calls, name):
    return [c for c in calls if c[0] == name]


def test_card_front_matter_and_metrics(gptq_artifact):
    card = hub.model_card(gptq_artifact, REPO)
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"gptq", "4-bit", "compressor", "pruned", "sparse"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory is not a Hub id
    assert "license" not in meta
    report = json.loads((gptq_artifact / "report.json").read_text())
    ppl = report["perplexity"]
    for name in ("dense", "compressed"):
        assert f"{ppl[name]['perplexity']:.4f}" in card
    assert f"| {ppl['compressed']['windows']} | {ppl['compressed']['seq_len']} | {ppl['compressed']['tokens']} |" in card
    assert str(report["size"]["dense_fp16_bytes"]) in card
    assert "```yaml\n" + (gptq_artifact / "recipe.yaml").read_text().rstrip() + "\n```" in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}"' in card and "gptqmodel" in card
    assert f"vllm serve {REPO}" in card and "runtime.load(" in card and "compress generate" in card
    assert "compress serve" in card and 'base_url="http://127.0.0.1:8000/v1"' in card


def test_card_for_onnx_artifact(gptq_artifact, tmp_path):
    from compressor.export.onnx import export_onnx

    onnx_dir = export_onnx(gptq_artifact, tmp_path / "onnx", progress=False)
    card = hub.model_card(onnx_dir, REPO)
    meta = _front_matter(card)
    assert meta["library_name"] == "onnx"
    assert {"onnx", "MatMulNBits", "gptq", "4-bit", "compressor"} <= set(meta["tags"])
    assert "onnx_runtime.load(path)" in card and "compress serve" in card and "compress generate" in card
    assert "AutoModelForCausalLM" not in card and "vllm serve" not in card  # neither loads an ONNX directory
    assert {"model.onnx", "onnx_config.json", "manifest.json", "README.md"} <= {path for path, _ in hub.plan_upload(onnx_dir, REPO)}


def test_card_for_gguf_artifact(tiny_llama_dir, tmp_path):
    out = run(_recipe(tiny_llama_dir, tmp_path / "gguf", "[{quantize: {group_size: 32}}]", "export.format=gguf"), progress=False).output
    card = hub.model_card(out, REPO)
    meta = _front_matter(card)
    assert meta["library_name"] == "gguf"
    assert {"gguf", "llama.cpp", "Q4_0", "gptq", "4-bit"} <= set(meta["tags"])
    assert f"llama-cli -hf {REPO}" in card and f"ollama run hf.co/{REPO}" in card and 'filename="model.gguf"' in card
    assert "vllm serve" not in card and "runtime.load" not in card
    assert {"model.gguf", "gguf_config.json", "manifest.json", "README.md"} <= {path for path, _ in hub.plan_upload(out, REPO)}
    assert hub.push(out, REPO, dry_run=True, echo=lambda *_: None) == card  # a GGUF artifact (no config.json) is pushable


def test_card_for_compressed_tensors_artifact(gptq_artifact, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressor.export.compressed_tensors import export_compressed_tensors

    out = export_compressed_tensors(gptq_artifact, tmp_path / "ct", progress=False)
    card = hub.model_card(out, REPO)
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert {"compressed-tensors", "W4A16", "quantized"} <= set(meta["tags"]) and "gptq" not in meta["tags"]
    assert f"vllm serve {REPO}" in card and "pip install compressed-tensors" in card
    assert "runtime.load" not in card and "gptqmodel" not in card


def test_card_base_model_and_license(artifact_copy):
    report = json.loads((artifact_copy / "report.json").read_text())
    report["model"]["source"] = "smollm2-135m"
    (artifact_copy / "report.json").write_text(json.dumps(report))
    config = json.loads((artifact_copy / "config.json").read_text())
    config["license"] = "apache-2.0"
    (artifact_copy / "config.json").write_text(json.dumps(config))
    meta = _front_matter(hub.model_card(artifact_copy, REPO))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    report["model"]["source"] = "Org/Some-Model"
    (artifact_copy / "report.json").write_text(json.dumps(report))
    assert _front_matter(hub.model_card(artifact_copy, REPO))["base_model"] == "Org/Some-Model"


def test_card_for_dense_pruned_artifact(dense_artifact):
    card = hub.model_card(dense_artifact, REPO)
    tags = set(_front_matter(card)["tags"])
    assert {"compressor", "pruned", "sparse"} <= tags and "gptq" not in tags
    assert "gptqmodel" not in card and f"vllm serve {REPO}" in card


def test_plan_lists_every_file_and_the_card(gptq_artifact):
    plan = dict(hub.plan_upload(gptq_artifact, REPO))
    files = {p.relative_to(gptq_artifact).as_posix(): p.stat().st_size for p in gptq_artifact.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "manifest.json", "report.json"} <= set(files)
    assert plan == {**files, "README.md": len(hub.model_card(gptq_artifact, REPO).encode())}


def test_dry_run_makes_no_api_call(gptq_artifact, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    api = FakeApi()
    printed = []
    card = hub.push(gptq_artifact, REPO, dry_run=True, api=api, echo=printed.append)
    assert api.calls == []
    assert card == hub.model_card(gptq_artifact, REPO) and card in printed
    assert any(line.endswith("  README.md") for line in printed)


def test_push_uploads_one_folder_with_everything(gptq_artifact, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = FakeApi()
    url = hub.push(gptq_artifact, REPO, private=True, api=api, echo=lambda *_: None)
    assert url == f"https://huggingface.co/{REPO}"
    assert _names(api.calls, "create_repo") == [("create_repo", REPO, {"private": True, "exist_ok": False})]
    uploads = _names(api.calls, "upload_folder")
    assert len(uploads) == 1 and uploads[0][1] == REPO
    files = uploads[0][2]["files"]
    expected = {p.relative_to(gptq_artifact).as_posix(): p.read_bytes() for p in gptq_artifact.rglob("*") if p.is_file()}
    assert files.pop("README.md").decode() == hub.model_card(gptq_artifact, REPO)
    assert files == expected
    assert [c[0] for c in api.calls] == ["repo_exists", "create_repo", "upload_folder"]


def test_push_to_a_branch(gptq_artifact, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = FakeApi(exists=True)
    hub.push(gptq_artifact, REPO, revision="v2", overwrite=True, api=api, echo=lambda *_: None)
    assert _names(api.calls, "create_repo")[0][2]["exist_ok"] is True
    assert _names(api.calls, "create_branch") == [("create_branch", REPO, "v2")]
    assert _names(api.calls, "upload_folder")[0][2]["revision"] == "v2"


def test_missing_token(gptq_artifact, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_token", lambda: None)
    api = FakeApi()
    with pytest.raises(UserError, match="token"):
        hub.push(gptq_artifact, REPO, api=api)
    assert api.calls == []


def test_existing_repo_needs_overwrite(gptq_artifact, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = FakeApi(exists=True)
    with pytest.raises(UserError, match="already exists"):
        hub.push(gptq_artifact, REPO, api=api)
    assert not _names(api.calls, "create_repo") and not _names(api.calls, "upload_folder")


def test_network_failure_is_one_line(gptq_artifact, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(UserError) as err:
        hub.push(gptq_artifact, REPO, api=FakeApi(fail=ConnectionError("connection refused\nmore detail")), echo=lambda *_: None)
    assert "connection refused" in str(err.value) and "\n" not in str(err.value)


def test_corrupted_artifact_is_refused(artifact_copy, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    weights = artifact_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    api = FakeApi()
    with pytest.raises(ArtifactError, match="sha256"):
        hub.push(artifact_copy, REPO, api=api)
    with pytest.raises(ArtifactError):
        hub.push(artifact_copy, REPO, dry_run=True, api=api)
    assert api.calls == []


def test_artifact_without_manifest_is_refused(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest"):
        hub.push(artifact_copy, REPO, dry_run=True)


BAD_REPO_IDS = ["noslash", "a/b/c", "/name", "owner/", "own er/name", "owner/na..me", "owner/na--me", "owner/name.", "o/" + "x" * 97]


@pytest.mark.parametrize("repo_id", BAD_REPO_IDS)
def test_bad_repo_id(gptq_artifact, repo_id):
    with pytest.raises(UserError, match="OWNER/NAME"):
        hub.push(gptq_artifact, repo_id, dry_run=True, api=FakeApi())


@pytest.mark.parametrize("repo_id", BAD_REPO_IDS)
def test_the_recipe_refuses_what_push_would_refuse(repo_id):
    """One rule (compressor.hub_ids): a recipe no longer runs for an hour to be refused at push."""
    from compressor.errors import RecipeError

    with pytest.raises(RecipeError, match="push.repo"):
        load_recipe(None, ["push.repo=" + repo_id])
    assert load_recipe(None, ["push.repo=owner/name-1.2_x"]).push.repo == "owner/name-1.2_x"


def test_cli_push_dry_run(gptq_artifact, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["push", str(gptq_artifact), "--repo", REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "README.md" in result.output and "model.safetensors" in result.output
    assert "library_name: transformers" in result.output


def test_cli_push_bad_repo_exits_2(gptq_artifact):
    result = CliRunner().invoke(main, ["push", str(gptq_artifact), "--repo", "bad", "--dry-run"])
    assert result.exit_code == 2 and "OWNER/NAME" in result.output


def test_recipe_push_section_publishes_only_after_the_artifact_is_complete(tiny_llama_dir, tmp_path, monkeypatch):
    import compressor.hub
    from compressor.pipeline import run
    from compressor.recipe import load_recipe

    calls = []

    def fake_push(artifact_dir, repo_id, **kwargs):
        assert (artifact_dir / "manifest.json").exists()  # the artifact is complete and in place
        calls.append((str(artifact_dir), repo_id, kwargs["private"], kwargs["dry_run"]))

    monkeypatch.setattr(compressor.hub, "push", fake_push)
    recipe = load_recipe(None, [
        f"model={tiny_llama_dir}", "data.calibration={samples: 2, seq_len: 32}",
        "data.evaluation={seq_len: 64, max_windows: 1}", "stages=[{quantize: {group_size: 32}}]",
        f"output={tmp_path / 'out'}", "push={repo: me/tiny, private: true, dry_run: true}",
    ])  # fmt: skip
    run(recipe, progress=False)
    assert calls == [(str(tmp_path / "out"), "me/tiny", True, True)]
