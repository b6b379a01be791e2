"""Artifact directories: integrity manifest and all-or-nothing writes.

`manifest.json` lists every file with its sha256 and size, so a copied or downloaded artifact
can be checked before a model is built from it. `atomic_output_dir` writes into a temporary
sibling and renames it into place at the end, so a failed export never leaves a half-written
directory under the requested name and never destroys a previous artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import ArtifactError, UserError

MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path, data, **dumps_options) -> Path:
    """Write `data` as JSON to `path` through a temporary sibling and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=2, **dumps_options) + "\n")
    os.replace(tmp, path)
    return path


def write_manifest(directory: Path) -> Path:
    """Write `manifest.json` listing every other file under `directory` (sha256 and size)."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST_NAME:
            continue
        files[relative] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = directory / MANIFEST_NAME
    manifest.write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: Path) -> bool:
    """False if there is no manifest, True if every listed file matches; ArtifactError otherwise."""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    for relative, entry in files.items():
        path = directory / relative
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, {MANIFEST_NAME} says {entry['bytes']} (truncated or modified)")
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match {MANIFEST_NAME} (corrupted or modified)")
    return True


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty output unless asked to."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise UserError(f"output: {path} already exists; set export.overwrite: true or pass --overwrite")


def _fresh_sibling(path: Path, tag: str) -> Path:
    """A name next to `path` that does not exist yet, e.g. `.out.tmp-1a2b3c4d`."""
    while True:
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `path` when the block finishes without error."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final renames stay on one filesystem (atomic). mkdir, not mkdtemp:
    # the artifact should get the usual umask permissions, not 0700.
    while True:
        tmp = _fresh_sibling(path, "tmp")
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if not (path.exists() or path.is_symlink()):
        _rename_or_discard(tmp, path)
        return
    # Move the old artifact aside first, so at every moment one complete version exists.
    old = _fresh_sibling(path, "old")
    _rename_or_discard(path, old, discard=tmp)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)


def _rename_or_discard(src: Path, dst: Path, discard: Path | None = None) -> None:
    """Rename `src` to `dst`; if that fails, delete the temporary directory before raising."""
    try:
        os.rename(src, dst)
    except BaseException:
        shutil.rmtree(discard or src, ignore_errors=True)
        raise
