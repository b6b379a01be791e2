"""GPTQ inside llama.cpp: our Q4_0 GGUF against a plain round-to-nearest Q4_0 of the same dense model.

One run, one evaluation, all in llama.cpp (llama-cpp-python), on the README's perplexity protocol
(the CPython documentation, non-overlapping windows of --seq-len tokens, the artifact's tokenizer):

  dense-f16   the dense model (the float weights the recipe started from), every linear float16
  rtn-q4_0    the same dense model, block linears quantized by the gguf package's round-to-nearest
              Q4_0 quantizer (what `llama-quantize` without an importance matrix produces)
  gptq-q4_0   `compress export --format gguf` of the GPTQ artifact: our codes and scales as Q4_0

and two cross-checks of the file against our own runtime on the same windows:

  transformers  AutoModelForCausalLM.from_pretrained(dir, gguf_file=gptq-q4_0.gguf), float32
  runtime       compressor.runtime.load(artifact), the GPTQ artifact itself

Target (issue 14): gptq-q4_0's perplexity increase over dense-f16 <= 0.5 x rtn-q4_0's increase, and
transformers on the GGUF within 0.5% of our runtime on the artifact.

    compress run recipes/smollm2-w4g64.yaml                      # the artifact (runs/smollm2-w4g64)
    python benchmarks/gguf_quality.py --artifact runs/smollm2-w4g64 --json benchmarks/results/gguf_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch


def llama_cpp_perplexity(path: Path, windows: np.ndarray, threads: int) -> dict:
    from llama_cpp import Llama

    from compressor.evaluation.perplexity import window_nll

    seq_len = windows.shape[1]
    llm = Llama(str(path), n_ctx=seq_len, n_batch=seq_len, n_ubatch=512, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    total, started = 0.0, time.perf_counter()
    try:
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(np.asarray(llm.scores[:seq_len], dtype=np.float32))
            total += float(window_nll(logits[None], torch.from_numpy(window.astype(np.int64))[None]))  # the README protocol's
    finally:
        llm.close()
    tokens = windows.shape[0] * (seq_len - 1)
    return {"perplexity": math.exp(total / tokens), "tokens": tokens, "seconds": time.perf_counter() - started}


def torch_perplexity(model, windows: np.ndarray) -> dict:
    from compressor.evaluation.perplexity import perplexity

    started = time.perf_counter()
    result = perplexity(model, torch.from_numpy(windows.reshape(-1)), seq_len=windows.shape[1], progress=False)
    return {"perplexity": result.perplexity, "tokens": result.tokens, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="runs/smollm2-w4g64", help="GPTQ artifact (symmetric 4-bit, groups of 32k)")
    parser.add_argument("--dense", default=None, help="dense model source (default: the artifact's recipe model)")
    parser.add_argument("--work", default=None, help="where the GGUF files go (default: <artifact>-gguf-quality)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    import importlib.util

    import yaml

    if importlib.util.find_spec("llama_cpp") is None:  # fail before minutes of work
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")

    from compressor import runtime
    from compressor.data import evaluation_tokens
    from compressor.export.gguf import write_gguf
    from compressor.models import load_model, load_tokenizer, resolve_source
    from compressor.recipe import EvaluationData

    torch.set_num_threads(args.threads)
    artifact = Path(args.artifact)
    recipe = yaml.safe_load((artifact / "recipe.yaml").read_text())
    source = resolve_source(args.dense or recipe["model"]["source"])
    work = Path(args.work) if args.work else artifact.with_name(artifact.name + "-gguf-quality")
    work.mkdir(parents=True, exist_ok=True)

    dense_dir = work / "dense"
    if not (dense_dir / "config.json").is_file():  # the float weights the recipe quantized, as a checkpoint
        load_model(source, torch.float32).save_pretrained(dense_dir)
        load_tokenizer(source).save_pretrained(dense_dir)
    files = {
        "dense-f16": (dense_dir, None),
        "rtn-q4_0": (dense_dir, "Q4_0"),
        "gptq-q4_0": (artifact, None),
    }
    written = {}
    for key, (src, rtn) in files.items():
        out = work / f"{key}.gguf"
        facts = write_gguf(src, out, progress=False, name=key, round_to_nearest=rtn)
        written[key] = {"bytes": out.stat().st_size, "tensor_types": facts["tensor_types"]}

    tokenizer = runtime.load_tokenizer(artifact)
    ids = evaluation_tokens(tokenizer, EvaluationData(source="python-docs", seq_len=args.seq_len)).numpy()
    n = ids.size // args.seq_len
    if args.max_windows:
        n = min(n, args.max_windows)
    windows = ids[: n * args.seq_len].reshape(n, args.seq_len)
    print(f"{n} windows of {args.seq_len} tokens")

    results = {}
    for key in files:
        results[key] = llama_cpp_perplexity(work / f"{key}.gguf", windows, args.threads)
        print(f"llama.cpp {key:10s} ppl {results[key]['perplexity']:.4f} ({results[key]['seconds']:.0f} s)", flush=True)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(work, gguf_file="gptq-q4_0.gguf", dtype=torch.float32).eval()
    results["transformers-gguf"] = torch_perplexity(hf, windows)
    del hf
    results["runtime"] = torch_perplexity(runtime.load(artifact, dtype=torch.float32), windows)
    for key in ("transformers-gguf", "runtime"):
        print(f"{key:17s} ppl {results[key]['perplexity']:.4f} ({results[key]['seconds']:.0f} s)", flush=True)

    dense = results["dense-f16"]["perplexity"]
    rtn_increase = results["rtn-q4_0"]["perplexity"] - dense
    gptq_increase = results["gptq-q4_0"]["perplexity"] - dense
    summary = {
        "rtn_increase": rtn_increase,
        "gptq_increase": gptq_increase,
        "gptq_over_rtn_increase": gptq_increase / rtn_increase,
        "target_gptq_over_rtn_increase_at_most": 0.5,
        "transformers_gguf_over_runtime": results["transformers-gguf"]["perplexity"] / results["runtime"]["perplexity"] - 1,
        "target_transformers_gguf_over_runtime_within": 0.005,
    }
    print(f"increase over dense: rtn {rtn_increase:+.4f}, gptq {gptq_increase:+.4f} (ratio {summary['gptq_over_rtn_increase']:.3f}); "
          f"transformers GGUF vs runtime {summary['transformers_gguf_over_runtime']:+.4%}")  # fmt: skip
    if args.json:
        out = {
            "command": "python benchmarks/gguf_quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "artifact": str(artifact),
            "quantization_config": runtime.gptq_config(artifact),
            "windows": n,
            "seq_len": args.seq_len,
            "files": written,
            "perplexity": results,
            "summary": summary,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                        "torch": torch.__version__, "llama_cpp_python": __import__("llama_cpp").__version__},  # fmt: skip
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
