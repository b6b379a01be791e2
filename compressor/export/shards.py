"""Writing a safetensors checkpoint tensor by tensor, with one tensor in memory at a time.

The files are those `huggingface_hub.split_torch_state_dict_into_shards` + `safetensors.torch.save_file`
(what `save_pretrained` does) write for the same tensors in the same order, byte for byte. Its rule
(huggingface_hub/serialization/_base.py, `split_state_dict_into_shards_factory`), followed here:
- sizes are `get_torch_storage_size` (the bytes of the tensor's whole storage);
- a tensor bigger than the limit gets a shard of its own, numbered when it comes; the open shard
  stays open;
- otherwise the open shard is closed first if the tensor would take it over the limit;
- a tensor whose `get_torch_storage_id` was seen before joins the shard of the first one and is not
  counted; `total_size` sums the sizes counted;
- one shard is `model.safetensors` without an index; N are `model-0000i-of-0000N.safetensors`.

The open shard is not held in memory: each tensor's bytes go to a spill file as it is added, and
when the shard is full the safetensors file is written from it (header, then the data in the order
safetensors' own writer uses, which `_safetensors_layout` asks safetensors for). For a 14B model
the open shard (2 GB by default) would otherwise be the largest thing in memory.
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@dataclass
class _Spilled:
    """One tensor of the open shard: where its bytes are in the spill file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bfloat16 and bool included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _safetensors_layout(entries: dict[str, _Spilled], metadata: dict) -> tuple[dict, list[str]]:
    """The header safetensors' `save_file` writes for these tensors, and the names in data order.

    safetensors sorts the data by dtype, then name, and writes the header's keys in that order;
    the sort key is its own (an enum's order), so it is asked, on empty tensors of the same names
    and dtypes, rather than restated here."""
    from safetensors.torch import save

    probe = save({name: torch.empty(0, dtype=e.dtype) for name, e in entries.items()}, metadata=metadata)
    (length,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8 : 8 + length])
    order = [name for name in header if name != "__metadata__"]
    start = 0
    for name in order:
        header[name]["shape"] = list(entries[name].shape)
        header[name]["data_offsets"] = [start, start + entries[name].nbytes]
        start += entries[name].nbytes
    return header, order


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Write a safetensors checkpoint tensor by tensor; a shard is written to disk as soon as it is full.

    Shards go to temporary names (`model-0000i.safetensors.tmp`) until `close` knows how many there
    are. As a context manager it closes on success and removes the files it wrote on an exception.
    """

    def __init__(self, out_dir: Path, max_shard_size: int, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise ValueError(f"{self.out_dir} is not a directory")
        self.max_shard_size = int(max_shard_size)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self._shard: dict[str, _Spilled] = {}  # the open shard: its tensors' places in the spill file
        self._spill = None  # the open shard's spill file (binary, append)
        self._spill_path: Path | None = None
        self._spill_size = 0
        self._shard_size = 0
        self._shard_names: list[list[str]] = []  # tensor names of each written shard, in shard order
        self._names: set[str] = set()
        self._total_size = 0
        # storage id -> (shard number, or None for the open shard; weak ref to the storage, None when
        # it never expires: huggingface_hub gives every empty storage the same id)
        self._storages: dict[tuple, tuple[int | None, weakref.ref | None]] = {}
        self._open_storages: list[tuple] = []  # ids whose shard is the open one
        self._written: list[Path] = []  # files on disk that this writer created
        self._files: list[Path] | None = None  # set by close
        self._aborted = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._files is None and not self._aborted:
            self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor, stored as given (on CPU, made contiguous); writes the open shard when full."""
        from huggingface_hub import get_torch_storage_id, get_torch_storage_size

        if self._files is not None or self._aborted:
            raise ValueError("ShardWriter is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added")
        tensor = tensor.detach().to("cpu").contiguous()

        storage_id = get_torch_storage_id(tensor)
        if storage_id is not None and self._shares_storage(storage_id):
            shard, _ = self._storages[storage_id]
            if shard is not None:  # its shard is on disk already
                raise ValueError(
                    f"tensor {name!r} shares its storage with a tensor already written in shard {shard + 1}; "
                    "huggingface_hub would store it in that shard"
                )
            self._names.add(name)
            self._spill_tensor(name, tensor)  # joins its storage's first tensor, uncounted
            return
        self._names.add(name)
        size = get_torch_storage_size(tensor)
        self._total_size += size
        if size > self.max_shard_size:  # a shard of its own, numbered now
            self._remember(storage_id, tensor, len(self._shard_names))
            self._write({name: tensor})
            return
        if self._shard_size + size > self.max_shard_size:
            self._flush()
        self._remember(storage_id, tensor, None)
        self._spill_tensor(name, tensor)
        self._shard_size += size

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index when sharded."""
        if self._aborted:
            raise ValueError("ShardWriter was aborted")
        if self._files is not None:
            return list(self._files)
        try:
            if self._shard:
                self._flush()
            count = len(self._shard_names)
            final = [self.out_dir / _shard_name(i, count) for i in range(count)]
            if count > 1:
                final_index = self.out_dir / INDEX_NAME
                if final_index.exists():
                    raise FileExistsError(f"{final_index} exists")
            for path in final:
                if path.exists():
                    raise FileExistsError(f"{path} exists")
            for i, path in enumerate(final):  # _written holds the shards in order
                self._temporary(i).rename(path)
                self._written[i] = path
            files = list(final)
            if count > 1:
                weight_map = {name: path.name for path, names in zip(final, self._shard_names) for name in names}
                self._written.append(final_index)
                write_json(final_index, {"metadata": {"total_size": self._total_size}, "weight_map": weight_map})
                files.append(final_index)
        except BaseException:
            self.abort()
            raise
        self._files = files
        self._storages.clear()
        return list(files)

    def abort(self) -> None:
        """Remove the files written so far; the writer cannot be used afterwards."""
        self._aborted = True
        self._shard, self._open_storages = {}, []
        self._close_spill()
        self._storages.clear()
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written = []

    def _shares_storage(self, storage_id: tuple) -> bool:
        # Ids are unique only among live storages, and huggingface_hub sees all tensors alive at once:
        # a match whose storage is gone (freed once written, address reused) is a different tensor.
        # torch keeps a storage's Python object (so the weak ref) alive as long as the storage.
        if storage_id not in self._storages:
            return False
        _, ref = self._storages[storage_id]
        return ref is None or ref() is not None

    def _remember(self, storage_id: tuple | None, tensor: torch.Tensor, shard: int | None) -> None:
        if storage_id is None:
            return
        storage = tensor.untyped_storage()
        self._storages[storage_id] = (shard, None if storage.data_ptr() == 0 else weakref.ref(storage))
        if shard is None:
            self._open_storages.append(storage_id)

    def _temporary(self, index: int) -> Path:
        return self.out_dir / f"model-{index + 1:05d}.safetensors.tmp"

    def _spill_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if self._spill is None:
            path = self._spill_path = self.out_dir / f"model-{len(self._shard_names) + 1:05d}.safetensors.tmp.spill"
            if path.exists():
                raise FileExistsError(f"{path} exists")
            self._written.append(path)  # removed by abort; by _flush once the shard is written
            self._spill = open(path, "xb")
            self._spill_size = 0
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self._spill.write(_tensor_bytes(tensor))
        self._shard[name] = _Spilled(tensor.dtype, tuple(tensor.shape), self._spill_size, nbytes)
        self._spill_size += nbytes

    def _close_spill(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _flush(self) -> None:
        shard = len(self._shard_names)
        for storage_id in self._open_storages:
            self._storages[storage_id] = (shard, self._storages[storage_id][1])
        entries, self._shard, self._shard_size, self._open_storages = self._shard, {}, 0, []
        spill = self._spill_path
        self._close_spill()
        path = self._temporary(shard)
        if path.exists():
            raise FileExistsError(f"{path} exists")
        self._shard_names.append(list(entries))
        self._written.insert(len(self._shard_names) - 1, path)  # shards first, in order (close renames them)
        header, order = _safetensors_layout(entries, self.metadata)
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
        with open(path, "xb") as out, open(spill, "rb") as source:
            out.write(struct.pack("<Q", len(text)) + text)
            for name in order:
                source.seek(entries[name].offset)
                _copy_bytes(source, out, entries[name].nbytes)
        spill.unlink()
        self._written.remove(spill)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        """A shard of its own for one tensor bigger than the limit (written straight away)."""
        from safetensors.torch import save_file

        path = self._temporary(len(self._shard_names))
        if path.exists():
            raise FileExistsError(f"{path} exists")
        self._shard_names.append(list(tensors))
        self._written.insert(len(self._shard_names) - 1, path)
        with open(path, "xb"):  # the mode a new file gets here (the umask's), which save_file's
            pass  # temporary-and-rename would turn into 0600
        mode = path.stat().st_mode & 0o777
        save_file(tensors, path, metadata=self.metadata)
        os.chmod(path, mode)


def _copy_bytes(source, out, nbytes: int, chunk: int = 64 << 20) -> None:
    while nbytes:
        data = source.read(min(chunk, nbytes))
        if not data:
            raise OSError(f"{source.name} ended {nbytes} bytes early")
        out.write(data)
        nbytes -= len(data)
