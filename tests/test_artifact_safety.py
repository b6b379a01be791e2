"""Issue 16, items 3, 4 and 7: `--overwrite` never deletes what is not an artifact; the manifest
means "verified"; a killed run's temporary directory is removed by the next run; file modes
follow the umask.

One `compress run` on the tiny random Llama (sharded into 1 MB files, so the shard index and
the oversized-tensor writer are exercised) gives the artifact the verification tests damage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compressor import runtime
from compressor.artifacts.directory import (
    atomic_output_dir,
    check_manifest,
    check_output_dir,
    remove_stale_temporaries,
    verify_manifest,
    write_manifest,
)
from compressor.errors import ArtifactError, UserError
from conftest import assert_user_error, invoke
from test_cli import write_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_recipe(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("safety")
    recipe = root / "tiny.yaml"
    write_recipe(recipe, tiny_llama_dir, root / "out")
    return recipe


@pytest.fixture(scope="module")
def artifact(run_recipe):
    """A sharded GPTQ artifact written by `compress run` under umask 022."""
    out = run_recipe.parent / "sharded"
    previous = os.umask(0o022)
    try:
        result = invoke("run", run_recipe, "--no-progress", "--set", f"output={out}", "--set", "export.max_shard_size=1MB")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target)
    return target


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _edit_manifest(artifact: Path, **entries) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"].update(entries)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------ --overwrite (item 3)
def test_overwrite_refuses_a_directory_that_is_not_an_artifact(run_recipe, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for flags in (["--overwrite"], []):
        refused = invoke("run", run_recipe, "--no-progress", "--set", f"output={precious}", *flags)
        assert_user_error(refused, f"output: {precious} is not a compressor artifact (no manifest.json) and is not empty",
                          "refusing to replace it", "remove it yourself")  # fmt: skip
        assert "--overwrite" in refused.stderr if flags else "set export.overwrite" not in refused.stderr
    # checked before anything else of the run: even before the model is looked at
    early = invoke("run", run_recipe, "--overwrite", "--set", f"output={precious}", "--set", f"model={tmp_path / 'no-model'}")
    assert_user_error(early, f"output: {precious} is not a compressor artifact")
    # the recipe's export.overwrite is the same switch
    recipe_flag = invoke("run", run_recipe, "--set", f"output={precious}", "--set", "export.overwrite=true")
    assert_user_error(recipe_flag, f"output: {precious} is not a compressor artifact")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary directory either


def test_overwrite_replaces_an_empty_directory_and_an_artifact(run_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = invoke("run", run_recipe, "--no-progress", "--set", f"output={out}")  # empty: no --overwrite needed
    assert first.exit_code == 0, first.output
    assert verify_manifest(out) is True
    manifest = (out / "manifest.json").read_bytes()
    assert json.loads(manifest)["format"] == "compressor-manifest/1"
    second = invoke("run", run_recipe, "--no-progress", "--overwrite", "--set", f"output={out}", "--set", "data.calibration.samples=2")
    assert second.exit_code == 0, second.output
    assert verify_manifest(out) is True and (out / "manifest.json").read_bytes() != manifest
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_refuses_an_artifact_holding_files_it_does_not_list(copy):
    (copy / "notes.txt").write_text("mine")
    (copy / "sub").mkdir()
    (copy / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"holds files its manifest.json does not list \(notes.txt, sub/data.csv\)"):
        check_output_dir(copy, overwrite=True)
    (copy / "notes.txt").unlink()
    shutil.rmtree(copy / "sub")
    check_output_dir(copy, overwrite=True)  # nothing of the user's left: it may go


@pytest.mark.parametrize("manifest", ['{"name": "my web app", "icons": []}', "not json", '{"files": {"a": "b"}}'])
def test_overwrite_refuses_a_manifest_that_is_not_ours(tmp_path, manifest):
    target = tmp_path / "site"
    target.mkdir()
    (target / "manifest.json").write_text(manifest)
    with pytest.raises(UserError, match="is not a compressor artifact .its manifest.json is not one compressor writes"):
        check_output_dir(target, overwrite=True)


def test_earlier_manifests_without_a_format_key_are_still_ours(tmp_path):
    target = tmp_path / "old"
    target.mkdir()
    (target / "config.json").write_text("{}")
    write_manifest(target)
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["format"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    check_output_dir(target, overwrite=True)


def test_overwrite_refuses_a_file_and_a_symbolic_link(tmp_path):
    file = tmp_path / "model.bin"
    file.write_text("mine")
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(real)
    dangling.symlink_to(tmp_path / "nowhere")
    for overwrite in (True, False):
        with pytest.raises(UserError, match="is a file, not a directory; refusing to replace it"):
            with atomic_output_dir(file, overwrite):
                pass
        for symlink in (link, dangling):
            with pytest.raises(UserError, match="is a symbolic link; refusing"):
                with atomic_output_dir(symlink, overwrite):
                    pass
    assert file.read_text() == "mine" and (real / "keep.txt").read_text() == "mine" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "model.bin", "real"]


def test_output_that_changes_during_the_run_is_checked_again(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(UserError, match=r"out is not a compressor artifact.*; the new artifact is kept at .*out\.new-"):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            target.mkdir()
            (target / "notes.txt").write_text("mine")  # appeared while the run wrote
    assert (target / "notes.txt").read_text() == "mine"
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert (kept / "config.json").read_text() == "{}"


# ------------------------------------------------------------ verification (item 4)
def test_unlisted_weight_file_is_an_error(copy):
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shutil.copy(shard, copy / "extra.safetensors")  # loaded alongside, it would override weights
    with pytest.raises(ArtifactError, match="extra.safetensors not listed in manifest.json"):
        runtime.load(copy)
    assert_user_error(invoke("info", copy), "extra.safetensors not listed in manifest.json")
    (copy / "extra.safetensors").unlink()
    assert check_manifest(copy) > 0
    (copy / "tokenizer.model").write_text("x")  # other files a loader reads count too
    with pytest.raises(ArtifactError, match="tokenizer.model not listed"):
        check_manifest(copy)


def test_shard_index_pointing_outside_is_an_error(copy, tmp_path):
    index_file = copy / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(copy / first, outside / first)
    for target in (f"../outside/{first}", str(outside / first)):
        moved = {name: (target if file == first else file) for name, file in index["weight_map"].items()}
        index_file.write_text(json.dumps({**index, "weight_map": moved}))
        write_manifest(copy)  # the manifest agrees: the index itself must be refused
        with pytest.raises(ArtifactError, match="leaves the artifact directory"):
            runtime.load(copy)
        with pytest.raises(ArtifactError, match="leaves the artifact directory"):
            runtime.load(copy, verify=False)  # with or without a manifest
    # a name inside the artifact that is a symbolic link out of it
    index_file.write_text(json.dumps(index))
    (copy / first).unlink()
    (copy / first).symlink_to(outside / first)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        runtime.load(copy, verify=False)
    write_manifest(copy)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        check_manifest(copy)


def test_onnx_graph_linked_from_outside_is_an_error(tmp_path):
    pytest.importorskip("onnxruntime")
    from compressor.runtime import onnx as onnx_runtime

    art, outside = tmp_path / "onnx", tmp_path / "elsewhere.onnx"
    art.mkdir()
    outside.write_bytes(b"not a graph")
    (art / "model.onnx").symlink_to(outside)
    (art / "onnx_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="model.onnx resolves to .*elsewhere.onnx, outside the artifact directory"):
        onnx_runtime.load(art, verify=False)


def test_manifest_entries_must_stay_inside_the_artifact(copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the artifact's")
    cases = {"../secret.txt": "leaves the artifact directory", "../../../etc/hostname": "leaves the artifact directory",
             str(secret): "leaves the artifact directory"}  # fmt: skip
    for entry, message in cases.items():
        shutil.copy(copy / "manifest.json", tmp_path / "manifest.bak")
        _edit_manifest(copy, **{entry: _entry(secret)})  # the right hash: only the path is wrong
        with pytest.raises(ArtifactError, match=message):
            verify_manifest(copy)
        assert_user_error(invoke("info", copy), message)
        shutil.copy(tmp_path / "manifest.bak", copy / "manifest.json")
    (copy / "link.txt").symlink_to(secret)
    _edit_manifest(copy, **{"link.txt": _entry(secret)})
    with pytest.raises(ArtifactError, match="link.txt resolves to .*secret.txt, outside the artifact directory"):
        verify_manifest(copy)


def test_info_verifies_every_file(copy):
    ok = invoke("info", copy)
    listed = len(json.loads((copy / "manifest.json").read_text())["files"])
    assert ok.exit_code == 0 and f"manifest: verified ({listed} files)" in ok.stdout, ok.output

    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01  # bit flip inside tensor data: the file still parses
    shard.write_bytes(bytes(data))
    assert_user_error(invoke("info", copy), f"{shard}: sha256 does not match manifest.json")
    shard.write_bytes(original[:-100])
    assert_user_error(invoke("info", copy), f"{shard}: {len(original) - 100} bytes, manifest.json says {len(original)} (truncated")


def test_missing_manifest_is_a_visible_warning(copy, caplog):
    (copy / "manifest.json").unlink()
    info = invoke("info", copy)
    assert info.exit_code == 0, info.output
    assert "manifest: none (not verified)" in info.stdout
    assert info.stderr == f"warning: {copy}: not verified: no manifest.json, so nothing checks its files before they are used\n"

    with caplog.at_level(logging.WARNING):
        result = invoke("eval", copy, "--seq-len", "32", "--max-windows", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{copy}: not verified: no manifest.json" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = invoke("generate", copy, "hi", "--max-new-tokens", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{copy}: not verified: no manifest.json" in caplog.text


def test_missing_manifest_warning_reaches_stderr(copy):
    """The real entry point, where logging goes to stderr (what a user sees)."""
    (copy / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "generate", str(copy), "hi", "--max-new-tokens", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {copy}: not verified: no manifest.json" in proc.stderr


def test_loading_hashes_each_file_once(copy, monkeypatch):
    from compressor.artifacts import directory

    hashed = []
    real = directory._sha256
    monkeypatch.setattr(directory, "_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    result = invoke("generate", copy, "hi", "--max-new-tokens", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(hashed) == sorted(json.loads((copy / "manifest.json").read_text())["files"])


# --------------------------------------------------- temporary directories and modes (item 7)
_HOLD = """
import sys, time
from pathlib import Path
from compressor.artifacts.directory import atomic_output_dir
with atomic_output_dir(Path(sys.argv[1]), False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_a_killed_runs_temporary_directory_is_removed_by_the_next_run(run_recipe, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        left = Path(proc.stdout.readline().strip())
        assert re.fullmatch(rf"\.out\.tmp-{proc.pid}-[0-9a-f]{{8}}", left.name), left
        assert remove_stale_temporaries(out) == [] and left.is_dir()  # in use by a live process: kept
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert left.is_dir()  # kill -9: nothing cleaned up
    beside = tmp_path / f"{left.name}.gptq-for-onnx-abc"  # a converter's GPTQ copy beside it
    beside.mkdir()
    # not ours to remove: a live process's, one held locked, an older run's name without a
    # process id, another output's
    dead = _dead_pid()
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    locked = tmp_path / f".out.tmp-{dead}-89abcdef"
    legacy, other = tmp_path / ".out.tmp-deadbeef", tmp_path / f".other.tmp-{dead}-deadbeef"
    for keep in (live, locked, legacy, other):
        keep.mkdir()
    import fcntl

    held = os.open(locked, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        result = invoke("run", run_recipe, "--no-progress", "--set", f"output={out}")
    finally:
        os.close(held)
    assert result.exit_code == 0, result.output
    assert not left.exists() and not beside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, locked.name, legacy.name, other.name])
    assert remove_stale_temporaries(out) == [locked]  # its lock is gone now


def test_temporary_directory_carries_the_pid_and_is_locked(tmp_path):
    import fcntl

    with atomic_output_dir(tmp_path / "x", False) as tmp:
        assert re.fullmatch(rf"\.x\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_file_modes_follow_the_umask(artifact):
    shards = sorted(artifact.glob("model-*.safetensors"))
    assert len(shards) > 1 and (artifact / "model.safetensors.index.json").is_file()  # the oversized embedding alone too
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in artifact.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o755


def test_a_dense_artifact_is_verified_before_eval_loads_it(tiny_llama_dir, tmp_path):
    """Dense (and compressed-tensors) artifacts load through models.load_any: a manifest there is checked too."""
    import shutil

    from compressor.artifacts.directory import write_manifest
    from compressor.errors import ArtifactError
    from compressor.models import load_any

    artifact = tmp_path / "dense"
    shutil.copytree(tiny_llama_dir, artifact)
    write_manifest(artifact)
    load_any(str(artifact), device="cpu")  # verifies
    weights = next(artifact.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_any(str(artifact), device="cpu")


def test_a_killed_gguf_exports_temporary_file_is_removed_by_the_next_export(tmp_path, monkeypatch):
    """`compress export --format gguf` writes one file through a `.NAME.tmp-PID-HEX` temporary: a
    killed export's is removed by the next export to the same file, a live process's is kept."""
    from compressor.export import gguf

    output = tmp_path / "model.gguf"
    stale = tmp_path / f".model.gguf.tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".model.gguf.tmp-{os.getpid()}-89abcdef"
    for left in (stale, live):
        left.write_bytes(b"half a gguf")
    made = []

    def fake_write(artifact, tmp, progress, name):
        made.append(tmp)
        tmp.write_bytes(b"GGUF")
        return {}

    monkeypatch.setattr("compressor.export.gptq.check_conversion_source", lambda artifact, output: None)
    monkeypatch.setattr(gguf, "write_gguf", fake_write)
    gguf.export_gguf(tmp_path / "artifact", output, progress=False)
    assert output.read_bytes() == b"GGUF" and not stale.exists() and live.exists()
    assert re.fullmatch(rf"\.model\.gguf\.tmp-{os.getpid()}-[0-9a-f]{{8}}", made[0].name)
