"""2:4 semi-structured sparse matmul vs dense fp16 on a CUDA GPU (compute capability >= 8.0).

Times y = x @ W^T for Llama-7B/8B and SmolLM2 layer shapes with CUDA events (median of many
runs; weights rotated across enough copies to exceed the L2 cache), dense fp16 cuBLAS against
`torch.sparse.to_sparse_semi_structured` of the same 2:4-pruned weight, in the same run.

    python benchmarks/sparse24_gpu.py            # needs a GPU; prints a markdown table
"""

from __future__ import annotations

import statistics
import sys

import torch

from compressor.algorithms.pruning import magnitude_prune

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1536, 576), (576, 1536)]  # (N, K)
BATCHES = [1, 16, 64, 256, 1024]
L2_BYTES = 50 * 2**20


def time_ms(fn, weights, x, repeats: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(repeats + 5):
        w = weights[i % len(weights)]
        start.record()
        fn(x, w)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("needs a CUDA GPU with compute capability >= 8.0")
    from torch.sparse import to_sparse_semi_structured

    print(f"device: {torch.cuda.get_device_name()}")
    print("| N x K | M | dense fp16 ms | 2:4 sparse ms | speed-up |")
    print("|---|---|---|---|---|")
    for n, k in SHAPES:
        copies = max(2, L2_BYTES // (n * k * 2) + 1)
        dense = [magnitude_prune(torch.randn(n, k), pattern="2:4").weight.half().cuda() for _ in range(copies)]
        sparse = [to_sparse_semi_structured(w) for w in dense]
        for m in BATCHES:
            x = torch.randn(m, k, dtype=torch.half, device="cuda")
            t_dense = time_ms(lambda x, w: torch.nn.functional.linear(x, w), dense, x)
            t_sparse = time_ms(lambda x, w: torch.nn.functional.linear(x, w), sparse, x)
            print(f"| {n}x{k} | {m} | {t_dense:.4f} | {t_sparse:.4f} | {t_dense / t_sparse:.2f}x |")


if __name__ == "__main__":
    main()
