"""The sequential layer-wise engine: one decoder block at a time, on calibration activations.

1. Capture the inputs of the first block (and the keyword arguments the model passes every block:
   rotary embeddings, attention mask) by running the model's embedding front with a hook that
   stops at block 0.
2. For each block: gather per-linear input statistics (the Hessian X^T X), let the layer-wise
   algorithm rewrite each linear's weight, and run the block to produce the next block's inputs.
   Each block therefore sees the outputs of the blocks already compressed before it, and only
   one block's activations are alive at a time.

The engine knows nothing about GPTQ: it calls a `LayerwiseAlgorithm` with a linear and its
input statistics. Inside a block, linears run in the architecture's groups (q/k/v, then o, then
gate/up, then down). With `true_sequential`, each group is calibrated on the outputs of the
groups already compressed. When all calibration samples go through the block in one batch, this
costs ONE forward per block: a hook on each group's first linear sees the group's input, has the
group compressed right there, and the forward continues with the new weights, so its output is
already the compressed block's output. With several batches, each group needs a partial pass
(stopped by an exception after its input is seen) and one final pass produces the outputs.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.architectures import Architecture
from compressor.monitor import return_freed_memory

log = logging.getLogger(__name__)


class InputStatistics:
    """Running X^T X of a linear's inputs, in float32 on the compute device."""

    def __init__(self, width: int, device: torch.device):
        self.width, self.device = width, device
        # Allocated at the first input, not with the block: a down projection's (0.8 GB for an
        # 8B model) would otherwise sit in memory while the block's earlier groups are compressed.
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self._finished = False

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.width, self.width, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("InputStatistics.add after hessian(): the sum was scaled in place")
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = self._zeros()
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X (GPTQ's normalisation; algorithms that need ||x_j|| use its diagonal).
        Scaled in place, once (no second K x K copy): the statistics are finished after this."""
        if self.sum is None:
            self.sum = self._zeros()
        if not self._finished:
            self.sum.mul_(2.0 / max(self.rows, 1))
            self._finished = True
        return self.sum


class LayerwiseAlgorithm(Protocol):
    """What the engine drives.

    `compress` gets the linears of one group (they read the same input, so they share `stats`),
    rewrites their weights in place and returns one record per linear name.
    """

    def compress(self, linears: list[tuple[str, nn.Linear]], stats: InputStatistics) -> dict[str, dict[str, Any]]: ...


class BlockVisitor(Protocol):
    """For a model whose blocks are not all in memory (compressor/blockwise.py): `before_block`
    puts block `index`'s weights on the compute device, `after_block` takes the compressed block
    away (writes it, frees it). The model's front (embeddings) is the visitor's to load."""

    def before_block(self, index: int, block: nn.Module) -> None: ...

    def after_block(self, index: int, block: nn.Module) -> None: ...


@dataclass
class EngineOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 0  # samples per forward through a block; 0 = auto from max_activation_gb
    max_activation_gb: float = 6.0
    true_sequential: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    progress: bool = True
    desc: str = "compress"


def is_skipped(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p for p in patterns)


class _StopForward(Exception):
    pass


def auto_batch_size(model: nn.Module, samples: int, seq_len: int, max_activation_gb: float) -> int:
    """Largest batch whose block activations fit the budget (rough: ~12 hidden-size tensors,
    2 intermediate-size ones, and the attention scores, per token, in float32)."""
    cfg = model.config
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = cfg.num_attention_heads
    per_sample = 4 * seq_len * (12 * hidden + 2 * inter + heads * seq_len)
    return max(1, min(samples, int(max_activation_gb * 2**30 // per_sample)))


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Architecture, input_ids: torch.Tensor, batch_size: int, device: torch.device):
    """Run the model front until block 0; return [(hidden_states, kwargs)] per batch."""
    first = arch.block_list(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    arch: Architecture,
    calibration_ids: torch.Tensor,
    algorithm: LayerwiseAlgorithm,
    options: EngineOptions,
    visitor: BlockVisitor | None = None,
) -> dict[str, dict[str, Any]]:
    """Compress every selected block linear of `model` in place; return one record per linear."""
    device = options.device
    samples, seq_len = calibration_ids.shape
    batch = options.batch_size or auto_batch_size(model, samples, seq_len, options.max_activation_gb)
    blocks = arch.block_list(model)

    # The blocks stay where they are (CPU) and visit `device` one at a time; the small front
    # (embeddings, rotary tables) moves to the device for the capture. A visitor loads them itself.
    offload = device.type != "cpu" and visitor is None
    if offload:
        _move_except_blocks(model, arch, device)
    inputs = capture_block_inputs(model, arch, calibration_ids, batch, device)
    if offload:
        _move_except_blocks(model, arch, torch.device("cpu"))

    records: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(blocks), desc=options.desc, unit="block", disable=not options.progress)
    for index, block in enumerate(blocks):
        if visitor is not None:
            visitor.before_block(index, block)
        else:
            block.to(device)
        groups = []
        for group in arch.linear_groups:
            members = [(f"{arch.blocks}.{index}.{rel}", block.get_submodule(rel)) for rel in group]
            members = [(n, m) for n, m in members if not is_skipped(n, options.skip)]
            if members:
                groups.append(members)
        inputs = _compress_block(block, groups, inputs, algorithm, options, records)
        if visitor is not None:
            visitor.after_block(index, block)
        elif offload:
            block.to("cpu")
        bar.update(1)
        bar.set_postfix_str(f"{len(records)} linears")
    bar.close()
    return records


def _move_except_blocks(model: nn.Module, arch: Architecture, to: torch.device | torch.dtype) -> None:
    """`model.to(to)` for everything outside the decoder blocks. The blocks are detached for the
    call, so torch's own conversion (which keeps a tied lm_head and embedding one parameter) does
    the rest."""
    parent, _, attr = arch.blocks.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    blocks = getattr(holder, attr)
    setattr(holder, attr, nn.ModuleList())
    try:
        model.to(to)
    finally:
        setattr(holder, attr, blocks)


def _compress_block(block, groups, inputs, algorithm, options, records):
    """Compress one block's groups; return the block outputs as the next block's inputs."""

    def compress_group(g: int) -> None:
        records.update(algorithm.compress(groups[g], group_stats[g]))
        group_stats[g] = None  # free the Hessian
        return_freed_memory()

    group_stats: list[InputStatistics | None] = [
        InputStatistics(members[0][1].in_features, options.device) for members in groups
    ]
    one_pass = len(inputs) == 1 and options.true_sequential
    active: set[int] = set()
    stop_after: int | None = None

    def make_hook(g: int):
        def hook(module, args):
            if g not in active:
                return None
            group_stats[g].add(args[0])
            if one_pass:
                compress_group(g)  # the forward continues with the compressed weights
                active.discard(g)
            elif g == stop_after:
                raise _StopForward
            return None

        return hook

    handles = [members[0][1].register_forward_pre_hook(make_hook(g)) for g, members in enumerate(groups)]
    try:
        if one_pass:
            active.update(range(len(groups)))
            hidden, kwargs = inputs[0]
            return [(_block_output(block(hidden, **kwargs)), kwargs)]
        phases = [[g] for g in range(len(groups))] if options.true_sequential else [list(range(len(groups)))]
        for phase in phases:
            active.clear()
            active.update(phase)
            stop_after = phase[-1]
            for hidden, kwargs in inputs:
                try:
                    block(hidden, **kwargs)
                except _StopForward:
                    pass
            for g in phase:
                compress_group(g)
        active.clear()
        return [(_block_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    finally:
        for h in handles:
            h.remove()
