"""The run report: its types, and the artifact's report.json (everything), report.md (for
people) and per-layer plot.

`RunReport` is what `compress run` measured; it is written here (`write_report`) and read back
here (`read_report`), so the file's keys are spelled in one place. Stage-specific details (a
distill stage's curves, structured pruning's removed channels, per-layer errors) stay mappings:
their shape belongs to the stage that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Report(BaseModel):
    # A report.json from a newer version may carry keys this one does not know: keep them.
    model_config = ConfigDict(extra="allow")


class StageReport(_Report):
    """One stage's entry in `stages` (kind, options and measurement are filled in by the pipeline)."""

    kind: str = ""
    options: dict[str, Any] = {}
    fused_into: str | None = None  # ran inside that stage's pass (e.g. prune with joint_quantize)
    measurement: dict[str, Any] = {}  # seconds, peak RSS/CUDA (compressor.monitor)
    layers: dict[str, dict[str, Any]] = {}  # module name -> relative_error, sparsity, damp_percent, ...
    sparsity: dict[str, Any] | None = None  # unstructured/N:M prune: the summary
    structured: dict[str, Any] | None = None  # structured prune: what was removed and why
    distill: dict[str, Any] | None = None  # distill: curves, final perplexity, resume point
    seconds_per_block: list[float] | None = None  # blockwise runs


class ModelFacts(_Report):
    source: str
    model_type: str
    parameters: int


class PerplexityReport(_Report):
    source: str | None = None  # the evaluation data
    dense: dict[str, Any] | None = None  # evaluation.perplexity.PerplexityResult.to_dict()
    compressed: dict[str, Any] | None = None
    increase: float | None = None  # compressed / dense - 1


class SizeReport(_Report):
    artifact_weights_bytes: int  # the GPTQ (or dense) safetensors, also for converted formats
    ideal_bytes: int  # codes + scales + zeros + g_idx + fp16 rest
    dense_fp16_bytes: int
    artifact_over_ideal: float
    artifact_over_dense_fp16: float
    onnx_bytes: int | None = None
    onnx_over_gptq: float | None = None
    gguf_bytes: int | None = None
    gguf_over_gptq: float | None = None
    compressed_tensors_bytes: int | None = None


class RunReport(_Report):
    model: ModelFacts
    environment: dict[str, Any]  # device, dtype, threads, versions (and load: blockwise)
    recipe: dict[str, Any]  # the resolved recipe
    calibration: dict[str, Any]
    perplexity: PerplexityReport
    stages: list[StageReport]
    sparsity: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None
    timings: dict[str, dict[str, Any]] = {}
    size: SizeReport | None = None
    total_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """report.json's content (optional keys a run did not produce are left out)."""
        out = self.model_dump(mode="json")
        out["stages"] = [stage.model_dump(mode="json", exclude_none=True) for stage in self.stages]
        if self.size is not None:
            out["size"] = self.size.model_dump(mode="json", exclude_none=True)
        else:
            del out["size"]
        if self.perplexity.increase is None:
            del out["perplexity"]["increase"]
        if self.total_seconds is None:
            del out["total_seconds"]
        return out


REPORT_FILE = "report.json"


def read_report(artifact_dir: Path) -> RunReport | None:
    """The artifact's report.json, or None when it has none (or one this version cannot read)."""
    path = Path(artifact_dir) / REPORT_FILE
    try:
        return RunReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def _pct(a: float | None, b: float | None) -> str:
    return f"{100 * (b / a - 1):+.2f}%" if a and b else "n/a"


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f} MB" if n else "n/a"


def write_report(out_dir: Path, run_report: RunReport) -> list[Path]:
    out_dir = Path(out_dir)
    report = run_report.to_dict()
    paths = [out_dir / REPORT_FILE]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    layers = {}
    for i, stage in enumerate(report.get("stages", [])):
        for name, rec in stage.get("layers", {}).items():
            layers[f"{stage['kind']}:{name}"] = rec
    if layers:
        paths.append(plot_layer_errors(layers, out_dir / "layer_errors.png"))
    (out_dir / "report.md").write_text(render_markdown(report, has_plot=bool(layers)))
    paths.append(out_dir / "report.md")
    return paths


def render_markdown(r: dict[str, Any], has_plot: bool = True) -> str:
    ppl = r.get("perplexity", {})
    dense, comp = ppl.get("dense"), ppl.get("compressed")
    size = r.get("size", {})
    lines = [
        f"# compressor report: {r['model']['source']}",
        "",
        f"Architecture `{r['model']['model_type']}`, {r['model']['parameters'] / 1e6:.1f}M parameters; "
        f"compressed on {r['environment']['device']} with {r['environment']['threads']} threads; "
        f"total wall time {r['total_seconds']:.1f} s.",
        "",
        "## Quality",
        "",
        "| model | perplexity | windows x seq_len | predicted tokens |",
        "|---|---|---|---|",
    ]
    for label, res in (("dense", dense), ("compressed", comp)):
        if res:
            lines.append(f"| {label} | {res['perplexity']:.4f} | {res['windows']} x {res['seq_len']} | {res['tokens']} |")
    if dense and comp:
        lines += ["", f"Perplexity change: **{_pct(dense['perplexity'], comp['perplexity'])}** "
                  f"(evaluation data: `{ppl.get('source', '?')}`)."]  # fmt: skip
    lines += [
        "",
        "## Size",
        "",
        "| what | bytes |",
        "|---|---|",
        f"| artifact weights (safetensors) | {_mb(size.get('artifact_weights_bytes'))} |",
        f"| ideal packed size (codes + scales + zeros + g_idx + fp16 rest) | {_mb(size.get('ideal_bytes'))} |",
        f"| dense model in fp16 | {_mb(size.get('dense_fp16_bytes'))} |",
        "",
        f"Artifact / ideal: **{size.get('artifact_over_ideal', float('nan')):.3f}x**; "
        f"artifact / dense fp16: **{size.get('artifact_over_dense_fp16', float('nan')):.3f}x**.",
        "",
        "## Stages",
        "",
        "| # | stage | options | wall time | peak memory |",
        "|---|---|---|---|---|",
    ]
    for i, st in enumerate(r.get("stages", [])):
        opts = ", ".join(f"{k}={v}" for k, v in st["options"].items() if k != "skip")
        m = st["measurement"]
        mem = f"{m['peak_rss_mb']:.0f} MB RSS" + (f", {m['peak_cuda_mb']:.0f} MB CUDA" if "peak_cuda_mb" in m else "")
        if st.get("fused_into"):  # ran inside the previous stage's pass: its time is counted there
            lines.append(f"| {i} | {st['kind']} | {opts} | in {st['fused_into']} | in {st['fused_into']} |")
        else:
            lines.append(f"| {i} | {st['kind']} | {opts} | {m['seconds']:.1f} s | {mem} |")
    for name, m in r.get("timings", {}).items():
        lines.append(f"| - | {name} | | {m['seconds']:.1f} s | {m['peak_rss_mb']:.0f} MB RSS |")
    if r.get("sparsity"):
        sp = r["sparsity"]
        lines += ["", "## Sparsity", "",
                  f"{sp['method']} ({sp['structure']}): {100 * sp['sparsity_of_pruned_linears']:.2f}% zeros in the "
                  f"{sp['pruned_linears']} pruned linears, {100 * sp['sparsity_of_block_linears']:.2f}% of all block "
                  "linear weights. Per-layer values are in `report.json` (stages[].layers[].sparsity)."]  # fmt: skip
    for i, st in enumerate(r.get("stages", [])):
        if st.get("distill"):
            d = st["distill"]
            lines += ["", f"## Distillation (stage {i})", "",
                      f"{d.get('steps')} steps, {d.get('tokens_seen', d.get('tokens', 0))} tokens in {d.get('wall_seconds', d.get('seconds', 0)):.0f} s; "
                      + (f"final perplexity {d['final_perplexity']:.4f}." if d.get("final_perplexity") is not None else "no evaluation data."), "",
                      f"![distillation curves](distill_stage{i}.png)"]  # fmt: skip
        if st.get("structured"):
            s_ = st["structured"]
            lines += ["", "## Structured pruning", "", "```", json.dumps({k: v for k, v in s_.items() if k != "removed"}, indent=1)[:2000], "```"]
        layers = st.get("layers", {})
        if not layers:
            continue
        errs = sorted(layers.items(), key=lambda kv: -kv[1]["relative_error"])
        lines += [
            "",
            f"## Per-layer error ({st['kind']})",
            "",
            "Relative output error on the calibration inputs, ||WX - W_hat X||^2 / ||WX||^2 "
            f"(mean {sum(v['relative_error'] for v in layers.values()) / len(layers):.2e}). Worst five:",
            "",
        ]
        # The third column is what the stage recorded per layer besides the error: a prune stage's
        # sparsity, a quantize stage's damping (after any escalation).
        extra = next((key for key in ("sparsity", "damp_percent") if all(key in v for v in layers.values())), None)
        if extra == "sparsity":
            lines += ["| layer | relative error | sparsity |", "|---|---|---|"]
            lines += [f"| `{n}` | {v['relative_error']:.3e} | {v['sparsity']:.3f} |" for n, v in errs[:5]]
        elif extra == "damp_percent":
            lines += ["| layer | relative error | damp |", "|---|---|---|"]
            lines += [f"| `{n}` | {v['relative_error']:.3e} | {v['damp_percent']:g} |" for n, v in errs[:5]]
        else:
            lines += ["| layer | relative error |", "|---|---|"]
            lines += [f"| `{n}` | {v['relative_error']:.3e} |" for n, v in errs[:5]]
    if has_plot:
        lines += ["", "![per-layer error](layer_errors.png)"]
    lines += ["", "The full numbers, including every layer, are in `report.json`.", ""]
    return "\n".join(lines)


def plot_layer_errors(layers: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Series per linear kind (q_proj, down_proj, ...) over the block index.
    series: dict[str, list[tuple[int, float]]] = {}
    kinds = {name.split(":", 1)[0] for name in layers}
    for name, rec in layers.items():
        kind, module = name.split(":", 1) if ":" in name else ("", name)
        parts = module.split(".")
        block = next((int(p) for p in parts if p.isdigit()), 0)
        label = f"{kind} {parts[-1]}" if len(kinds) > 1 else parts[-1]
        series.setdefault(label, []).append((block, rec["relative_error"]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error")
    ax.set_title("Per-layer error on calibration data")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
