"""Decode speed of the SmolLM2 4-bit artifact: ONNX Runtime vs our PyTorch runtime vs dense fp32 transformers.

Batch 1, a fixed prompt, 128 new tokens, greedy, the same CPU thread count for everyone. Decode
tokens/s counts the single-token steps after the prompt (prefill timed separately); every
engine runs the same loop: one prompt pass, then one cached pass per new token. Median over
--repeats runs after a warm-up. Also prints the ONNX file size against the GPTQ weights.

    python benchmarks/onnx_decode.py                         # uses /work/artifacts/smollm2-w4g64
    python benchmarks/onnx_decode.py --artifact runs/smollm2-w4g64 --onnx runs/smollm2-w4g64-onnx
    python benchmarks/onnx_decode.py --accuracy-level 4      # also time MatMulNBits with int8 activations
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compressor.artifacts.directory import write_json

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def _timed_decode(prefill, step, new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill seconds, decode seconds for (new_tokens - 1) cached steps."""
    t0 = time.perf_counter()
    token, state = prefill()
    t1 = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        token, state = step(token, state)
        tokens.append(token)
    t2 = time.perf_counter()
    return tokens, t1 - t0, t2 - t1


def torch_engine(model, ids: torch.Tensor):
    """Manual cached greedy loop: what generate does, minus its logits-processor bookkeeping."""

    @torch.inference_mode()
    def prefill():
        out = model(ids, use_cache=True)
        return int(out.logits[0, -1].argmax()), (out.past_key_values, ids.shape[1])

    @torch.inference_mode()
    def step(token, state):
        cache, length = state
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[length]]))  # fmt: skip
        return int(out.logits[0, -1].argmax()), (out.past_key_values, length + 1)

    return prefill, step


def onnx_engine(model, ids: np.ndarray):
    def prefill():
        s = model.forward(ids)
        return int(s.logits[0, -1].argmax()), s

    def step(token, s):
        mask = np.ones((1, s.attention_mask.shape[1] + 1), np.int64)
        s = model.forward(np.array([[token]], np.int64), s.past, mask)
        return int(s.logits[0, -1].argmax()), s

    return prefill, step


def measure(name, engine, new_tokens: int, repeats: int) -> dict:
    prefill, step = engine
    _timed_decode(prefill, step, 8)  # warm-up: kernels, allocations, thread pools
    runs = [_timed_decode(prefill, step, new_tokens) for _ in range(repeats)]
    decode = statistics.median(r[2] for r in runs)
    result = {
        "engine": name,
        "decode_tokens_per_s": (new_tokens - 1) / decode,
        "decode_seconds": decode,
        "prefill_seconds": statistics.median(r[1] for r in runs),
        "all_decode_tokens_per_s": [(new_tokens - 1) / r[2] for r in runs],
        "tokens": runs[0][0],
    }
    print(f"{name}: {result['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="/work/artifacts/smollm2-w4g64", help="GPTQ artifact directory.")
    parser.add_argument("--onnx", default=None, help="ONNX artifact (default: <artifact>-onnx, exported if missing).")
    parser.add_argument("--dense", default="smollm2-135m", help="Dense model source for the transformers baseline.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-level", type=int, choices=(0, 4), action="append",
                        help="MatMulNBits accuracy levels to time (repeatable; default 0).")  # fmt: skip
    parser.add_argument("--json", default="benchmarks/onnx_decode.json", help="Where to write the results.")
    args = parser.parse_args()
    levels = args.accuracy_level or [0]

    from compressor import runtime
    from compressor.export.onnx import export_onnx, onnx_bytes
    from compressor.models import load_model, resolve_source
    from compressor.runtime import onnx as onnx_runtime

    torch.set_num_threads(args.threads)
    artifact = Path(args.artifact)
    tokenizer = runtime.load_tokenizer(artifact)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    results = []
    onnx_dirs = {}
    for level in levels:
        base = Path(args.onnx) if args.onnx else artifact.with_name(artifact.name + "-onnx")
        out = base if level == 0 else base.with_name(base.name + f"-acc{level}")
        if not (out / "model.onnx").is_file():
            export_onnx(artifact, out, accuracy_level=level)
        onnx_dirs[level] = out
        model = onnx_runtime.load(out, threads=args.threads)
        results.append(measure(f"onnxruntime CPU (MatMulNBits accuracy_level {level})", onnx_engine(model, ids.numpy()),
                               args.new_tokens, args.repeats))  # fmt: skip
        del model
    ours = runtime.load(artifact, cache_dequantized=True)  # the float path (benchmarks/cpu_runtime.py times the CPU kernels)
    results.append(measure("compressor PyTorch runtime (cached dequant)", torch_engine(ours, ids), args.new_tokens, args.repeats))
    del ours
    dense = load_model(resolve_source(args.dense), torch.float32).eval()
    results.append(measure("dense fp32 transformers", torch_engine(dense, ids), args.new_tokens, args.repeats))
    del dense

    reference = results[-2]["tokens"]  # our PyTorch runtime on the same artifact
    dense_speed = results[-1]["decode_tokens_per_s"]
    gptq_bytes = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
    print(f"\nSmolLM2-135M 4-bit ({artifact.name}), batch 1, {ids.shape[1]}-token prompt, {args.new_tokens} new tokens "
          f"greedy, {args.threads} threads, median of {args.repeats}\n")  # fmt: skip
    print("| engine | decode tokens/s | vs dense fp32 | prefill ms | greedy tokens equal to PyTorch runtime |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        same = sum(a == b for a, b in zip(r["tokens"], reference))
        r["tokens_equal_to_pytorch_runtime"] = same
        equal = "n/a (dense weights)" if r is results[-1] else f"{same}/{len(reference)}"
        print(f"| {r['engine']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / dense_speed:.2f}x | "
              f"{1000 * r['prefill_seconds']:.0f} | {equal} |")  # fmt: skip
    # Logit agreement: one uncached forward over the prompt + the PyTorch runtime's greedy tokens.
    seq = np.concatenate([ids.numpy(), np.array([reference], dtype=np.int64)], axis=1)
    with torch.inference_mode():
        expected = runtime.load(artifact, cache_dequantized=True)(torch.from_numpy(seq)).logits.float().numpy()
    logit_diff = {level: float(np.abs(onnx_runtime.load(d, threads=args.threads).logits(seq) - expected).max())
                  for level, d in onnx_dirs.items()}  # fmt: skip
    print(f"\nmax |logit difference| to the PyTorch runtime over {seq.shape[1]} positions (largest |logit| "
          f"{np.abs(expected).max():.1f}): " + ", ".join(f"accuracy_level {k}: {v:.2e}" for k, v in logit_diff.items()))  # fmt: skip
    sizes = {level: onnx_bytes(d) for level, d in onnx_dirs.items()}
    print(f"\nGPTQ artifact weights: {gptq_bytes / 1e6:.1f} MB; ONNX model.onnx: "
          + ", ".join(f"{b / 1e6:.1f} MB ({b / gptq_bytes:.3f}x)" for b in sizes.values()))  # fmt: skip
    report = {
        "artifact": str(artifact),
        "onnx": {str(k): str(v) for k, v in onnx_dirs.items()},
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "gptq_weights_bytes": gptq_bytes,
        "onnx_bytes": {str(k): v for k, v in sizes.items()},
        "max_abs_logit_diff_vs_pytorch_runtime": {str(k): v for k, v in logit_diff.items()},
        "logit_diff_positions": seq.shape[1],
        "max_abs_logit": float(np.abs(expected).max()),
        "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results],
    }
    write_json(args.json, report)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
