"""The quantize stage: GPTQ (or RTN) on every block linear, driven by the layer-wise engine.

`quantize_(model, options, calibration_ids)` rewrites the model's linears in place with their
fake-quantized (dequantized) weights and returns the quantized records the exporter packs.
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.gptq import gptq_quantize, prepare_hessian, relative_error, row_output_errors, rtn_quantize_result
from compressor.algorithms.quant import QuantizedWeight
from compressor.architectures import architecture_of
from compressor.engine import EngineOptions, InputStatistics, run_layerwise
from compressor.recipe import QuantizeStage


# A Hessian at least this big waits on disk while GPTQ's column loop runs: the loop needs only
# the inverse's factor, and H is needed again only for the output error at the end, so a layer
# holds one K x K buffer at a time instead of two (an 8B model's 14336-wide down projection:
# 0.82 GB each), for one write and one read of the file.
OFFLOAD_HESSIAN_BYTES = 256 << 20


@contextmanager
def tensor_on_disk(tensor: torch.Tensor):
    """Free `tensor`'s memory for the duration of the block: its bytes wait in a temporary file
    and are read back into it (the same tensor object, so every reference to it stays valid)."""
    storage = tensor.untyped_storage()
    if not tensor.is_contiguous() or tensor.storage_offset() or storage.nbytes() != tensor.numel() * tensor.element_size():
        yield  # a view of something bigger: nothing to free
        return
    nbytes = storage.nbytes()
    with tempfile.TemporaryFile(prefix="compressor-hessian-") as file:
        file.write(_raw_bytes(tensor, nbytes))
        storage.resize_(0)
        try:
            yield
        finally:
            storage.resize_(nbytes)
            file.seek(0)
            view, done = memoryview(_raw_bytes(tensor, nbytes)).cast("B"), 0
            while done < nbytes:
                read = file.readinto(view[done:])
                if not read:
                    raise OSError(f"the Hessian's temporary file ended {nbytes - done} bytes early")
                done += read


def _raw_bytes(tensor: torch.Tensor, nbytes: int):
    # Through ctypes, not .numpy(): numpy's view would make the storage non-resizable for good.
    return (ctypes.c_char * nbytes).from_address(tensor.data_ptr())


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
        stacked = torch.cat([linear.weight.detach().float() for _, linear in linears]) if len(linears) > 1 else linears[0][1].weight.detach().float()
        # After a prune stage, zeros are a mask to keep: GPTQ then never revives a pruned weight.
        mask = stacked != 0 if self.keep_zeros else None
        if o.method == "gptq":
            prepared = prepare_hessian(hessian, act_order=o.desc_act, damp_percent=o.damp_percent, max_damp_percent=o.max_damp_percent)
            options = dict(bits=o.bits, group_size=o.group_size, sym=o.sym, act_order=o.desc_act, static_groups=o.static_groups,
                           block_size=o.block_size, damp_percent=o.damp_percent, max_damp_percent=o.max_damp_percent,
                           mse=o.mse, mask=mask, prepared=prepared)  # fmt: skip
            if hessian.device.type == "cpu" and hessian.numel() * hessian.element_size() >= OFFLOAD_HESSIAN_BYTES:
                with tensor_on_disk(hessian):
                    result = gptq_quantize(stacked, None, **options)
                    del prepared, options  # the factor is freed before H's memory comes back
                result.row_errors = row_output_errors(stacked, result.weight, hessian)
                result.relative_error = relative_error(*result.row_errors)
            else:
                result = gptq_quantize(stacked, hessian, **options)
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
