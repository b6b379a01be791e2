"""A linear layer that holds GPTQ v1 packed weights and computes with them.

By default it multiplies with the packed weights: a kernel registered for the input's device
(`register_kernel`: compressor.kernels on CUDA and on AVX2 CPUs) reads them directly, and where
no kernel applies (other CPUs, 2/3-bit codes, long prefills) the weight is dequantized for the
call and dropped, so memory stays that of the packed weights.

`cache_dequantized=True` is the explicit opt-in to a float model: the dequantized weight is kept
after the first call and every call is a plain F.linear on it (kernels are skipped): the speed
and bit-exact numerics of the float model, and its memory too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from compressor.packing import SUPPORTED_BITS, dequantize_gptq_v1, infer_group_size

# device type -> kernel(module, x) returning the output, or None to fall back to dequantize + F.linear
Kernel = Callable[["QuantLinear", torch.Tensor], "torch.Tensor | None"]
_KERNELS: dict[str, Kernel] = {}


def register_kernel(device_type: str, kernel: Kernel | None) -> None:
    """Use `kernel` for inputs on `device_type` ("cuda", ...); None removes it."""
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")  # fmt: skip


def _has_global_module_hooks() -> bool:
    """Whether any nn.Module-wide hook is registered (torch's private registries; absent ones count as empty)."""
    return any(getattr(torch_module, name, None) for name in _GLOBAL_HOOKS)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as GPTQ v1 buffers (qweight, qzeros, scales, g_idx, bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        cache_dequantized: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size * bits % 32:
                raise ValueError(f"{what}={size} cannot be packed at {bits} bits (needs {what}*bits % 32 == 0)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.cache_dequantized = cache_dequantized
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        group_of_column = torch.zeros(in_features) if group_size == -1 else torch.arange(in_features) // group_size

        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", group_of_column.to(device=device, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        bits: int,
        group_size: int | None = None,
        cache_dequantized: bool = False,
    ) -> QuantLinear:
        """Build from one layer's checkpoint tensors (keys qweight, qzeros, scales, optional g_idx, bias).

        The shapes come from the tensors; `group_size` is only needed when g_idx is absent.
        """
        qweight, scales = tensors["qweight"], tensors["scales"]
        in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
        groups = scales.shape[0]
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            group_size = group_size if group_size is not None else (-1 if groups == 1 else in_features // groups)
            g_idx = torch.zeros(in_features) if group_size == -1 else torch.arange(in_features) // group_size
        else:
            group_size = infer_group_size(g_idx, groups)

        module = cls(in_features, out_features, bits, group_size, "bias" in tensors, cache_dequantized, device="meta")
        given = {**tensors, "g_idx": g_idx.to(torch.int32)}
        for name, expected in module.named_buffers(recurse=False):
            tensor = given[name]
            if tuple(tensor.shape) != tuple(expected.shape):
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} does not fit a {bits}-bit {in_features}->{out_features} "
                    f"layer with group size {group_size} (expected {tuple(expected.shape)})"
                )
            if tensor.is_floating_point() != expected.is_floating_point():
                raise ValueError(f"{name}: dtype {tensor.dtype} where {expected.dtype} was expected")
            setattr(module, name, tensor if tensor.is_floating_point() else tensor.to(torch.int32))
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [N, K] in `dtype`, from the cache when it holds the right one."""
        if not self.cache_dequantized:
            self._dequantized = None  # the flag may have been switched off after a cached call
            return dequantize_gptq_v1(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)
        cached = self._dequantized
        if cached is None or cached.dtype != dtype or cached.device != self.qweight.device:
            cached = dequantize_gptq_v1(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)
            self._dequantized = cached
        return cached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A decoded token calls this a few hundred times; nn.Module.__call__'s hook handling costs
        # several microseconds each, so it is skipped when no hook of any kind is registered.
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks or _has_global_module_hooks():
            return super().__call__(x)
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            kernel = None
        else:
            if self._dequantized is not None:  # the flag was switched off after a cached call
                self._dequantized = None
            kernel = _KERNELS.get("cpu" if x.is_cpu else x.device.type)
        if kernel is not None:
            out = kernel(self, x)
            if out is not None:
                return out
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() change the buffers; a cached weight from before would be stale.
        self._dequantized = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, cache_dequantized={self.cache_dequantized}"
        )
