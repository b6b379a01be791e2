"""End-to-end greedy decode speed on one CUDA GPU: a GPTQ artifact on our kernels vs the same model in fp16.

Three models from one artifact, timed in the same run:

  * gptq-kernels: `compressor.runtime.load(path, device="cuda")`, QuantLinear on compressor.kernels;
  * gptq-dequant: the same with COMPRESSOR_CUDA_KERNELS=0 (dequantize once, cached fp16, cuBLAS);
  * fp16:         every QuantLinear replaced by an nn.Linear holding its dequantized fp16 weight
                  (the dense model of the same shapes; the GPU box has no Hub access for the original).

Decode tok/s = (N - 1) / (time(N new tokens) - time(1 new token)), so prompt processing cancels out;
median over --repeats. This is what `compress generate` runs (model.generate, eager PyTorch); for a
model as small as SmolLM2-135M it is bound by kernel-launch and Python overhead, not by weights.

    python benchmarks/e2e_gpu_decode.py --artifact /path/to/smollm2-w4g64 [--new-tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from compressor.artifacts.directory import write_json


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="GPTQ v1 artifact directory")
    parser.add_argument("--prompt", default="The Python standard library provides")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def dense_copy(model, dtype):
    """Replace every QuantLinear with an nn.Linear holding its dequantized weight (in place)."""
    import torch

    from compressor.runtime import QuantLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(module.dequantized_weight(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def generate_seconds(model, ids, new_tokens: int, pad_id: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def decode_tok_s(model, ids, new_tokens: int, repeats: int, pad_id: int) -> tuple[float, list[int]]:
    generate_seconds(model, ids, 8, pad_id)  # warm-up: kernel build/load, cuBLAS handles, allocator
    rates = []
    for _ in range(repeats):
        one = generate_seconds(model, ids, 1, pad_id)
        full = generate_seconds(model, ids, new_tokens, pad_id)
        rates.append((new_tokens - 1) / (full - one))
    out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=pad_id)
    return statistics.median(rates), out[0, ids.shape[1] :].tolist()


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from compressor import runtime

    dtype = getattr(torch, args.dtype)
    tokenizer = runtime.load_tokenizer(args.artifact)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.cuda()
    pad_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    results = {}
    for mode in ("gptq-kernels", "gptq-dequant", "fp16"):
        os.environ["COMPRESSOR_CUDA_KERNELS"] = "1" if mode == "gptq-kernels" else "0"
        model = runtime.load(args.artifact, device="cuda", dtype=dtype)
        if mode == "fp16":
            model = dense_copy(model, dtype)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak while decoding (weights included), not the load's transients
        with torch.inference_mode():
            rate, tokens = decode_tok_s(model, ids, args.new_tokens, args.repeats, pad_id)
        memory = torch.cuda.max_memory_allocated() / 2**20
        results[mode] = {"decode_tok_s": rate, "first_16_tokens": tokens, "peak_mib": memory}
        print(f"{mode}: {rate:.1f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
    os.environ.pop("COMPRESSOR_CUDA_KERNELS", None)

    base = results["fp16"]["decode_tok_s"]
    print(f"\ndevice: {torch.cuda.get_device_name()}; {args.artifact.name}; {args.new_tokens} new tokens, median of {args.repeats}")
    print("| model | decode tok/s | vs fp16 | peak MiB | same first 16 tokens as fp16 |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        same = r["first_16_tokens"] == results["fp16"]["first_16_tokens"]
        print(f"| {mode} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base:.2f}x | {r['peak_mib']:.0f} | {same} |")
    if args.json:
        payload = {"device": torch.cuda.get_device_name(), "artifact": str(args.artifact), "new_tokens": args.new_tokens, "results": results}
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
