"""Benchmark of pruning (issue 3) on SmolLM2-135M: one table, every method, same protocol.

Calibration 64 x 512 python-docs tokens, the spine's perplexity protocol (python-docs evaluation
part, windows of 2048). Each row runs `compressor.pipeline.run` on recipes/smollm2-sparsegpt50.yaml
with the stages replaced; wall time is the prune (and quantize) stages' time.

    python benchmarks/pruning.py                     # every row (about 25 minutes on 2 cores)
    python benchmarks/pruning.py --only wanda-50 sparsegpt-50
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from compressor.pipeline import run
from compressor.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-sparsegpt50.yaml"
ROWS = {
    # name: (stages as YAML, export format)
    "magnitude-50": ("[{prune: {method: magnitude, sparsity: 0.5}}]", "dense"),
    "wanda-50": ("[{prune: {method: wanda, sparsity: 0.5}}]", "dense"),
    "sparsegpt-50": ("[{prune: {method: sparsegpt, sparsity: 0.5}}]", "dense"),
    "wanda-2:4": ('[{prune: {method: wanda, pattern: "2:4"}}]', "dense"),
    "wanda-4:8": ('[{prune: {method: wanda, pattern: "4:8"}}]', "dense"),
    "sparsegpt-2:4": ('[{prune: {method: sparsegpt, pattern: "2:4"}}]', "dense"),
    "sparsegpt-4:8": ('[{prune: {method: sparsegpt, pattern: "4:8"}}]', "dense"),
    "sparsegpt-2:4+gptq-w4g64": ('[{prune: {method: sparsegpt, pattern: "2:4", joint_quantize: true}}, {quantize: {bits: 4, group_size: 64}}]', "gptq"),
    "sparsegpt-2:4,then-gptq-w4g64": ('[{prune: {method: sparsegpt, pattern: "2:4"}}, {quantize: {bits: 4, group_size: 64}}]', "gptq"),
    "mlp-channels-25%": ("[{prune: {method: structured, target: mlp_channels, ratio: 0.25}}]", "dense"),
    "heads-25%": ("[{prune: {method: structured, target: heads, ratio: 0.25}}]", "dense"),
    "layers-2": ("[{prune: {method: structured, target: layers, count: 2}}]", "dense"),
    "layers-6": ("[{prune: {method: structured, target: layers, count: 6}}]", "dense"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(ROWS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pruning"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results, dense = [], None
    for name in args.only or ROWS:
        stages, fmt = ROWS[name]
        recipe = load_recipe(RECIPE, [f"stages={stages}", f"export.format={fmt}", f"output={args.out / name.replace(':', '-')}",
                                      f"evaluate.dense={'true' if dense is None else 'false'}"])  # fmt: skip
        report = run(recipe, str(RECIPE), overwrite=True, progress=False).report.to_dict()
        dense = dense or report["perplexity"]["dense"]
        sp = report.get("sparsity") or {}
        structured = next((s["structured"] for s in report["stages"] if s.get("structured")), None)
        results.append({
            "name": name,
            "perplexity": report["perplexity"]["compressed"]["perplexity"],
            "seconds": sum(s["measurement"]["seconds"] for s in report["stages"] if not s.get("fused_into")),
            "sparsity": sp.get("sparsity_of_block_linears"),
            "parameters": report["model"]["parameters"],
            "artifact_mb": report["size"]["artifact_weights_bytes"] / 1e6,
            "structured": structured,
        })  # fmt: skip
        print(json.dumps(results[-1], default=str)[:300], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning.json").write_text(json.dumps({"dense": dense, "rows": results}, indent=2, default=str))
    print()
    print("| configuration | perplexity | vs dense | block-linear sparsity | parameters | artifact MB | wall time s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | {dense['perplexity']:.4f} | | 0 | | | |")
    for r in results:
        sp = f"{100 * r['sparsity']:.1f}%" if r["sparsity"] is not None else "-"
        print(f"| {r['name']} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}% | {sp} | "
              f"{r['parameters'] / 1e6:.1f}M | {r['artifact_mb']:.1f} | {r['seconds']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
