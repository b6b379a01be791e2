"""`compress sweep`: one recipe, one option varied over several values, one plot.

Each value runs the whole recipe (`pipeline.run`) into `OUT/<key>=<value>/`; the dense model is
evaluated once, on the first run. The result is `OUT/sweep.json` and `OUT/sweep.png`:
perplexity against the varied value, and against the artifact's size on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from compressor.artifacts.directory import write_json
from compressor.errors import UserError
from compressor.pipeline import run
from compressor.recipe import load_recipe

log = logging.getLogger(__name__)


def sweep(
    recipe_file: Path,
    key: str,
    values: list[Any],
    out: Path,
    overrides: list[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    if not values:
        raise UserError("--values: give at least one value, e.g. --values 0.3,0.5,0.7")
    out = Path(out)
    if (out / "sweep.json").exists() and not overwrite:
        raise UserError(f"{out}: a sweep is already there; pass --overwrite to replace it")
    # Validate every point before running any, so a bad value fails in seconds, not after hours.
    recipes = [
        load_recipe(recipe_file, [*overrides, f"{key}={json.dumps(v)}", f"output={out / f'{key.split(chr(46))[-1]}={v}'}"])
        for v in values
    ]
    points, dense = [], None
    for value, recipe in zip(values, recipes):
        if dense is not None:
            recipe = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"dense": False})})
        log.info("sweep %s=%s", key, value)
        result = run(recipe, str(recipe_file), overwrite=True, progress=progress)
        report = result.report
        dense = dense or report.perplexity.dense
        sparsity = report.sparsity or {}
        points.append({
            "value": value,
            "output": str(result.output),
            "perplexity": report.perplexity.compressed["perplexity"] if report.perplexity.compressed else None,
            "artifact_mb": report.size.artifact_weights_bytes / 1e6,
            "sparsity": sparsity.get("sparsity_of_block_linears"),
            "stage_seconds": [s.measurement["seconds"] for s in report.stages],
        })  # fmt: skip
    summary = {"recipe": str(recipe_file), "key": key, "overrides": list(overrides), "dense": dense, "points": points}
    write_json(out / "sweep.json", summary)
    plot_sweep(summary, out / "sweep.png")
    return summary


def plot_sweep(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in summary["points"] if p["perplexity"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    numeric = all(isinstance(p["value"], (int, float)) for p in pts)
    xs = [p["value"] for p in pts] if numeric else list(range(len(pts)))
    left.plot(xs, [p["perplexity"] for p in pts], marker="o")
    if not numeric:
        left.set_xticks(xs, [str(p["value"]) for p in pts])
    left.set_xlabel(summary["key"])
    right.plot([p["artifact_mb"] for p in pts], [p["perplexity"] for p in pts], marker="o")
    for p in pts:
        right.annotate(str(p["value"]), (p["artifact_mb"], p["perplexity"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    right.set_xlabel("artifact size on disk (MB)")
    dense = summary.get("dense")
    for ax in (left, right):
        ax.set_ylabel("perplexity")
        if dense:
            ax.axhline(dense["perplexity"], color="gray", linestyle="--", label=f"dense {dense['perplexity']:.2f}")
            ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{Path(summary['recipe']).name}: perplexity vs {summary['key']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
