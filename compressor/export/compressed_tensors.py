"""GPTQ v1 artifact -> compressed-tensors checkpoint (`pack-quantized`), what llm-compressor writes
for W4A16 / W8A16 group quantization, and what vLLM and transformers load with `quant_method:
compressed-tensors`.

Tensors, per quantized linear X with weight W [N, K] and G groups along K:
  X.weight_packed      int32 [N, K*bits/32]   codes along K, value k at bits [k*bits, (k+1)*bits) of the row
  X.weight_scale       [N, G]                 the GPTQ scales, transposed, in their stored dtype (fp16)
  X.weight_zero_point  int32 [N*bits/32, G]   asymmetric only: the zero points, packed along N
  X.weight_shape       int64 [2]              (N, K)
  X.bias                                      as stored, when the linear has one
Every other tensor (embeddings, norms, linears left unquantized, an untied lm_head) is copied
under its own name as stored (float16 in our artifacts). Linears that are not quantized are
listed in `ignore`, so the loader leaves them float.

The mapping from GPTQ v1 (codes c in [0, 2^b), zero points Z that qzeros stores as Z - 1):
compressed-tensors thinks in signed codes q = c - 2^(b-1) and zero points z = Z - 2^(b-1), and
dequantizes W = (q - z) * scale = (c - Z) * scale: the same weight. Its packer (`pack_to_int32`)
stores q + 2^(b-1) = c, little-endian along K, so for 4 and 8 bits `weight_packed` is exactly
`qweight` transposed; the zero points are stored as Z. Symmetric GPTQ has Z = 2^(b-1) everywhere,
i.e. z = 0, which compressed-tensors leaves out of the file (as llm-compressor does). Nothing is
quantized again: the codes are unpacked (`unpack_gptq_v1`) and packed again as they are.
compressed-tensors decompresses in the scale's dtype, so in float16 the weight transformers
rebuilds equals `dequantize_gptq_v1(..., torch.float16)` bit for bit (tests check it).

g_idx: compressed-tensors has no g_idx for the `static` act-order (desc_act with static groups,
our default) or no act-order at all: groups are consecutive runs of `group_size` inputs. A
permuted g_idx (dynamic act-order groups) has no place in compressed-tensors >= 0.20 (actorder
"group" was removed), so such an artifact is refused, naming the recipe option that avoids it.
Bits: 4 and 8 only (vLLM's WNA16 kernels run those, symmetric and asymmetric).

Asymmetric exports store the zero points packed, as llm-compressor and vLLM do; transformers
(5.25, with compressed-tensors 0.20.1) loads them only with `CompressedTensorsConfig(dequantize=True)`:
its default load compresses the empty model without packing zero points and then fails on the
shape (a library bug, same for llm-compressor's own asymmetric checkpoints).

A pruned model (config.json `compressor_sparsity`, written by the pipeline) gets a
`sparsity_config` beside the quantization; see `_sparsity_config` for the format chosen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compressor.algorithms.pruning import check_nm
from compressor.engine import is_skipped
from compressor.errors import ArtifactError, UserError
from compressor.artifacts.checkpoint import copy_side_files
from compressor.artifacts.directory import atomic_output_dir, write_manifest
from compressor.export.shards import ShardWriter, write_json

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
SUPPORTED_BITS = (4, 8)  # vLLM's CompressedTensorsWNA16: uint4b8/uint8b128, and uint4/uint8 with zero points
MAX_SHARD_SIZE = 2 * 10**9  # as our GPTQ exporter (write_gptq_checkpoint's default)
RECIPE_FIX = "stages[i].quantize.static_groups: true"
# Everything else in the GPTQ artifact (tokenizer, generation defaults, report) is copied as is.
_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def require_compressed_tensors():
    """The optional `compressed_tensors` package, or a one-line UserError saying how to install it."""
    try:
        import compressed_tensors
    except ImportError:
        raise UserError("compressed-tensors export needs the compressed-tensors package: "
                        "pip install 'compressed-tensors>=0.20'") from None  # fmt: skip
    return compressed_tensors


# ------------------------------------------------------------------ one linear: GPTQ v1 -> packed
def _check_groups(g_idx: torch.Tensor, k: int, groups: int, group_size: int, where: str) -> None:
    """g_idx must be the consecutive groups compressed-tensors assumes: k // group_size."""
    size = k if group_size == -1 else group_size
    if k % size or groups != k // size:
        raise UserError(f"{where}K={k} inputs in {groups} groups do not split into groups of {size}; "
                        "compressed-tensors needs K to be a multiple of the group size")  # fmt: skip
    expected = torch.arange(k, dtype=torch.int64) // size
    g = g_idx.long()
    if torch.equal(g, expected):
        return
    if g.shape == expected.shape and torch.equal(torch.sort(g).values, expected):
        raise UserError(f"{where}act-order groups (a permuted g_idx) cannot be stored as compressed-tensors "
                        f"(actorder 'group' was removed); quantize with {RECIPE_FIX}")  # fmt: skip
    raise ArtifactError(f"{where}g_idx does not describe groups of {size} inputs")


def _unpack(tensors: dict[str, torch.Tensor], bits: int, where: str):
    from compressor.packing import unpack_gptq_v1

    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    k = qweight.shape[0] * 32 // bits
    g_idx = tensors.get("g_idx")
    if g_idx is None:  # AutoGPTQ files may leave it out: then groups are consecutive
        g_idx = (torch.arange(k) // (k // max(scales.shape[0], 1))).to(torch.int32)
    try:
        return unpack_gptq_v1(qweight, qzeros, scales, g_idx, bits)
    except ValueError as exc:  # inconsistent shapes, a zero point of 2^bits
        raise ArtifactError(f"{where}{exc}") from None


def gptq_to_pack_quantized(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                           where: str = "") -> dict[str, torch.Tensor]:  # fmt: skip
    """One GPTQ v1 linear ({qweight, qzeros, scales, g_idx[, bias]}) as compressed-tensors tensors
    (weight_packed, weight_scale, weight_shape[, weight_zero_point][, bias]), exactly."""
    return _pack(_unpack(tensors, bits, where), tensors, group_size, sym, where)


def _pack(record, tensors: dict[str, torch.Tensor], group_size: int, sym: bool, where: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, (n, k) = record.bits, record.codes.shape
    _check_groups(record.g_idx, k, record.scales.shape[0], group_size, where)
    offset = 2 ** (bits - 1)
    zeros = record.zeros.to(torch.int16)  # [G, N], in [1, 2^bits - 1] (v1 cannot store 0)
    if zeros.max() >= 2**bits:  # a v1 file that stored a zero of 0 as 2^bits - 1
        raise ArtifactError(f"{where}a zero point of {int(zeros.max())} does not fit {bits} bits")
    if sym and not bool((zeros == offset).all()):
        raise ArtifactError(f"{where}quantization_config says sym: true but zero points other than {offset} are stored")
    out = {
        # Signed codes, as compressed-tensors' quantizer would have produced them; the packer adds the
        # offset back, so the stored bits are our codes themselves.
        "weight_packed": pack_to_int32((record.codes.to(torch.int16) - offset).to(torch.int8), bits),
        "weight_scale": tensors["scales"].T.contiguous(),  # stored dtype kept: no rounding
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        # [N, G] packed along N (packed_dim=0), as PackedQuantizationCompressor.compress stores them
        # and vLLM's CompressedTensorsWNA16 reads them.
        out["weight_zero_point"] = pack_to_int32((zeros.T - offset).to(torch.int8).contiguous(), bits, packed_dim=0)
    if "bias" in tensors:
        out["bias"] = tensors["bias"]
    return out


def _kept(record) -> torch.Tensor:
    """bool [N, K]: which weights of one linear are nonzero (code != its group's zero point)."""
    return record.codes != record.zeros[record.g_idx.long()].T


# ------------------------------------------------------------------------------- configuration
def _linear_names(gptq_dir: Path) -> set[str]:
    """Names of the architecture's nn.Linear modules (built on the meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    from compressor.lazy import parameters_on_meta
    from compressor.artifacts.checkpoint import plain_config

    config = plain_config(gptq_dir)
    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ArtifactError(f"{gptq_dir}/config.json: {str(exc).splitlines()[0][:300]}") from None
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def quantization_config(bits: int, group_size: int, sym: bool, actorder: str | None, ignore: list[str],
                        sparsity: dict | None) -> dict:  # fmt: skip
    """config.json's `quantization_config`, as llm-compressor's ModelCompressor.update_config writes it."""
    ct = require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
        dynamic=False,
        actorder=actorder,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, quantization_status="compressed",
                                ignore=ignore)  # fmt: skip
    return {
        "version": ct.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity or {},
        "transform_config": {},
        **config.model_dump(mode="json", exclude={"quant_method"}),
    }


def _sparsity_config(structure: str, global_sparsity: float, ignore: list[str]) -> dict:
    """The `sparsity_config` block of a pruned model.

    Format "dense": the tensors are stored only in the quantization format, with no sparse
    compression on top, and "dense" says exactly that. vLLM validates the block with
    SparsityCompressionConfig (which needs `format`) and accepts "dense" and "sparse-24-bitmask" as
    2:4 formats (`supports_cutlass_24`); for weight-only quantization it then runs the WNA16
    kernels, so the block is metadata there. "sparse-24-bitmask" would claim bitmask-compressed
    tensors that are not in the file, and "marlin-24" (2:4 W4A16 in Marlin's sparse layout) is a
    legacy format that compressed-tensors no longer decompresses, so transformers could not load
    it. compressed-tensors itself (and so transformers) ignores the block when loading.
    """
    from compressed_tensors.config import SparsityCompressionConfig

    config = SparsityCompressionConfig.load_from_registry(
        "dense", targets=["Linear"], ignore=ignore, global_sparsity=global_sparsity, sparsity_structure=structure
    )
    return config.model_dump(mode="json")


def _pruned(linears: set[str], sparsity: dict) -> set[str]:
    """The linears the prune stage pruned: leaf names in its `targets`, minus its `ignore` globs."""
    targets, skip = set(sparsity.get("targets") or []), list(sparsity.get("ignore") or [])
    return {name for name in linears if name.rpartition(".")[2] in targets and not is_skipped(name, skip)}


def _nm(structure: str) -> tuple[int, int] | None:
    n, sep, m = str(structure).partition(":")
    return (int(n), int(m)) if sep and n.isdigit() and m.isdigit() else None


# ----------------------------------------------------------------------------------- reading
class _Checkpoint:
    """The GPTQ checkpoint's tensors by name, each copied out of its file when asked for (so only
    the linear being converted is in memory, not the checkpoint)."""

    def __init__(self, gptq_dir: Path, qconfig: dict | None = None):
        from safetensors import safe_open

        self._qconfig = qconfig or {}  # a gptq_v2 checkpoint's qzeros are read in the v1 layout

        from compressor.artifacts.checkpoint import read_tensors, weight_files

        self._handles, self._where, self._pickled = {}, {}, {}
        for file in weight_files(gptq_dir):
            if file.suffix != ".safetensors":  # an AutoGPTQ pickle: read whole
                tensors = read_tensors([file])
                self._pickled.update(tensors)
                self._where.update(dict.fromkeys(tensors, None))
                continue
            try:
                handle = safe_open(file, "pt")
                names = list(handle.keys())
            except Exception as exc:  # a corrupted header
                raise ArtifactError(f"{file}: unreadable weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
            self._handles[file] = handle
            self._where.update(dict.fromkeys(names, file))

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        tensor = self._read(name)
        if name.endswith(".qzeros") and self._qconfig.get("checkpoint_format") == "gptq_v2":
            from compressor.artifacts.checkpoint import as_gptq_v1

            qweight = name[: -len("qzeros")] + "qweight"
            tensor = as_gptq_v1({name: tensor, qweight: torch.empty(0, self.shape(qweight)[1])}, self._qconfig)[name]
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if file is None:
            return self._pickled[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:  # a truncated file
            raise ArtifactError(f"{file}: cannot read {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._where[name]
        if file is None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handles[file].get_slice(name).get_shape())

    def layer(self, module: str, suffixes=_GPTQ_SUFFIXES) -> dict[str, torch.Tensor]:
        return {s: self.get(f"{module}.{s}") for s in suffixes if f"{module}.{s}" in self}


def _check_layer(source: _Checkpoint, module: str, bits: int, group_size: int, sym: bool | None, where: str) -> bool:
    """Check one linear's groups and zero points without reading its codes; True if they are symmetric."""
    from compressor.packing import unpack_qzeros_v1

    small = source.layer(module, ("qzeros", "scales", "g_idx"))
    if "qzeros" not in small or "scales" not in small:
        raise ArtifactError(f"{where}a qweight without qzeros/scales")
    rows, n = source.shape(f"{module}.qweight")
    k, groups = rows * 32 // bits, small["scales"].shape[0]
    if small["scales"].shape != (groups, n) or small["qzeros"].shape != (groups, n * bits // 32):
        raise ArtifactError(f"{where}inconsistent GPTQ tensors for {bits}-bit: qweight {(rows, n)}, "
                            f"qzeros {tuple(small['qzeros'].shape)}, scales {tuple(small['scales'].shape)}")  # fmt: skip
    g_idx = small.get("g_idx", torch.arange(k) // (k // groups))
    _check_groups(g_idx, k, groups, group_size, where)
    zeros = unpack_qzeros_v1(small["qzeros"], bits, n)
    if zeros.max() >= 2**bits:
        raise ArtifactError(f"{where}a zero point of {int(zeros.max())} does not fit {bits} bits "
                            "(GPTQ v1 stores a zero of 0 as 2^bits - 1)")  # fmt: skip
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    if sym and not symmetric:
        raise ArtifactError(f"{where}quantization_config says sym: true but zero points other than {2 ** (bits - 1)} are stored")
    return symmetric


# ------------------------------------------------------------------------------------ artifacts
def write_compressed_tensors_artifact(gptq_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Convert the GPTQ artifact `gptq_dir` into the existing, empty `out_dir` (no manifest); return facts about it."""
    from compressor.artifacts.checkpoint import gptq_config

    gptq_dir, out_dir = Path(gptq_dir), Path(out_dir)
    ct = require_compressed_tensors()
    qc = gptq_config(gptq_dir)
    bits = qc["bits"]
    if bits not in SUPPORTED_BITS:  # before reading any weights
        raise UserError(f"{gptq_dir}: {bits}-bit weights cannot be exported as compressed-tensors: supported bits are "
                        f"{' and '.join(map(str, SUPPORTED_BITS))} (what vLLM's W4A16/W8A16 kernels run)")  # fmt: skip
    group_size = int(qc.get("group_size") or -1)
    config_json = json.loads((gptq_dir / "config.json").read_text())
    source = _Checkpoint(gptq_dir, qc)
    quantized = [name[: -len(".qweight")] for name in source.names() if name.endswith(".qweight")]
    if not quantized:
        raise ArtifactError(f"{gptq_dir}: declares GPTQ but holds no '.qweight' tensors")
    linears = _linear_names(gptq_dir)
    strays = sorted(set(quantized) - linears)
    if strays:
        raise UserError(f"{gptq_dir}: {strays[0]} has a qweight but is not an nn.Linear of the architecture; "
                        "compressed-tensors quantizes Linear modules")  # fmt: skip

    # Checks over the small tensors first, so that a refused artifact costs no packing.
    declared_sym = qc.get("sym")
    symmetric = [_check_layer(source, name, bits, group_size, declared_sym, f"{gptq_dir}: {name}: ") for name in quantized]
    sym = all(symmetric) if declared_sym is None else bool(declared_sym)
    # "static" (llm-compressor's default name): act-order changed the order of GPTQ's updates, not the
    # storage. Our exporter records quantization-time act-order in `meta.act_order` (desc_act there
    # says whether g_idx permutes, which the checks above refused); other GPTQ files in desc_act.
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    actorder = "static" if meta.get("act_order", qc.get("desc_act")) else None

    sparsity = config_json.get("compressor_sparsity")
    nm = _nm(sparsity.get("structure")) if isinstance(sparsity, dict) else None
    pruned = _pruned(linears, sparsity) if isinstance(sparsity, dict) else set()

    quantized_set = set(quantized)
    ignore = sorted(linears - quantized_set)  # lm_head, and linears the recipe skipped
    with ShardWriter(out_dir, MAX_SHARD_SIZE) as writer:
        bar = tqdm(total=len(quantized), desc="compressed-tensors export", unit="linear", disable=not progress)
        for name in source.names():
            module, _, leaf = name.rpartition(".")
            if module in quantized_set:
                if leaf != "qweight":  # written with its qweight
                    continue
                layer, where = source.layer(module), f"{gptq_dir}: {module}: "
                record = _unpack(layer, bits, where)
                if nm is not None and module in pruned and not check_nm(_kept(record), *nm):
                    raise ArtifactError(f"{where}config.json declares {sparsity['structure']} sparsity but the weights are not")
                for suffix, tensor in _pack(record, layer, group_size, sym, where).items():
                    writer.add(f"{module}.{suffix}", tensor)
                bar.update()
                continue
            tensor = source.get(name)
            if nm is not None and leaf == "weight" and module in pruned and not check_nm(tensor != 0, *nm):
                raise ArtifactError(f"{gptq_dir}: {module}: config.json declares {sparsity['structure']} sparsity but the weights are not")
            writer.add(name, tensor)
        bar.close()

    sparsity_block = None
    if isinstance(sparsity, dict):
        sparsity_block = _sparsity_config(
            sparsity.get("structure") or "unstructured",
            float(sparsity.get("global_sparsity") or 0.0),
            sorted(linears - pruned),
        )
    config_json["quantization_config"] = quantization_config(bits, group_size, sym, actorder, ignore, sparsity_block)
    write_json(out_dir / "config.json", config_json)
    copy_side_files(gptq_dir, out_dir)

    weights = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    log.info("%s: %d linears as %d-bit %s (%s, group size %s), %d left float", out_dir, len(quantized), bits, FORMAT,
             "symmetric" if sym else "asymmetric", group_size, len(ignore))  # fmt: skip
    return {
        "format": FORMAT,
        "compressed_tensors_version": ct.__version__,
        "bits": bits,
        "group_size": group_size,
        "symmetric": sym,
        "actorder": actorder,
        "quantized_linears": len(quantized),
        "ignore": ignore,
        "sparsity_structure": sparsity_block["sparsity_structure"] if sparsity_block else None,
        "weights_bytes": weights,
    }


def export_compressed_tensors(artifact, output, overwrite: bool = False, progress: bool = True) -> Path:
    """`compress export --format compressed-tensors`: the GPTQ artifact as a compressed-tensors
    checkpoint directory, written atomically."""
    from compressor.export.gptq import check_conversion_source

    artifact, output = Path(artifact), Path(output)
    require_compressed_tensors()
    check_conversion_source(artifact, output)
    with atomic_output_dir(output, overwrite) as tmp:
        write_compressed_tensors_artifact(artifact, tmp, progress)
        write_manifest(tmp)
    return output


def convert_checkpoint_dir(write_gptq, out_dir: Path, progress: bool = True) -> dict:
    """Pipeline helper: `write_gptq(tmp)` writes a GPTQ checkpoint, converted into `out_dir`; the GPTQ copy is deleted."""
    from compressor.export.gptq import via_gptq_checkpoint

    return via_gptq_checkpoint(write_gptq, out_dir, lambda tmp, _: write_compressed_tensors_artifact(tmp, out_dir, progress),
                               "compressed-tensors")  # fmt: skip
