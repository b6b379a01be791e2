"""Build the CUDA kernels into a plain shared library on first use and load it with ctypes.

Why not a torch C++/CUDA extension: those compile against torch's headers and ABI (minutes per
build, rebuilt for every torch version, fragile across the torch/CUDA pairs users have). The
kernels need nothing from torch: extern "C" launchers take raw device pointers, sizes and the
caller's cudaStream_t, so one `nvcc -shared` call produces a library any torch can drive.

The library is cached under $COMPRESSOR_KERNEL_CACHE (default ~/.cache/compressor/kernels)/<key>/,
the key hashing the sources, the nvcc version and the flags; a build happens once per machine and
source change, behind a file lock, written to a temporary name and renamed. Nothing is compiled
or loaded when this module is imported.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("gemv.cu", "mma.cu")
HEADERS = ("common.h",)
DEFAULT_ARCHS = ("80", "90")  # A100, H100/H200; compute_90 PTX is embedded too for newer GPUs
BASE_FLAGS = ("-std=c++17", "-O3", "--threads", "0", "-Xcompiler", "-fPIC")
LIBRARY_NAME = "libcompressor_kernels.so"


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here (no nvcc, compile error, old GPU, ...)."""


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def archs() -> tuple[str, ...]:
    """Target SM versions: $COMPRESSOR_CUDA_ARCHS ("80;90" or "80,90") or DEFAULT_ARCHS."""
    env = os.environ.get("COMPRESSOR_CUDA_ARCHS")
    if not env:
        return DEFAULT_ARCHS
    return tuple(a.strip() for a in env.replace(",", ";").split(";") if a.strip())


def gencode_flags(arch_list: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in arch_list:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(arch_list, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX: JIT on GPUs newer than the list
    return flags


def nvcc_command(nvcc: str, sources: list[str], output: str, arch_list: tuple[str, ...], *, shared: bool, extra=()) -> list[str]:
    mode = ["-shared"] if shared else ["-c"]
    return [nvcc, *BASE_FLAGS, *gencode_flags(arch_list), *extra, *mode, *sources, "-o", output]


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESSOR_KERNEL_CACHE") or Path.home() / ".cache" / "compressor" / "kernels")


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def cache_key(nvcc: str, arch_list: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (KERNEL_DIR / name).read_bytes())
    digest.update(_nvcc_version(nvcc).encode())
    digest.update(" ".join((*BASE_FLAGS, *gencode_flags(arch_list))).encode())
    return digest.hexdigest()[:20]


def build_library(force: bool = False) -> Path:
    """Path of the compiled library, building it if the cache lacks it. Raises KernelUnavailable."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    arch_list = archs()
    directory = cache_root() / cache_key(nvcc, arch_list)
    library = directory / LIBRARY_NAME
    if library.is_file() and not force:
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if library.is_file() and not force:
            return library
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
        os.close(fd)
        cmd = nvcc_command(nvcc, [str(KERNEL_DIR / s) for s in SOURCES], tmp, arch_list, shared=True)
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=KERNEL_DIR, check=False)
        if result.returncode != 0:
            os.unlink(tmp)
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
            raise KernelUnavailable(f"nvcc failed ({' '.join(cmd)}):\n{tail}")
        os.replace(tmp, library)
    return library


_POINTER, _INT = ctypes.c_void_p, ctypes.c_int
# x, perm, w, scale_zero, bias, out, workspace, counters, m, n, n_pad, k, bits, group_tiles, splits, dtype, stream
_LAUNCHER_ARGS = [_POINTER] * 8 + [_INT] * 8 + [_POINTER]


@functools.cache
def load_library() -> ctypes.CDLL:
    """The kernels' library (built on first call). Raises KernelUnavailable."""
    path = build_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"{path}: cannot load ({exc})") from None
    for name in ("cq_gemv", "cq_mma"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _LAUNCHER_ARGS, _INT
    lib.cq_error_string.argtypes, lib.cq_error_string.restype = [_INT], ctypes.c_char_p
    return lib
