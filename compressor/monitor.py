"""Wall time and peak memory of a piece of work, for the report.

CPU: the process's resident set size, sampled every 20 ms by a background thread (the kernel's
own high-water mark, ru_maxrss, never goes down, so it cannot give a per-stage peak).
CUDA: torch's peak allocated bytes since the stage began.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory() -> None:
    """Give memory that was freed back to the OS (glibc's malloc_trim; nothing elsewhere). glibc
    keeps freed heap chunks of the many mid-sized temporaries (a GPTQ grid search's, ~15 MB each)
    for reuse, so a process's resident size stays at its high-water mark between big steps."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    def to_dict(self) -> dict:
        d = {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.peak_cuda_mb is not None:
            d["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return d


class measure:
    """`with measure() as m: ...` then m.seconds, m.peak_rss_mb (and m.peak_cuda_mb on CUDA)."""

    def __init__(self, interval: float = 0.02):
        self.result = Measurement()
        self._interval = interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, current_rss_bytes())

    def __enter__(self) -> Measurement:
        self._peak = current_rss_bytes()
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        self.result.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_bytes())
        self.result.peak_rss_mb = self._peak / 2**20
        if self._cuda:
            self.result.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
