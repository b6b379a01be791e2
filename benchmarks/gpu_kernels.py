"""Dequant-GEMM kernels (compressor.kernels) vs torch fp16 matmul on one CUDA GPU.

For each layer shape (K x N = in x out features: Llama-2-7B, Llama-3-8B and SmolLM2-135M) and M
(tokens), times y = x @ dequant(W) with our kernels and y = x @ W^T with torch fp16 (cuBLAS),
both in the same run:

  * each timed sample replays a CUDA graph of `--calls` launches (no Python or launch gaps), each
    launch on a different copy of the weights, with enough copies (>= 4x the L2 cache) that no
    launch finds its weights in L2; the per-call time is the median over `--samples` replays;
  * effective TB/s = bytes a call must move (packed weights + scales/zeros + x + y) / time, and
    its share of the device-to-device copy bandwidth measured in the same run (a large
    tensor.copy_, counting read + write bytes);
  * act-order cost: the same shapes with a random g_idx (rows sorted at load; the kernels gather
    x[:, perm] while staging activations), as the time over the plain kernel's.

    python benchmarks/gpu_kernels.py                      # 4-bit g128 symmetric, all shapes and M
    python benchmarks/gpu_kernels.py --bits 8 --m 1 16 --json out.json

Needs a CUDA GPU (compute capability >= 8.0) and nvcc (the kernels build on first use).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from compressor.artifacts.directory import write_json

SHAPES = {  # name: (K, N)
    "llama 4096x4096 (q/o)": (4096, 4096),
    "llama2-7b 4096x11008 (gate/up)": (4096, 11008),
    "llama2-7b 11008x4096 (down)": (11008, 4096),
    "llama3-8b 4096x14336 (gate/up)": (4096, 14336),
    "llama3-8b 14336x4096 (down)": (14336, 4096),
    "smollm2 576x576 (q/o)": (576, 576),
    "smollm2 576x192 (k/v)": (576, 192),
    "smollm2 576x1536 (gate/up)": (576, 1536),
    "smollm2 1536x576 (down)": (1536, 576),
}
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or -1 (one group)")
    parser.add_argument("--asym", action="store_true", help="label only: the kernels run sym and asym identically")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="token counts")
    parser.add_argument("--shapes", nargs="+", default=None, help="substrings selecting SHAPES (default: all)")
    parser.add_argument("--act-order-m", type=int, nargs="*", default=[1, 16], help="M values to measure act-order cost at")
    parser.add_argument("--calls", type=int, default=20, help="launches per CUDA graph")
    parser.add_argument("--samples", type=int, default=30, help="timed graph replays (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def random_packed(k: int, n: int, bits: int, group_size: int, act_order: bool, device):
    """A PackedLinear with random codes/scales (timing does not care which), optional act-order perm."""
    import torch
    from compressor.kernels.repack import TILE_N, PackedLinear, tile_k

    tk = tile_k(bits)
    n_pad = -(-n // TILE_N) * TILE_N
    groups = 1 if group_size == -1 else k // group_size
    words = torch.randint(-(2**31), 2**31 - 1, (n_pad // TILE_N, k // tk, 32, 4), dtype=torch.int32, device=device)
    scale_zero = torch.empty(groups, n_pad // TILE_N, 8, 8, dtype=torch.float16, device=device)
    scale_zero[..., :4].uniform_(0.001, 0.02)
    scale_zero[..., 4:] = 2 ** (bits - 1)
    perm = torch.randperm(k, device=device, dtype=torch.int32) if act_order else None
    group_tiles = k // tk if group_size == -1 else group_size // tk
    return PackedLinear(words, scale_zero, perm, bits, k, n, group_tiles)


def graph_time_us(step, copies: int, calls: int, samples: int, stream) -> float:
    """Median per-call time of `step(i)` (i = weight copy) replayed from a CUDA graph."""
    import torch

    with torch.cuda.stream(stream):
        for i in range(3):  # warm up on the capture stream: library load, split counters, cuBLAS handles
            step(i % copies)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            step(i % copies)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples + 2):
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times[2:])


def copy_bandwidth_tbs(samples: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB tensor.copy_."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * src.numel() / statistics.median(times) / 1e12


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("needs a CUDA GPU with compute capability >= 8.0")
    from compressor.kernels import ops

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(device)
    rotate_bytes = 4 * max(props.L2_cache_size, 50 * 2**20)
    stream = torch.cuda.Stream()
    shapes = {name: s for name, s in SHAPES.items() if not args.shapes or any(sel in name for sel in args.shapes)}
    copy_tbs = copy_bandwidth_tbs(args.samples)
    config = f"{args.bits}-bit g{args.group_size} {'asym' if args.asym else 'sym'} {args.dtype}"
    print(f"device: {props.name}; copy bandwidth {copy_tbs:.2f} TB/s; {config}; "
          f"median of {args.samples} CUDA-graph replays x {args.calls} calls, weights rotated over >= {rotate_bytes / 2**20:.0f} MiB")  # fmt: skip
    print("\n| layer (K x N) | M | kernel us | torch fp16 us | kernel TB/s | % of copy BW | speed-up vs fp16 | act-order cost |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, (k, n) in shapes.items():
        packed_bytes = k * n * args.bits // 8 + (1 if args.group_size == -1 else k // args.group_size) * n * 4
        copies = max(2, -(-rotate_bytes // packed_bytes))
        packed = [random_packed(k, n, args.bits, args.group_size, False, device) for _ in range(copies)]
        dense_copies = max(2, -(-rotate_bytes // (k * n * 2)))
        dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(dense_copies)]
        ordered = None
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ours = graph_time_us(lambda i, x=x, w=packed: ops.linear(x, w[i]), copies, args.calls, args.samples, stream)
            torch_us = graph_time_us(lambda i, x=x, w=dense: F.linear(x, w[i]), dense_copies, args.calls, args.samples, stream)
            moved = packed_bytes + 2 * m * (k + n)
            tbs = moved / (ours * 1e-6) / 1e12
            act_cost = None
            if m in args.act_order_m:
                if ordered is None:  # same tensors plus a permutation: the act-order layout
                    ordered = [random_packed(k, n, args.bits, args.group_size, True, device) for _ in range(copies)]
                act_us = graph_time_us(lambda i, x=x, w=ordered: ops.linear(x, w[i]), copies, args.calls, args.samples, stream)
                act_cost = act_us / ours - 1
            row = {
                "layer": name, "k": k, "n": n, "m": m, "kernel_us": ours, "torch_fp16_us": torch_us, "kernel_tbs": tbs,
                "copy_tbs": copy_tbs, "pct_of_copy": 100 * tbs / copy_tbs, "speedup_vs_fp16": torch_us / ours,
                "act_order_cost": act_cost,
            }  # fmt: skip
            rows.append(row)
            act = "" if act_cost is None else f"{100 * act_cost:+.1f}%"
            print(f"| {name} | {m} | {ours:.2f} | {torch_us:.2f} | {tbs:.2f} | {row['pct_of_copy']:.0f}% | "
                  f"{row['speedup_vs_fp16']:.2f}x | {act} |", flush=True)  # fmt: skip
        packed = dense = ordered = None  # free this shape's copies before the next
        torch.cuda.empty_cache()
    if args.json:
        result = {"device": props.name, "torch": torch.__version__, "config": config, "copy_tbs": copy_tbs, "rows": rows}
        write_json(args.json, result)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
