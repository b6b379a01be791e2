"""The prune stage: unstructured / N:M pruning of every block linear on the layer-wise engine,
or structured pruning (channels, heads, layers) through `compressor.structured`.

`prune_(model, options, calibration_ids)` rewrites the model in place and returns one record per
linear (sparsity, relative output error). With `joint_quantize` (SparseGPT only), the kept
weights are also quantized in the same pass, and the quantized records are returned for export.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.algorithms.gptq import output_error
from compressor.algorithms.pruning import PruneResult, magnitude_prune, sparsegpt_prune, wanda_prune
from compressor.algorithms.quant import QuantizedWeight, grid_params, max_code
from compressor.architectures import architecture_of
from compressor.engine import EngineOptions, InputStatistics, is_skipped, run_layerwise
from compressor.options import Options
from compressor.quantize import QuantizeStage


# The options of a recipe's `prune` stage (registered by compressor.stages.prune).
UNSTRUCTURED_METHODS = ("magnitude", "wanda", "sparsegpt")


class PruneStage(Options):
    method: Literal["magnitude", "wanda", "sparsegpt", "structured"] = Field(
        ..., description="`magnitude`, `wanda`, `sparsegpt` (per-weight or N:M) or `structured` (removes channels/heads/layers)."
    )
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="Unstructured: fraction of each linear's weights set to zero (per output row)."
    )
    pattern: str | None = Field(
        None,
        description="Semi-structured N:M, e.g. `2:4`: every 4 consecutive inputs keep at most 2 weights "
        "(`sparsity` may be given too, and must then equal (M-N)/M).",
    )
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer overrides of `sparsity`: glob pattern of module names -> sparsity (first match wins).",
    )
    target: Literal["mlp_channels", "heads", "layers"] | None = Field(
        None, description="Structured: what to remove."
    )
    ratio: float | None = Field(
        None, gt=0, lt=1, description="Structured mlp_channels/heads: fraction to remove (uniform across layers)."
    )
    count: int | None = Field(None, ge=1, description="Structured layers: how many decoder layers to remove.")
    heads_mode: Literal["query", "groups"] = Field(
        "query",
        description="Structured heads with GQA: `query` drops the same number of query heads inside every "
        "key/value group; `groups` drops whole key/value groups with their query heads.",
    )
    block_size: int = Field(128, ge=1, description="SparseGPT: columns per mask-selection block.")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="SparseGPT: Hessian damping (fraction of the mean diagonal).")
    joint_quantize: bool = Field(
        False,
        description="SparseGPT only: quantize the kept weights in the same pass with the settings of the "
        "quantize stage that must directly follow (SparseGPT+GPTQ in one pass).",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (glob patterns) left dense; embeddings are never pruned.",
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_is_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
            raise ValueError("must be a quoted 'N:M' string, e.g. pattern: \"2:4\" (unquoted, YAML reads 2:4 as the number 124)")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(v))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError("must be 'N:M' with 0 < N < M, e.g. '2:4' or '4:8'")
        return f"{int(m.group(1))}:{int(m.group(2))}"

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if not 0 <= value < 1:
                raise ValueError(f"sparsity for {key!r} must be in [0, 1), got {value}")
        return v

    @model_validator(mode="after")
    def _method_fields(self) -> "PruneStage":
        if self.method in UNSTRUCTURED_METHODS:
            if self.sparsity is None and self.pattern is None:
                raise ValueError(f"method {self.method} needs `sparsity` or an N:M `pattern`")
            if self.pattern is not None and self.sparsity is not None:
                n, m = self.nm()
                if abs(self.sparsity - (m - n) / m) > 1e-9:
                    raise ValueError(f"pattern {self.pattern} means sparsity {(m - n) / m:g}, not {self.sparsity:g}")
            if self.pattern is not None and self.layer_sparsity:
                raise ValueError("layer_sparsity applies to `sparsity`, not to an N:M `pattern`")
            if self.target or self.ratio or self.count:
                raise ValueError("`target`, `ratio` and `count` belong to method: structured")
            if self.joint_quantize and self.method != "sparsegpt":
                raise ValueError("joint_quantize needs method: sparsegpt")
        else:
            if self.target is None:
                raise ValueError("method structured needs `target`: mlp_channels, heads or layers")
            if self.target == "layers" and (self.count is None or self.ratio is not None):
                raise ValueError("target layers needs `count` (number of layers to remove), not `ratio`")
            if self.target != "layers" and (self.ratio is None or self.count is not None):
                raise ValueError(f"target {self.target} needs `ratio` (fraction to remove), not `count`")
            if self.sparsity is not None or self.pattern is not None or self.joint_quantize:
                raise ValueError("`sparsity`, `pattern` and `joint_quantize` belong to unstructured methods")
        return self

    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


def layer_sparsity(name: str, options: PruneStage) -> float | None:
    """The target sparsity of one linear: the first matching `layer_sparsity` glob, else `sparsity`."""
    for pattern, value in options.layer_sparsity.items():
        if is_skipped(name, [pattern]):
            return value
    return options.sparsity


def _static_grid_quantizer(weight: torch.Tensor, q: QuantizeStage):
    """Per-group grids fixed from the dense weight (static groups), and a column quantizer on them.

    Joint SparseGPT+GPTQ sees one column at a time, so the grid cannot follow the updates inside a
    group as plain GPTQ's does; fixing it beforehand is GPTQ's `static_groups`.
    """
    n, k = weight.shape
    gs = k if q.group_size == -1 else q.group_size
    scales = torch.empty(k // gs, n, device=weight.device)
    zeros = torch.empty(k // gs, n, device=weight.device)
    for g in range(k // gs):
        scales[g], zeros[g] = grid_params(weight[:, g * gs : (g + 1) * gs], q.bits, q.sym, q.mse)
    maxq = max_code(q.bits)

    def quantize_column(w: torch.Tensor, col: int) -> torch.Tensor:
        s, z = scales[col // gs], zeros[col // gs]
        return s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)

    def record(w_hat: torch.Tensor, rows: slice) -> QuantizedWeight:
        """The quantized record of output rows `rows` of the stacked weight."""
        g_idx = torch.arange(k, device=w_hat.device) // gs
        group_scales, group_zeros = scales[:, rows], zeros[:, rows]
        s, z = group_scales[g_idx].T, group_zeros[g_idx].T
        codes = torch.clamp(torch.round(w_hat / s) + z, 0, maxq)  # exact: w_hat lies on the grid
        return QuantizedWeight(codes.to(torch.uint8), group_scales.half(), group_zeros.to(torch.uint8),
                               g_idx.to(torch.int32), q.bits, q.group_size, q.sym)  # fmt: skip

    return quantize_column, record


@dataclass
class PruneLayerwise:
    """The layer-wise algorithm the engine calls for each group of linears sharing an input."""

    options: PruneStage
    joint: QuantizeStage | None = None
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    def _prune(self, weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None) -> tuple[PruneResult, Any]:
        o = self.options
        pattern = o.nm()
        target = None if pattern else sparsity
        if o.method == "magnitude":
            return magnitude_prune(weight, target, pattern), None
        if o.method == "wanda":
            return wanda_prune(weight, hessian, target, pattern), None
        quantizer = record = None
        if self.joint is not None:
            quantizer, record = _static_grid_quantizer(weight, self.joint)
        result = sparsegpt_prune(weight, hessian, target, pattern, o.block_size, o.damp_percent, quantizer=quantizer)
        return result, record

    def compress(self, linears: list[tuple[str, nn.Linear]], stats: InputStatistics) -> dict[str, dict[str, Any]]:
        start = time.perf_counter()
        hessian = stats.hessian()
        # Rows are pruned independently, so linears sharing an input and a target are stacked.
        batches: dict[float | None, list[tuple[str, nn.Linear]]] = {}
        for name, linear in linears:
            batches.setdefault(layer_sparsity(name, self.options), []).append((name, linear))
        records = {}
        for sparsity, members in batches.items():
            stacked = torch.cat([linear.weight.detach().float() for _, linear in members])
            result, record = self._prune(stacked, hessian, sparsity)
            row = 0
            for name, linear in members:
                rows = slice(row, row + linear.out_features)
                row += linear.out_features
                pruned = result.weight[rows]
                records[name] = {
                    "sparsity": float((pruned == 0).float().mean()),
                    "target_sparsity": sparsity if not self.options.pattern else None,
                    "relative_error": result.rows_error(rows) if result.row_errors is not None else output_error(linear.weight, pruned, hessian),
                    "shape": [linear.out_features, linear.in_features],
                }
                linear.weight.data.copy_(pruned.to(linear.weight.dtype))
                if record is not None:
                    self.quantized[name] = record(pruned, rows).to("cpu")
        elapsed = (time.perf_counter() - start) / len(linears)
        for rec in records.values():
            rec["seconds"] = elapsed
        return records


@dataclass
class PruneOutcome:
    layers: dict[str, dict[str, Any]]
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # joint_quantize only
    structured: dict[str, Any] | None = None


def prune_(
    model: nn.Module,
    options: PruneStage,
    calibration_ids: torch.Tensor,
    engine: EngineOptions | None = None,
    joint: QuantizeStage | None = None,
    key: str = "stages[i].prune",
) -> PruneOutcome:
    engine = engine or EngineOptions()
    if options.method == "structured":
        from compressor.structured import prune_structured_

        report = prune_structured_(model, options, calibration_ids, key=key, batch_size=engine.batch_size, progress=engine.progress,
                                   device=engine.device, max_activation_gb=engine.max_activation_gb)  # fmt: skip
        return PruneOutcome(layers={}, structured=report)
    engine.true_sequential = True
    engine.skip = tuple(options.skip)
    algorithm = PruneLayerwise(options, joint)
    layers = run_layerwise(model, architecture_of(model), calibration_ids, algorithm, engine)
    return PruneOutcome(layers, algorithm.quantized)


def sparsity_summary(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overall sparsity of the pruned linears and of all block linears, for report and config."""
    pruned_zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers.values())
    pruned_total = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    arch = architecture_of(model)
    all_total = sum(n * k for n, k in (
        (lin.out_features, lin.in_features) for block in arch.block_list(model) for lin in arch.block_linears(block).values()
    ))  # fmt: skip
    return {
        "pruned_linears": len(layers),
        "sparsity_of_pruned_linears": pruned_zeros / pruned_total if pruned_total else 0.0,
        "sparsity_of_block_linears": pruned_zeros / all_total if all_total else 0.0,
    }


def sparsity_config(sparsity: dict, pruned_names, ignore: list[str]) -> dict:
    """config.json's `compressor_sparsity`, so a loader or a person can see the weights are sparse."""
    return {
        "structure": sparsity["structure"],
        "method": sparsity["method"],
        "global_sparsity": round(sparsity["sparsity_of_block_linears"], 6),
        "sparsity_of_pruned_linears": round(sparsity["sparsity_of_pruned_linears"], 6),
        "targets": sorted({name.split(".")[-1] for name in pruned_names}),
        "ignore": list(ignore),
    }
