"""Build the kernels into plain shared libraries on first use and load them with ctypes.

Two libraries: the CUDA kernels (gemv.cu, mma.cu; nvcc) and the CPU kernels (cpu_gemm.c, cpu_decode.c; the
system C compiler, AVX2/FMA/F16C + OpenMP).

Why not a torch C++/CUDA extension: those compile against torch's headers and ABI (minutes per
build, rebuilt for every torch version, fragile across the torch/CUDA pairs users have). The
kernels need nothing from torch: extern "C" functions take raw pointers and sizes (and, on CUDA,
the caller's cudaStream_t), so one compiler call produces a library any torch can drive.

Libraries are cached under $COMPRESSOR_KERNEL_CACHE (default ~/.cache/compressor/kernels)/<key>/,
the key hashing the sources, the compiler's version and the flags; a build happens once per
machine and source change, behind a file lock, written to a temporary name and renamed. Nothing
is compiled or loaded when this module is imported.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def _source_dir() -> Path:
    """The C/CUDA sources: compressor/kernels/csrc in an installed wheel, the top-level kernels/
    folder in a source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if installed.is_dir() else here.parent.parent / "kernels"


KERNEL_DIR = _source_dir()
SOURCES = ("gemv.cu", "mma.cu")
HEADERS = ("common.h",)
DEFAULT_ARCHS = ("80", "90")  # A100, H100/H200; compute_90 PTX is embedded too for newer GPUs
BASE_FLAGS = ("-std=c++17", "-O3", "--threads", "0", "-Xcompiler", "-fPIC")
LIBRARY_NAME = "libcompressor_kernels.so"

CPU_SOURCES = ("cpu_gemm.c", "cpu_decode.c")
# -mavx2/-mfma/-mf16c: the kernels' instruction set (checked at run time before loading);
# -fopenmp links libgomp.so.1 by soname, which resolves to the copy torch has loaded (one pool).
CPU_FLAGS = ("-std=c11", "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
CPU_LIBRARY_NAME = "libcompressor_cpu_kernels.so"


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here (no nvcc, compile error, old GPU, ...)."""


def switched_on(variable: str) -> bool:
    """False when the environment variable `variable` is 0, false, no or off (the kernels' off switches)."""
    return os.environ.get(variable, "1") not in ("0", "false", "no", "off")


class Fallbacks:
    """For a QuantLinear hook: whether its library loads here (tried once, the reason kept), and
    each reason to fall back logged once."""

    def __init__(self, log: logging.Logger, load: Callable[[], object]):
        self.log, self._load = log, load
        self.logged: set[str] = set()
        self.unavailable: str | None = None  # None: not tried yet; "": loads

    def note(self, message: str) -> None:
        if message not in self.logged:
            self.logged.add(message)
            self.log.warning(message)

    def library_reason(self) -> str:
        """Why the library cannot be used here ("" when it can); loads it on the first call."""
        if self.unavailable is None:
            try:
                self._load()
                self.unavailable = ""
            except KernelUnavailable as exc:
                self.unavailable = str(exc)
        return self.unavailable


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


def _cache_key(sources: Sequence[str], tool_version: str, flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in sources:
        digest.update(name.encode() + b"\0" + (KERNEL_DIR / name).read_bytes())
    digest.update(tool_version.encode())
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()[:20]


def cache_key(nvcc: str, arch_list: tuple[str, ...]) -> str:
    return _cache_key((*SOURCES, *HEADERS), _nvcc_version(nvcc), (*BASE_FLAGS, *gencode_flags(arch_list)))


def _cached_build(key: str, library_name: str, command: Callable[[str], list[str]], force: bool) -> Path:
    """cache_root()/key/library_name, built by `command(output_path)` unless cached. Raises KernelUnavailable."""
    directory = cache_root() / key
    library = directory / library_name
    if library.is_file() and not force:
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if library.is_file() and not force:
            return library
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
        os.close(fd)
        cmd = command(tmp)
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=KERNEL_DIR, check=False)
        if result.returncode != 0:
            os.unlink(tmp)
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
            raise KernelUnavailable(f"{Path(cmd[0]).name} failed ({' '.join(cmd)}):\n{tail}")
        os.replace(tmp, library)
    return library


def build_library(force: bool = False) -> Path:
    """Path of the compiled CUDA library, building it if the cache lacks it. Raises KernelUnavailable."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    arch_list = archs()
    sources = [str(KERNEL_DIR / s) for s in SOURCES]
    return _cached_build(cache_key(nvcc, arch_list), LIBRARY_NAME,
                         lambda out: nvcc_command(nvcc, sources, out, arch_list, shared=True), force)  # fmt: skip


def find_cc() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def cpu_supported() -> str | None:
    """None when this CPU runs the CPU kernels, else why not (they need x86-64 with AVX2)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", "NEON", ...
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU kernels need x86-64 with AVX2/FMA/F16C; torch reports CPU capability {capability}"
    return None


@functools.cache
def _cc_version(cc: str) -> str:
    result = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return result.stdout or result.stderr


def build_cpu_library(force: bool = False) -> Path:
    """Path of the compiled CPU library, building it if the cache lacks it. Raises KernelUnavailable."""
    cc = find_cc()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc or clang)")
    sources = [str(KERNEL_DIR / s) for s in CPU_SOURCES]
    key = _cache_key(CPU_SOURCES, _cc_version(cc), CPU_FLAGS)
    return _cached_build(key, CPU_LIBRARY_NAME, lambda out: [cc, *CPU_FLAGS, *sources, "-o", out], force)


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


_INT64, _CINT = ctypes.c_int64, ctypes.c_int


class CpuQuantLayer(ctypes.Structure):
    """cq_quant_layer in cpu_gemm.c: one layer's buffers and shape, passed by pointer."""

    _fields_ = [("qweight", _POINTER), ("qzeros", _POINTER), ("scales", _POINTER), ("bias", _POINTER),
                ("n", _INT64), ("k", _INT64), ("bits", ctypes.c_int32), ("group_size", ctypes.c_int32)]  # fmt: skip


# layer, x, y, m, threads
_CPU_QUANT_ARGS = [ctypes.POINTER(CpuQuantLayer), _POINTER, _POINTER, _INT64, _CINT]
# w, bias, x, y, m, n, k, threads
_CPU_HALF_ARGS = [_POINTER, _POINTER, _POINTER, _POINTER, _INT64, _INT64, _INT64, _CINT]

_FLOAT = ctypes.c_float
# cpu_decode.c: the operations between a decode step's matmuls (argument names in the C source)
_CPU_DECODE_ARGS = {
    # h, delta, weight, y, rows, dim, h_stride, y_stride, eps
    "cq_cpu_add_rms_norm": [_POINTER] * 4 + [_INT64] * 4 + [_FLOAT],
    # qkv, qkv_stride, rows, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slots,
    # positions, slots_total, capacity
    "cq_cpu_rope_store": [_POINTER] + [_INT64] * 5 + [_POINTER] * 4 + [_FLOAT] + [_POINTER] * 4 + [_INT64] * 2,
    # q, q_stride, rows, heads, kv_heads, head_dim, k_cache, v_cache, slots, positions, slots_total, capacity, scale, out, threads
    "cq_cpu_attention": [_POINTER] + [_INT64] * 5 + [_POINTER] * 4 + [_INT64] * 2 + [_FLOAT, _POINTER, _CINT],
    # gate_up, rows, n, out
    "cq_cpu_silu_mul": [_POINTER, _INT64, _INT64, _POINTER],
}


@functools.cache
def load_cpu_library() -> ctypes.CDLL:
    """The CPU kernels' library (built on first call). Raises KernelUnavailable."""
    reason = cpu_supported()
    if reason:
        raise KernelUnavailable(reason)
    path = build_cpu_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"{path}: cannot load ({exc})") from None
    lib.cq_cpu_quant_linear.argtypes, lib.cq_cpu_quant_linear.restype = _CPU_QUANT_ARGS, _CINT
    lib.cq_cpu_half_linear.argtypes, lib.cq_cpu_half_linear.restype = _CPU_HALF_ARGS, _CINT
    lib.cq_cpu_dequantize.argtypes, lib.cq_cpu_dequantize.restype = [ctypes.POINTER(CpuQuantLayer), _POINTER, _CINT], _CINT
    for name, args in _CPU_DECODE_ARGS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _CINT
    return lib
