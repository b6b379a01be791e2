"""Table for issue 4 from the reports of the two distillation runs (run them first):

    compress run recipes/smollm2-prune6-distill.yaml --overwrite --set compute.threads=1
    compress run recipes/smollm2-prune6-distill.yaml --overwrite --set compute.threads=1 \
        --set stages[1].distill.lm_weight=1.0 --set output=runs/smollm2-prune6-finetune
    python benchmarks/distill_table.py runs/smollm2-prune6-distill runs/smollm2-prune6-finetune

The pruned student's perplexity before training, `--pruned-ppl`, comes from the 6-layers-removed
row of benchmarks/pruning.py (same protocol); without it the "gap recovered" column is n/a.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--pruned-ppl", type=float, default=None, help="perplexity of the pruned student before training")
    args = parser.parse_args()
    print("| run | loss | steps | tokens seen | train wall s | tokens/s | eval curve (step: ppl, 2 windows) | final ppl (all windows) | gap recovered |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.artifacts:
        r = json.loads((path / "report.json").read_text())
        dense = r["perplexity"]["dense"]["perplexity"]
        st = next(s for s in r["stages"] if s["kind"] == "distill")
        d, o = st["distill"], st["options"]
        pruned = args.pruned_ppl
        final = r["perplexity"]["compressed"]["perplexity"]
        curve = ", ".join(f"{s}: {p:.2f}" for s, p in d["eval_history"])
        loss = "LM (lm_weight 1)" if o["lm_weight"] == 1 else f"{o['loss']} (T={o['temperature']})"
        recovered = f"{100 * (pruned - final) / (pruned - dense):.0f}%" if pruned else "n/a"
        print(f"| {path.name} | {loss} | {d['steps']} | {d['tokens_seen']} | {d['train_seconds']:.0f} | "
              f"{d['tokens_per_second']:.0f} | {curve} | {final:.4f} (dense {dense:.4f}) | {recovered} |")  # fmt: skip


if __name__ == "__main__":
    main()
