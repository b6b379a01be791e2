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
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.algorithms.gptq import gptq_quantize, prepare_hessian, relative_error, row_output_errors, rtn_quantize_result
from compressor.algorithms.quant import QuantizedWeight
from compressor.architectures import architecture_of
from compressor.engine import EngineOptions, InputStatistics, run_layerwise
from compressor.options import Options


# A Hessian at least this big waits on disk while GPTQ's column loop runs: the loop needs only
# the inverse's factor, and H is needed again only for the output error at the end, so a layer
# holds one K x K buffer at a time instead of two (an 8B model's 14336-wide down projection:
# 0.82 GB each), for one write and one read of the file.
OFFLOAD_HESSIAN_BYTES = 256 << 20


# The options of a recipe's `quantize` stage (registered by compressor.stages.quantize).
class QuantizeStage(Options):
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="`gptq` (Hessian-aware) or `rtn` (round to nearest, a baseline)."
    )
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(
        64,
        description="Input rows sharing one scale/zero: -1 (one group per output) or a positive "
        "divisor of every quantized layer's input width.",
    )
    sym: bool = Field(True, description="Symmetric quantization (zero point fixed at 2^(bits-1)).")
    desc_act: bool = Field(
        True, description="Act-order: quantize columns by decreasing Hessian diagonal (the biggest quality lever)."
    )
    static_groups: bool = Field(
        True,
        description="Fix each group's grid before reordering, so g_idx stays k // group_size and "
        "act-order costs nothing at inference; false forms groups in act-order (g_idx permuted).",
    )
    damp_percent: float = Field(
        0.01, gt=0, lt=1, description="Damping added to the Hessian diagonal, as a fraction of its mean."
    )
    max_damp_percent: float = Field(
        1.0, gt=0, le=10, description="Damping escalates (x2, logged) up to this when the Hessian is not positive definite."
    )
    mse: bool = Field(
        True, description="Choose each group's range by searching shrink factors (100%..80%) for the least error."
    )
    block_size: int = Field(128, ge=1, description="GPTQ lazy-update block width (columns).")
    true_sequential: bool = Field(
        True,
        description="Quantize a block's linears in execution order (q/k/v, o, gate/up, down), each "
        "calibrated on the outputs of those already quantized.",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (glob patterns, e.g. `*.down_proj`) left unquantized.",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 or a positive integer")
        return v

    @model_validator(mode="after")
    def _static_needs_act_order(self) -> "QuantizeStage":
        if self.static_groups and self.group_size == -1:
            raise ValueError("static_groups needs a group_size other than -1")
        if self.max_damp_percent < self.damp_percent:
            raise ValueError("max_damp_percent must be >= damp_percent")
        return self


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
