"""Models larger than memory: the architecture without weights, and the weights read part by part.

`LazyModel.open(source)` builds the model from its config with every parameter on the meta
device (buffers such as RoPE's inv_freq are computed for real, they are not in checkpoints) and
indexes the safetensors shards by tensor name. `load(prefix)` then reads one submodule's tensors
(a decoder block, the embeddings) from the files, converts them to the compute dtype, and puts
them into the module; `release(prefix)` turns them back into meta tensors. Only what is loaded
takes memory: a block at a time, whatever the model's size.

Each read opens the shard, copies the tensors out and closes it again: a mapping kept open would
leave every page read so far counted in the process's resident memory until the end of the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError

log = logging.getLogger(__name__)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real.

    Non-persistent buffers (RoPE's inv_freq) are computed in __init__ and absent from
    checkpoints, so they must exist; parameters all come from the checkpoint, so keeping the
    randomly initialized ones would only cost time and memory.
    """
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a model directory (model.safetensors or an index of shards)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserError(f"model.source: {directory} has no model.safetensors or model.safetensors.index.json "
                        "(blockwise loading reads safetensors checkpoints)")  # fmt: skip
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of tensor data in a model directory's safetensors files."""
    return sum(p.stat().st_size for p in set(safetensors_files(directory).values()))


def parameter_count(config) -> int:
    """Parameters of the model `config` describes (built on the meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, total = set(), 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers (RoPE's inv_freq) to `device`; parameters, meta or not, stay where they are."""
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device.type != "meta":
                m._buffers[name] = b.to(device)


@dataclass
class LazyModel:
    """A causal LM whose parameters are read from its safetensors files one submodule at a time."""

    model: nn.Module
    files: dict[str, Path]  # tensor name -> shard
    dtype: torch.dtype  # what loaded tensors are converted to (the compute dtype)
    device: torch.device
    aliases: dict[str, str]  # a tied parameter's other names -> the name the checkpoint stores it under

    @classmethod
    def open(cls, directory: Path, dtype: torch.dtype, device: torch.device, config=None, trust_remote_code: bool = False) -> LazyModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        files = safetensors_files(directory)
        config = config or AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        model.requires_grad_(False)
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = sorted(names - set(files) - tied)
        if missing:
            raise UserError(f"model.source: {directory}: the checkpoint lacks {len(missing)} tensors the architecture "
                            f"needs, e.g. {missing[0]!r}")  # fmt: skip
        stored_as: dict[int, str] = {}  # parameter -> the name the checkpoint holds it under
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in files:
                stored_as.setdefault(id(p), name)
        aliases = {name: stored_as[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
                   if name not in files and id(p) in stored_as}  # fmt: skip
        return cls(model, files, dtype, torch.device(device), aliases)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """These tensors from the files, as stored (dtype unchanged), in memory (not mapped)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:  # closed right after: nothing stays mapped
                for name in file_names:
                    out[name] = f.get_tensor(name).clone()
        return out

    def load(self, prefix: str) -> nn.Module:
        """Read the parameters of submodule `prefix` into it, in the compute dtype, on the device;
        returns the submodule. A tied parameter loads its own copy (the tie is not kept)."""
        module = self.model.get_submodule(prefix)
        wanted = {f"{prefix}.{n}": n for n, p in module.named_parameters() if p.device.type == "meta"}
        source = {full: self.aliases.get(full, full) for full in wanted}  # tied lm_head: the embedding's tensor
        stored = self.read(sorted(set(source.values())))
        for full, rel in wanted.items():
            owner, _, attr = rel.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            old = getattr(holder, attr)
            tensor = stored[source[full]]
            if tuple(tensor.shape) != tuple(old.shape):
                raise UserError(f"model.source: tensor {full} has shape {tuple(tensor.shape)}, the config implies {tuple(old.shape)}")
            dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
            setattr(holder, attr, nn.Parameter(tensor.to(device=self.device, dtype=dtype), requires_grad=False))
        move_buffers(module, self.device)
        return module

    def release(self, prefix: str) -> None:
        """Free submodule `prefix`'s parameters (they become meta tensors again)."""
        module = self.model.get_submodule(prefix)
        for name, p in list(module.named_parameters()):
            owner, _, attr = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            setattr(holder, attr, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
