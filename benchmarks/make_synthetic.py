"""A random-weight Llama checkpoint of a given size, for memory and time benchmarks of compressing big models.

Random weights say nothing about quality and everything about memory and time: a 3B/8B/14B model
shaped like the real ones exercises loading, block-by-block compression, packing and export at
full size without downloading anything. The output directory is what `save_pretrained` writes for
a sharded bfloat16 LlamaForCausalLM (config.json, generation_config.json,
model-0000k-of-0000N.safetensors, model.safetensors.index.json) plus SmolLM2's tokenizer, so every
tool here takes it as a local model source.

Sizes (vocab 49152 = SmolLM2's tokenizer, untied embeddings; widths from real models, the number
of layers chosen so the total is within 5% of the nominal size; --dry-run prints the exact count):

  tiny  hidden 64,   intermediate 128,   4 heads,  2 kv heads, head_dim 16,  2 layers (tests, ~13 MB)
  3B    hidden 3072, intermediate 8192,  24 heads, 8 kv heads, head_dim 128, 27 layers (Llama-3.2-3B widths)
  8B    hidden 4096, intermediate 14336, 32 heads, 8 kv heads, head_dim 128, 35 layers (Llama-3.1-8B widths)
  14B   hidden 5120, intermediate 13824, 40 heads, 8 kv heads, head_dim 128, 49 layers (Qwen2.5-14B widths as Llama)

Weights are bfloat16 normal(0, 0.02), norm weights 1.0. Each tensor has its own generator, seeded
from --seed and the tensor's name, so the same seed and size give the same bytes, whatever the
shard size, and a --layers N model has the same first N layers as a longer one of the same width.
Tensors are generated and written one shard at a time (peak memory about one shard, not the
model); the directory is built as DIR.tmp-* next to DIR and renamed into place at the end.
On 2 cores random bf16 comes at about 0.4 GB/s and a whole run went at 0.2 GB/s with the writes
(measured on a 0.8 GB --layers 1 3B model), so expect minutes: ~1.5 for 8B, ~2.5 for 14B, disk permitting.

    python benchmarks/make_synthetic.py --params 8B --dry-run                     # config, parameter count, bytes; writes nothing
    python benchmarks/make_synthetic.py --params 8B --out /work/models/synthetic-8b
    python benchmarks/make_synthetic.py --params 14B --layers 8 --out /work/models/synthetic-14b-8l --seed 1
    python benchmarks/make_synthetic.py --params tiny --out /tmp/tiny --max-shard-size 20KB --overwrite
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

DTYPE = torch.bfloat16
STD = 0.02
INDEX_NAME = "model.safetensors.index.json"

# Widths of real models; num_hidden_layers chosen so that, with SmolLM2's vocab (49152) and untied
# embeddings, the total is within 5% of the nominal size (tests/test_make_synthetic.py checks it).
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_hidden_layers=2),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               num_hidden_layers=27),  # Llama-3.2-3B widths (it has 28 layers and a 128256 vocab, tied)
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               num_hidden_layers=35),  # Llama-3.1-8B widths (32 layers, 128256 vocab)
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                num_hidden_layers=49),  # Qwen2.5-14B widths (48 layers, 152064 vocab, q/k/v biases)
}
NOMINAL = {"3B": 3e9, "8B": 8e9, "14B": 14e9}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2 (argparse's own prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_size(text: str) -> int:
    """'2GB' -> 2*10**9, '20KB' -> 20000, '1GiB' -> 2**30, '1000' -> 1000 (as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB, 20KB or 1GiB")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from compressor.models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("smollm2-135m"))


def make_config(size: str, layers: int | None = None, tokenizer=None):
    from transformers import LlamaConfig

    tok = tokenizer if tokenizer is not None else smollm2_tokenizer()
    widths = dict(SIZES[size])
    if layers is not None:
        widths["num_hidden_layers"] = layers
    config = LlamaConfig(
        vocab_size=len(tok),
        **widths,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order the shards hold them (the forward order)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def check_against_transformers(config, specs) -> None:
    """Names and shapes equal to those of LlamaForCausalLM(config) built on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ours = dict(specs)
    if expected != ours:
        missing, extra = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
        wrong = sorted(n for n in expected.keys() & ours.keys() if expected[n] != ours[n])
        raise RuntimeError(f"tensor names/shapes differ from LlamaForCausalLM: missing {missing[:3]}, "
                           f"extra {extra[:3]}, other shapes {wrong[:3]}")


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(specs, max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors per shard, each shard at most max_shard_bytes; a bigger tensor gets its own."""
    shards: list[list[int]] = []
    size = 0
    for k, (_, shape) in enumerate(specs):
        nbytes = numel(shape) * DTYPE.itemsize
        if not shards or (size + nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def make_tensor(name: str, shape, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=DTYPE)
    # normal_ straight into bf16 (computed in float, rounded): as fast as float32 chunks + convert,
    # no float32 copy, and the same bytes whatever the thread count.
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(shape, dtype=DTYPE).normal_(0.0, STD, generator=gen)


def _gb(nbytes: int) -> str:
    for unit, scale, bin_unit, bin_scale in (("GB", 1e9, "GiB", 2**30), ("MB", 1e6, "MiB", 2**20)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit} ({nbytes / bin_scale:.2f} {bin_unit})"
    return f"{nbytes / 1e3:.2f} KB ({nbytes / 2**10:.2f} KiB)"


def describe(size: str, config, specs, shards, max_shard_bytes: int) -> str:
    params = sum(numel(s) for _, s in specs)
    nbytes = params * DTYPE.itemsize
    lines = [f"size {size}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"intermediate {config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} kv, "
             f"head_dim {config.head_dim}, vocab {config.vocab_size}"]
    line = f"parameters: {params:,}"
    if size in NOMINAL and config.num_hidden_layers == SIZES[size]["num_hidden_layers"]:
        line += f" ({(params / NOMINAL[size] - 1) * 100:+.1f}% of {size})"
    lines.append(line)
    lines.append(f"bytes: {nbytes:,} = {_gb(nbytes)} bf16 in {len(specs)} tensors, "
                 f"{len(shards)} shard(s) of at most {_gb(max_shard_bytes)}")
    return "\n".join(lines)


def _looks_like_ours(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / INDEX_NAME).is_file()


def write_checkpoint(out: Path, config, tokenizer, specs, shards, seed: int, progress: bool = True) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    total_bytes = sum(numel(s) for _, s in specs) * DTYPE.itemsize
    try:
        weight_map = {}
        with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tensors",
                  disable=not progress, file=sys.stderr) as bar:
            for k, indices in enumerate(shards):
                fname = shard_name(k, len(shards))
                bar.set_postfix_str(fname, refresh=False)
                tensors = {}
                for j in indices:
                    name, shape = specs[j]
                    tensors[name] = make_tensor(name, shape, seed)
                    weight_map[name] = fname
                    bar.update(tensors[name].nbytes)
                save_file(tensors, tmp / fname, metadata={"format": "pt"})
                del tensors
        index = {"metadata": {"total_parameters": sum(numel(s) for _, s in specs), "total_size": total_bytes},
                 "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a model directory is normally shared
        # Into place: an earlier output (checked by main) is moved aside first and deleted last.
        old = None
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-old-", dir=out.parent))
                os.replace(out, old / out.name)
            else:
                out.rmdir()
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = _Parser(prog="make_synthetic.py",
                     description="Write a random-weight bf16 Llama checkpoint of a given size (see the module docstring).")
    parser.add_argument("--params", required=True, choices=list(SIZES), help="nominal size")
    parser.add_argument("--out", type=Path, help="output directory (required unless --dry-run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                        help="largest shard, e.g. 2GB (10^9 bytes), 500MB, 1GiB (default 2GB)")
    parser.add_argument("--layers", type=_positive_int, help="num_hidden_layers instead of the size's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it is an earlier output of this script")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the config, parameter count and bytes; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    out = args.out.expanduser().absolute() if args.out is not None else None
    if out is None and not args.dry_run:
        parser.error("--out DIR is required (or --dry-run)")
    if out is not None and not args.dry_run:
        if out.exists() and not out.is_dir():
            parser.error(f"--out: {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not args.overwrite:
                parser.error(f"--out: {out} is not empty (--overwrite replaces an earlier output of this script)")
            if not _looks_like_ours(out):
                parser.error(f"--out: {out} is not empty and has no config.json + {INDEX_NAME}; "
                             "not replacing it even with --overwrite")

    tokenizer = smollm2_tokenizer()
    config = make_config(args.params, args.layers, tokenizer)
    specs = tensor_specs(config)
    check_against_transformers(config, specs)
    shards = plan_shards(specs, args.max_shard_size)
    total_bytes = sum(numel(s) for _, s in specs) * DTYPE.itemsize

    if args.dry_run:
        print(config.to_json_string(use_diff=False), end="")
        print(describe(args.params, config, specs, shards, args.max_shard_size))
        return 0

    print(describe(args.params, config, specs, shards, args.max_shard_size), flush=True)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < total_bytes + 2**26:
        parser.error(f"--out: needs {_gb(total_bytes)} free on the disk of {out.parent}, it has {_gb(free)}")

    handler = None
    if threading.current_thread() is threading.main_thread():  # clean up the temporary directory on SIGTERM too
        handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    try:
        write_checkpoint(out, config, tokenizer, specs, shards, args.seed, progress=not args.no_progress)
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    elapsed = time.perf_counter() - start
    print(f"wrote {out} ({len(shards)} shard(s), seed {args.seed}) in {elapsed:.1f} s, "
          f"{total_bytes / 1e9 / max(elapsed, 1e-9):.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
