"""The quantize stage: GPTQ (or RTN) on every block linear, driven by the layer-wise engine.

`quantize_(model, options, calibration_ids)` rewrites the model's linears in place with their
fake-quantized (dequantized) weights and returns the quantized records the exporter packs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.gptq import gptq_quantize, rtn_quantize_result
from compressor.algorithms.quant import QuantizedWeight
from compressor.architectures import architecture_of
from compressor.engine import EngineOptions, InputStatistics, run_layerwise
from compressor.recipe import QuantizeStage


@dataclass
class GPTQLayerwise:
    """The layer-wise algorithm the engine calls for each linear."""

    options: QuantizeStage
    keep_zeros: bool = False
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    def compress(self, linears: list[tuple[str, nn.Linear]], stats: InputStatistics) -> dict[str, dict[str, Any]]:
        o = self.options
        start = time.perf_counter()
        hessian = stats.hessian()
        # GPTQ treats output rows independently given H, so linears sharing an input (q/k/v,
        # gate/up) are quantized as one stacked matrix: one factorisation, one column loop.
        stacked = torch.cat([linear.weight.detach().float() for _, linear in linears])
        # After a prune stage, zeros are a mask to keep: GPTQ then never revives a pruned weight.
        mask = stacked != 0 if self.keep_zeros else None
        if o.method == "gptq":
            result = gptq_quantize(
                stacked, hessian, bits=o.bits, group_size=o.group_size, sym=o.sym,
                act_order=o.desc_act, static_groups=o.static_groups, block_size=o.block_size,
                damp_percent=o.damp_percent, max_damp_percent=o.max_damp_percent, mse=o.mse, mask=mask,
            )  # fmt: skip
        else:
            result = rtn_quantize_result(stacked, hessian, bits=o.bits, group_size=o.group_size, sym=o.sym)
        seconds = (time.perf_counter() - start) / len(linears)
        records, row = {}, 0
        for name, linear in linears:
            rows = slice(row, row + linear.out_features)
            row += linear.out_features
            weight_hat = result.weight[rows]
            records[name] = {
                "relative_error": result.rows_error(rows),
                "damp_percent": result.damp_percent,
                "seconds": seconds,
                "shape": [linear.out_features, linear.in_features],
            }
            linear.weight.data.copy_(weight_hat.to(linear.weight.dtype))
            self.quantized[name] = result.quantized.rows(rows).to("cpu")  # export packs on the CPU
        return records


@dataclass
class QuantizeOutcome:
    quantized: dict[str, QuantizedWeight]
    layers: dict[str, dict[str, Any]]


def quantize_(
    model: nn.Module,
    options: QuantizeStage,
    calibration_ids: torch.Tensor,
    engine: EngineOptions | None = None,
    keep_zeros: bool = False,
) -> QuantizeOutcome:
    """Quantize every block linear in place. `keep_zeros`: treat existing zeros as a pruning mask."""
    engine = engine or EngineOptions()
    engine.true_sequential = options.true_sequential
    engine.skip = tuple(options.skip)
    algorithm = GPTQLayerwise(options, keep_zeros)
    layers = run_layerwise(model, architecture_of(model), calibration_ids, algorithm, engine)
    return QuantizeOutcome(algorithm.quantized, layers)
