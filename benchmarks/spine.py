"""Benchmark of the spine (issue 2): GPTQ time, perplexity cost, artifact size, runtime fidelity.

For each configuration: run the embedded-default recipe through `compressor.pipeline.run`
(SmolLM2-135M, 64 x 512 calibration tokens from python-docs, python-docs evaluation at 2048),
then load the artifact with `compressor.runtime.load` and compare its logits with the in-memory
fake-quantized model on one evaluation window: with the float cache (`cache_dequantized=True`,
the float model's arithmetic: expected bit-identical) and with the default CPU kernels. Prints a
markdown table and writes JSON.

    python benchmarks/spine.py                       # all configurations below
    python benchmarks/spine.py --only w4g64 w3g64    # a subset
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from compressor import runtime
from compressor.data import evaluation_tokens
from compressor.pipeline import run
from compressor.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-w4g64.yaml"
CONFIGS = {
    # name: --set overrides on the default recipe
    "w4g64": [],
    "w4g64-plain": ["stages[0].quantize.desc_act=false", "stages[0].quantize.static_groups=false", "stages[0].quantize.mse=false"],
    "w4g64-mse": ["stages[0].quantize.desc_act=false", "stages[0].quantize.static_groups=false"],
    "w4g64-actorder": ["stages[0].quantize.static_groups=false"],
    "w4g64-rtn": ["stages[0].quantize.method=rtn"],
    "w3g64": ["stages[0].quantize.bits=3"],
    "w8g64": ["stages[0].quantize.bits=8"],
}


@torch.inference_mode()
def logits_relative_error(reference: torch.nn.Module, artifact: torch.nn.Module, ids: torch.Tensor) -> float:
    a = reference(ids).logits.float()
    b = artifact(ids).logits.float()
    return float((a - b).abs().max() / a.abs().max())


@torch.inference_mode()
def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    model(ids)  # warm-up (fills the dequantized cache when enabled)
    start = time.perf_counter()
    for _ in range(repeats):
        model(ids)
    return (time.perf_counter() - start) / repeats


def bench(name: str, overrides: list[str], out_root: Path) -> dict:
    recipe = load_recipe(RECIPE, overrides + [f"output={out_root / name}"])
    result = run(recipe, str(RECIPE), overwrite=True, progress=False)
    r = result.report.to_dict()
    stage = r["stages"][0]["measurement"]
    ids = evaluation_tokens(runtime.load_tokenizer(result.output), recipe.data.evaluation)[:512][None]
    loaded = runtime.load(result.output, cache_dequantized=True)
    rel = logits_relative_error(result.model, loaded, ids)
    kernels = runtime.load(result.output)  # the default: packed weights on the CPU kernels
    return {
        "name": name,
        "overrides": overrides,
        "gptq_seconds": stage["seconds"],
        "gptq_peak_rss_mb": stage["peak_rss_mb"],
        "dense_ppl": r["perplexity"]["dense"]["perplexity"],
        "compressed_ppl": r["perplexity"]["compressed"]["perplexity"],
        "ppl_increase": r["perplexity"]["increase"],
        "eval_tokens": r["perplexity"]["compressed"]["tokens"],
        "artifact_mb": r["size"]["artifact_weights_bytes"] / 1e6,
        "artifact_over_ideal": r["size"]["artifact_over_ideal"],
        "artifact_over_dense_fp16": r["size"]["artifact_over_dense_fp16"],
        "runtime_logits_rel_error": rel,
        "runtime_logits_rel_error_kernels": logits_relative_error(result.model, kernels, ids),
        "runtime_forward_512_cached_s": forward_seconds(loaded, ids),
        "runtime_forward_512_kernels_s": forward_seconds(kernels, ids),
        "dense_forward_512_s": forward_seconds(result.model, ids),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where artifacts go")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/spine.json"), help="results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [bench(name, CONFIGS[name], args.out) for name in (args.only or CONFIGS)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print("| config | GPTQ stage s | peak RSS MB | dense ppl | compressed ppl | increase | artifact MB | vs ideal | vs dense fp16 | runtime logits rel. err (float cache / kernels) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['gptq_seconds']:.1f} | {r['gptq_peak_rss_mb']:.0f} | {r['dense_ppl']:.4f} | "
            f"{r['compressed_ppl']:.4f} | {100 * r['ppl_increase']:+.2f}% | {r['artifact_mb']:.1f} | "
            f"{r['artifact_over_ideal']:.4f}x | {r['artifact_over_dense_fp16']:.3f}x | {r['runtime_logits_rel_error']:.2e} / {r['runtime_logits_rel_error_kernels']:.2e} |"
        )
    print()
    print("| config | forward 1x512, dense fp32 s | runtime float cache s | runtime default (CPU kernels) s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['dense_forward_512_s']:.3f} | {r['runtime_forward_512_cached_s']:.3f} | {r['runtime_forward_512_kernels_s']:.3f} |")


if __name__ == "__main__":
    main()
