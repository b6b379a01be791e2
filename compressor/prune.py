"""The prune stage: unstructured / N:M pruning of every block linear on the layer-wise engine,
or structured pruning (channels, heads, layers) through `compressor.structured`.

`prune_(model, options, calibration_ids)` rewrites the model in place and returns one record per
linear (sparsity, relative output error). With `joint_quantize` (SparseGPT only), the kept
weights are also quantized in the same pass, and the quantized records are returned for export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.gptq import output_error
from compressor.algorithms.pruning import PruneResult, magnitude_prune, sparsegpt_prune, wanda_prune
from compressor.algorithms.quant import QuantizedWeight, grid_params, max_code
from compressor.architectures import architecture_of
from compressor.engine import EngineOptions, InputStatistics, is_skipped, run_layerwise
from compressor.recipe import PruneStage, QuantizeStage


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

        report = prune_structured_(model, options, calibration_ids, key=key, progress=engine.progress)
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
