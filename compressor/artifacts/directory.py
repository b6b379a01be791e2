"""Artifact directories: integrity manifest and all-or-nothing writes.

`manifest.json` lists every file with its sha256 and size, so a copied or downloaded artifact
can be checked before a model is built from it: `check_manifest` hashes every listed file, keeps
every path inside the artifact, and refuses files a loader would read that the manifest does not
list. `atomic_output_dir` writes into a temporary sibling and renames it into place at the end,
so a failed export never leaves a half-written directory under the requested name and never
destroys a previous artifact; with `overwrite` it replaces only an earlier artifact (nothing but
the files its manifest lists) or an empty directory, never anything else. The temporary sibling
(`.NAME.tmp-PID-HEX`) is locked while its run lives; one a killed run left is removed by the
next run to the same output.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from compressor.errors import ArtifactError, UserError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "compressor-manifest/1"  # the "format" key: what says a manifest is ours

# Files a loader reads, so one the manifest does not list makes the artifact unverified: weights
# anywhere in the tree, configs, shard indexes, tokenizers and chat templates at the top.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data", ".onnx_data", ".gguf")
_TOP_LEVEL_READ_SUFFIXES = (".json", ".jinja", ".model", ".tiktoken", ".py")


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
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2, sort_keys=True) + "\n")
    return manifest


def _hub_cache_blobs(directory: Path) -> Path | None:
    """For a Hugging Face cache snapshot (models--O--N/snapshots/REV), its repository's blobs/,
    where the snapshot's symbolic links point."""
    root = directory.absolute()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return (root.parent.parent / "blobs").resolve()
    return None


def member_path(directory, relative, where: str) -> Path:
    """`directory / relative`, checked to stay inside the artifact: `relative` is a relative path
    without '..', and the file it resolves to (symbolic links followed) is under `directory` (or
    under a Hugging Face cache snapshot's own blobs/). ArtifactError naming `where` otherwise."""
    directory = Path(directory)
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise ArtifactError(f"{where}: {relative!r} is not a file name inside the artifact")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or pure.parts == (".",):
        raise ArtifactError(f"{where}: {relative!r} leaves the artifact directory {directory}; only paths inside it are allowed")
    path = directory / pure
    resolved, root = path.resolve(), directory.resolve()
    blobs = _hub_cache_blobs(directory)
    if not (resolved.is_relative_to(root) or (blobs is not None and resolved.is_relative_to(blobs))):
        raise ArtifactError(f"{where}: {relative} resolves to {resolved}, outside the artifact directory {root}")
    return path


def _read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's files ({relative path: {"sha256", "bytes"}}), well-formed or ArtifactError."""
    manifest = member_path(directory, MANIFEST_NAME, str(directory))
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        for relative, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
                raise TypeError(f"entry {relative!r} is not {{'sha256': str, 'bytes': int}}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    return files


def _tree_entries(directory: Path) -> list[str]:
    """Relative POSIX paths of everything under `directory` but directories (symbolic links to
    directories included, not followed)."""
    entries = []
    for top, dirs, files in os.walk(directory):
        base = Path(top).relative_to(directory)
        entries += [(base / name).as_posix() for name in files]
        entries += [(base / name).as_posix() for name in dirs if os.path.islink(os.path.join(top, name))]
    return sorted(entries)


def _read_by_loaders(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name.endswith(_WEIGHT_SUFFIXES) or ("/" not in relative and name.endswith(_TOP_LEVEL_READ_SUFFIXES))


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_manifest(directory) -> int | None:
    """Verify the artifact at `directory` against its manifest: None if there is none, else the
    number of files verified. ArtifactError (one line) when a listed path leaves the directory, a
    listed file is missing, truncated or altered, or a file the loaders read (weights, configs,
    shard indexes, tokenizer) is not listed."""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not (manifest.exists() or manifest.is_symlink()):
        return None
    files = _read_manifest(directory)
    listed = {}
    for relative, entry in files.items():
        path = member_path(directory, relative, f"{manifest}")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, {MANIFEST_NAME} says {entry['bytes']} (truncated or modified)")
        listed[PurePosixPath(relative).as_posix()] = (path, entry)
    unlisted = [r for r in _tree_entries(directory) if r != MANIFEST_NAME and r not in listed and _read_by_loaders(r)]
    if unlisted:
        raise ArtifactError(f"{directory}: {_shown(unlisted)} not listed in {MANIFEST_NAME}, so not verified; "
                            "remove what you added or export the artifact again")  # fmt: skip
    for path, entry in listed.values():  # the expensive part last
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match {MANIFEST_NAME} (corrupted or modified)")
    return len(listed)


def verify_manifest(directory: Path) -> bool:
    """False if there is no manifest, True if it verifies (`check_manifest`); ArtifactError otherwise."""
    return check_manifest(directory) is not None


def not_verified(directory) -> str:
    """The warning for an artifact without a manifest."""
    return f"{directory}: not verified: no {MANIFEST_NAME}, so nothing checks its files before they are used"


def verify_for_loading(directory) -> int | None:
    """What the loaders call before reading an artifact: `check_manifest`, and a logged warning
    ("not verified") when there is no manifest."""
    verified = check_manifest(directory)
    if verified is None:
        log.warning("warning: %s", not_verified(directory))
    return verified


# ------------------------------------------------------------------------- output directories
def _not_replaceable(path: Path) -> str | None:
    """Why the non-empty directory `path` is not ours to replace, or None: it holds an artifact
    (our manifest) and nothing its manifest does not list. No hashing: a damaged artifact may go."""
    manifest = path / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        return f"is not a compressor artifact (no {MANIFEST_NAME}) and is not empty"
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        ours = data.get("format") == MANIFEST_FORMAT or set(data) == {"files"}  # earlier manifests had no "format"
        ours = ours and isinstance(files, dict) and all(
            isinstance(e, dict) and set(e) == {"sha256", "bytes"} and re.fullmatch(r"[0-9a-f]{64}", str(e["sha256"]))
            for e in files.values())  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        return f"is not a compressor artifact (its {MANIFEST_NAME} is not one compressor writes) and is not empty"
    listed = {PurePosixPath(r).as_posix() for r in files}
    others = [r for r in _tree_entries(path) if r != MANIFEST_NAME and r not in listed]
    if others:
        return f"holds files its {MANIFEST_NAME} does not list ({_shown(others)}), perhaps yours"
    return None


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if path.is_symlink():
        raise UserError(f"output: {path} is a symbolic link; refusing to write through or replace it; "
                        "give the directory itself or another output")  # fmt: skip
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"output: {path} is a file, not a directory; refusing to replace it; choose another output or remove it yourself")
    if not any(path.iterdir()):
        return
    why = _not_replaceable(path)
    if why is not None:
        flag = " with --overwrite" if overwrite else ""
        raise UserError(f"output: {path} {why}; refusing to replace it{flag}; choose another output or remove it yourself")
    if not overwrite:
        raise UserError(f"output: {path} already exists; set export.overwrite: true or pass --overwrite")


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an output that may not be written: an existing artifact unless `overwrite`, and never
    a non-empty directory that is not an artifact, a file or a symbolic link. First removes the
    temporary directories a killed run to this output left (`remove_stale_temporaries`)."""
    path = Path(path)
    remove_stale_temporaries(path)
    _check_replaceable(path, overwrite)


_TMP = "tmp"


def _stale_pattern(path: Path) -> re.Pattern:
    # `.NAME.tmp-PID-HEX`, and `.NAME.tmp-PID-HEX.SOMETHING` that a run made beside it
    return re.compile(rf"\.{re.escape(path.name)}\.{_TMP}-(\d+)-[0-9a-f]{{8}}(\..+)?")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or a number that is no pid
        return True
    return True


def _lock(directory: Path) -> int | None:
    """A file descriptor holding an exclusive lock on `directory` (released when closed or when the
    process dies), or None when it is held elsewhere or locks are not available here."""
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            log.debug("%s: no lock (%s)", directory, exc)
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-PID-HEX[.*]`) that a killed run to `path` left beside
    it; return them. Only ones that are clearly stale: real directories or files of this user,
    whose process is gone, and (directories) whose temporary directory nobody holds locked."""
    path = Path(path)
    pattern, removed = _stale_pattern(path), []
    try:
        entries = sorted(os.scandir(path.parent), key=lambda e: e.name)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        try:
            if not match or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
        except OSError:
            continue
        pid = int(match[1])
        if _pid_alive(pid) or not (is_dir or is_file):
            continue
        if is_file:  # a single-file export (GGUF) writes its temporary beside the output
            Path(entry.path).unlink(missing_ok=True)
            log.info("removed %s, left by a run that ended without cleaning up (process %d is gone)", entry.path, pid)
            removed.append(Path(entry.path))
            continue
        base = path.parent / (entry.name[: -len(match[2])] if match[2] else entry.name)
        lock = _lock(base) if base.is_dir() else None
        if base.is_dir() and lock is None:
            continue  # held (or cannot tell): not ours to remove
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            if lock is not None:
                os.close(lock)
        log.info("removed %s, left by a run that ended without cleaning up (process %d is gone)", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden temporary name beside `path` that `remove_stale_temporaries` recognises once
    its process is gone (for outputs that are one file, written then renamed into place)."""
    return _fresh_sibling(Path(path), _TMP)


def _fresh_sibling(path: Path, tag: str, hidden: bool = True) -> Path:
    """A name next to `path` that does not exist yet, e.g. `.out.tmp-4242-1a2b3c4d` (this process's
    id, so a leftover can be told stale) or, not hidden, `out.new-1a2b3c4d`."""
    while True:
        name = f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}" if hidden else f"{path.name}.{tag}-{secrets.token_hex(4)}"
        candidate = path.parent / name
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `path` when the block finishes without error.

    `path` is checked (`check_output_dir`) before and again just before the rename: if it became
    something that may not be replaced meanwhile, the new artifact is kept beside it and the
    UserError says where."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final renames stay on one filesystem (atomic). mkdir, not mkdtemp:
    # the artifact should get the usual umask permissions, not 0700.
    while True:
        tmp = _fresh_sibling(path, _TMP)
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    lock = _lock(tmp)  # tells the next run to this output that `tmp` is in use
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _put_in_place(tmp, path, overwrite)
    finally:
        if lock is not None:
            os.close(lock)


def _put_in_place(tmp: Path, path: Path, overwrite: bool) -> None:
    try:
        _check_replaceable(path, overwrite)  # again: the run may have taken hours
    except UserError as exc:
        kept = _fresh_sibling(path, "new", hidden=False)
        _rename_or_discard(tmp, kept)
        raise UserError(f"{exc}; the new artifact is kept at {kept}") from None
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
