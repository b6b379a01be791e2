"""2:4 semi-structured sparse linears on NVIDIA GPUs (compute capability >= 8.0).

A dense checkpoint pruned with `pattern: "2:4"` stores its zeros explicitly. On Ampere and
newer, `torch.sparse.to_sparse_semi_structured` compresses such a weight (half the values plus
2-bit indices) and runs the matmul on sparse tensor cores. Only fp16/bf16 weights on CUDA
qualify, and only linears whose weight really is 2:4 in every group of 4 inputs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compressor.algorithms.pruning import check_nm
from compressor.errors import UserError

log = logging.getLogger(__name__)


def semi_structured_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def sparsify_2_4_(model: nn.Module) -> list[str]:
    """Swap every 2:4-sparse fp16/bf16 linear weight on CUDA for its semi-structured form.

    Returns the names of the converted linears. Raises UserError where the hardware cannot.
    """
    device = next(model.parameters()).device
    if not semi_structured_supported(device):
        raise UserError(
            f"2:4 sparse kernels need a CUDA device with compute capability >= 8.0; the model is on {device}"
        )
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        weight = module.weight.detach()
        if weight.shape[1] % 4 or not check_nm(weight != 0, 2, 4):
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        converted.append(name)
    log.info("2:4 semi-structured: %d linears converted", len(converted))
    return converted
