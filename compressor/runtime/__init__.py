"""Run GPTQ v1 checkpoints (ours or AutoGPTQ/GPTQModel ones) with plain PyTorch + transformers.

`load` builds the architecture from config.json with its parameters on the meta device (no
memory, no random init), swaps every Linear whose `<name>.qweight` is in the checkpoint for a
`QuantLinear`, and assigns the stored tensors. No gptqmodel/optimum is needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from compressor.errors import ArtifactError
from compressor.artifacts.checkpoint import gptq_config, is_gptq_artifact, plain_config, read_gptq_tensors, weight_files
from compressor.artifacts.directory import verify_for_loading
from compressor.lazy import parameters_on_meta
from compressor.packing import dequantize_gptq_v1
from compressor.runtime.quant_linear import QuantLinear, register_kernel

__all__ = [
    "QuantLinear",
    "dequantize_gptq_v1",
    "gptq_config",
    "default_dtype",
    "is_gptq_artifact",
    "load",
    "load_tokenizer",
    "memory_bytes",
    "memory_estimate",
    "register_kernel",
]

log = logging.getLogger(__name__)


def _cuda_kernel(module: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear on CUDA inputs: compressor.kernels, imported (and its library built) on first use."""
    from compressor.kernels.ops import quant_linear_forward

    return quant_linear_forward(module, x)


def _cpu_kernel(module: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear on CPU inputs: compressor.kernels.cpu (its library built on first use). The
    first call imports it and registers its hook in place of this one (it runs per layer per token)."""
    from compressor.kernels.cpu import quant_linear_forward

    register_kernel("cpu", quant_linear_forward)
    return quant_linear_forward(module, x)


# Python hooks only: nothing is compiled or loaded at import
register_kernel("cuda", _cuda_kernel)
register_kernel("cpu", _cpu_kernel)


_LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_REQUIRED_LAYER_TENSORS = ("qweight", "qzeros", "scales")


def _storage_ranges(tensors) -> list[tuple[int, int]]:
    """[start, end) addresses of the storages behind `tensors`."""
    spans = {(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in (t.untyped_storage() for t in tensors)}
    return sorted(spans)


def _copy_file_backed(model, file_ranges: list[tuple[int, int]]) -> None:
    """Give every parameter and buffer still backed by the mapped checkpoint files a copy in this
    process's memory. Then the model never reads the files lazily: a file rewritten under a
    running server cannot change or fault its weights. Tensors already copied on the way (dtype casts, fused linears) are left alone, so nothing is
    copied twice."""
    copies: dict[int, torch.Tensor] = {}  # data_ptr -> copy: tied weights stay tied

    def own(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not any(lo <= t.data_ptr() < hi for lo, hi in file_ranges):
            return t
        if t.data_ptr() not in copies:
            copies[t.data_ptr()] = t.detach().clone()
        return copies[t.data_ptr()]

    for module in model.modules():
        for name, p in module._parameters.items():
            copy = own(p)
            if copy is not p:
                module._parameters[name] = nn.Parameter(copy, requires_grad=False)
        for name, b in module._buffers.items():
            module._buffers[name] = own(b)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or of transformers' Conv1D (GPT-2), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # weight stored [in, out]
        return tuple(module.weight.shape)
    return None


def _install_quant_linears(model, tensors: dict, bits: int, group_size, cache_dequantized: bool, path: Path) -> None:
    """Replace each module with `<name>.qweight` in `tensors` by a QuantLinear; consumes its tensors."""
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise ArtifactError(f"{path}: declares GPTQ but holds no '.qweight' tensors")
    for name in names:
        layer = {s: tensors.pop(f"{name}.{s}") for s in _LAYER_TENSORS if f"{name}.{s}" in tensors}
        tensors.pop(f"{name}.weight", None)  # a stray float copy would be unexpected anyway
        missing = [f"{name}.{s}" for s in _REQUIRED_LAYER_TENSORS if s not in layer]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{path}: {name}.qweight names no module of {type(model).__name__}") from None
        shape = _linear_shape(module)
        if shape is None:
            raise ArtifactError(f"{path}: {name} is a {type(module).__name__}, not a linear layer, but has qweight")
        if getattr(module, "bias", None) is not None and "bias" not in layer:
            missing.append(f"{name}.bias")
        if missing:
            raise ArtifactError(f"{path}: missing tensors {', '.join(missing)}")
        try:
            quant = QuantLinear.from_tensors(layer, bits, group_size, cache_dequantized)
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"{path}: {name}: {exc}") from None
        if (quant.in_features, quant.out_features) != shape:
            raise ArtifactError(
                f"{path}: {name} packs a {quant.in_features}->{quant.out_features} weight; the architecture has {shape[0]}->{shape[1]}"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quant)


def default_dtype(device) -> torch.dtype:
    """The compute dtype `load` uses when none is given: float16 on CUDA, float32 on CPU.

    Float32 on CPU by measurement (BENCHMARKS.md, CPU runtime): the CPU kernels accumulate in
    float32 either way, and on CPUs without native bfloat16 arithmetic (AVX2) torch's bfloat16
    attention, norms and GEMMs are slower than float32, and bfloat16 moves the greedy outputs.
    """
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _float16_storage(device: torch.device, dtype: torch.dtype, cache_dequantized: bool) -> bool:
    """Whether a CPU float32 model keeps the artifact's float16 embeddings/lm_head as float16
    (half_weights.py): only where the CPU kernel computes lm_head from them."""
    if device.type != "cpu" or dtype != torch.float32 or cache_dequantized:
        return False
    from compressor.kernels import cpu

    return cpu.available()


def _embedding_weight_names(model) -> set[str]:
    """State-dict names of the plain nn.Embedding input embeddings and nn.Linear lm_head weights."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if type(m) in (nn.Embedding, nn.Linear)}
    return {f"{name}.weight" for name, module in model.named_modules() if id(module) in wanted}


def _use_float16_storage(model, dtype: torch.dtype) -> None:
    """Swap float16 nn.Embedding / lm_head for modules that keep float16 weights and compute in `dtype`."""
    from compressor.runtime.half_weights import Float16Embedding, Float16Linear

    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is nn.Embedding and embedding.weight.dtype == torch.float16:
        model.set_input_embeddings(Float16Embedding(embedding.weight.data, dtype, embedding.padding_idx))
    if type(output) is nn.Linear and output.weight.dtype == torch.float16:
        tied = output.weight is embedding.weight
        weight = model.get_input_embeddings().weight if tied else output.weight.data  # one tensor for both when tied
        model.set_output_embeddings(Float16Linear(weight, None if output.bias is None else output.bias.data, dtype))


def memory_bytes(model) -> dict[str, int]:
    """Bytes of the tensors `model` holds, each storage counted once: "packed" (QuantLinear buffers
    and the CPU kernels' act-order copies), "float" (everything else) and "total"."""
    seen: set[int] = set()
    packed = other = 0

    def size(t: torch.Tensor | None) -> int:
        if t is None or t.device.type == "meta":
            return 0
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    from compressor.kernels.cpu import prepared_weight

    for module in model.modules():
        if isinstance(module, QuantLinear):
            prepared = prepared_weight(module)
            packed += sum(size(t) for t in module.buffers(recurse=False))
            packed += 0 if prepared is None else size(prepared.qweight) + size(prepared.bias)  # act-order copy; float32 bias
            other += size(module._dequantized)  # the opt-in float cache
        else:
            other += sum(size(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    return {"packed": packed, "float": other, "total": packed + other}


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def memory_estimate(path, device="cpu", dtype: torch.dtype | None = None, cache_dequantized: bool = False) -> dict[str, int]:
    """What `memory_bytes(load(path, device, dtype, cache_dequantized))` will report, from the
    safetensors headers and the architecture on the meta device: nothing is read or allocated.
    (The opt-in float cache is counted as it will be after one forward.)"""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path, device = Path(path), torch.device(device)
    qconfig = gptq_config(path)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_config(path), dtype=dtype)
    keep_float16 = _embedding_weight_names(model) if _float16_storage(device, dtype, cache_dequantized) else set()
    float_size = torch.empty((), dtype=dtype).element_size()
    packed = other = 0
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            raise ArtifactError(f"{file}: memory estimates read safetensors headers only")
        with safe_open(file, "pt") as f:
            names = set(f.keys())
            for name in names:
                piece = f.get_slice(name)
                numel, stored = math.prod(piece.get_shape()), piece.get_dtype()
                prefix, _, kind = name.rpartition(".")
                if kind in _LAYER_TENSORS and f"{prefix}.qweight" in names:
                    packed += numel * _SAFETENSORS_BYTES[stored]
                    if name.endswith(".qweight") and cache_dequantized:  # the float copy of W
                        other += numel * 32 // qconfig["bits"] * float_size
                elif stored in ("F16", "BF16", "F32", "F64"):
                    other += numel * (2 if name in keep_float16 else float_size)
                else:
                    other += numel * _SAFETENSORS_BYTES[stored]
    return {"packed": packed, "float": other, "total": packed + other}


def _fuse_shared_input_linears(model) -> None:
    """On CPU, linears of a block that read the same input (architectures.py's linear groups:
    q/k/v, gate/up) run as one kernel call (compressor.kernels.cpu.FusedLinears)."""
    from compressor.architectures import ARCHITECTURES
    from compressor.kernels import cpu

    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if arch is None:
        return
    fused = 0
    for block in arch.block_list(model):
        for names in arch.linear_groups:
            members = [block.get_submodule(name) for name in names]
            if len(members) > 1 and all(isinstance(m, QuantLinear) for m in members) and cpu.fuse(members) is not None:
                fused += 1
    if fused:
        log.info("CPU kernels: %d groups of linears that share an input run as one call each", fused)


def _resident_set_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def load(path, device="cpu", dtype: torch.dtype | None = None, verify: bool = True, cache_dequantized: bool = False):
    """A transformers causal LM whose GPTQ-quantized linears are `QuantLinear`, in eval mode on `device`.

    The packed weights stay packed and the kernels (CUDA; AVX2 CPUs) multiply with them. Float
    tensors are cast to `dtype` (default: `default_dtype(device)`), except that a float32 model on
    a CPU keeps the artifact's float16 embeddings/lm_head as they are (half_weights.py).
    `cache_dequantized=True` opts in to a float model instead (QuantLinear). With `verify`, the
    manifest is checked first (every file hashed, nothing unlisted, no path out of the directory;
    without a manifest a "not verified" warning is logged). Logs the bytes held and the RSS growth.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a directory; expected a GPTQ checkpoint directory")
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: no config.json; expected a GPTQ checkpoint directory")
    if verify:
        verify_for_loading(path)
    qconfig = gptq_config(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    rss_before = _resident_set_bytes()

    config = plain_config(path)
    tensors = read_gptq_tensors(path, qconfig)
    file_ranges = _storage_ranges(tensors.values())

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _install_quant_linears(model, tensors, qconfig["bits"], qconfig.get("group_size"), cache_dequantized, path)

    keep_float16 = _embedding_weight_names(model) if _float16_storage(device, dtype, cache_dequantized) else set()
    state = {name: t.to(dtype) if t.is_floating_point() and name not in keep_float16 else t for name, t in tensors.items()}
    for module in model.modules():  # QuantLinear biases follow the float dtype; scales stay fp16 (exact)
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.bias = module.bias.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ArtifactError(f"{path}: tensors do not fit the architecture: {' '.join(str(exc).split())[:400]}") from None
    model.tie_weights()  # e.g. lm_head from the embeddings when tie_word_embeddings
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ArtifactError(f"{path}: missing tensors {shown}")
    if result.unexpected_keys:
        log.warning("%s: ignoring %d tensors the architecture does not use: %s", path, len(result.unexpected_keys),
                    ", ".join(result.unexpected_keys[:5]))
    if keep_float16:
        _use_float16_storage(model, dtype)

    model.config.quantization_config = qconfig  # for reference: what the packed weights are
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if device.type == "cpu" and not cache_dequantized:
        _fuse_shared_input_linears(model)  # copies the fused groups' buffers out of the files
    _copy_file_backed(model, file_ranges)
    if not cache_dequantized:  # prepare every layer for the kernels now rather than on the first forward
        if device.type == "cuda":
            from compressor.kernels.ops import prepare_layers
        else:
            from compressor.kernels.cpu import prepare_layers
        prepare_layers([m for m in model.modules() if isinstance(m, QuantLinear)])
    held = memory_bytes(model)
    log.info(
        "loaded %s on %s (%s): %.1f MB held (packed linears %.1f MB, float tensors %.1f MB%s); process RSS +%.1f MB",
        path, device, str(dtype).removeprefix("torch."), held["total"] / 1e6, held["packed"] / 1e6, held["float"] / 1e6,
        ", float16 embeddings" if keep_float16 else "", (_resident_set_bytes() - rss_before) / 1e6,
    )  # fmt: skip
    return model


def load_tokenizer(path):
    """The tokenizer saved next to the checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None
