"""ShardWriter against huggingface_hub's split + safetensors' save_file (what save_pretrained does):
the same files, byte for byte, for the same tensors in the same order."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.algorithms.quant import rtn_quantize
from compressor.export.gptq import checkpoint_tensors, write_gptq_checkpoint
from compressor.export.shards import ShardWriter, write_json
from conftest import make_tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8,
          torch.uint8, torch.bool]  # fmt: skip


def reference_write(out, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    """What write_gptq_checkpoint did before ShardWriter."""
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        write_json(out / "model.safetensors.index.json", index)


def random_tensors(seed: int, count: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(count):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (), generator=g))]
        shape = tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(0, 3, (), generator=g)),), generator=g))
        values = torch.randn(shape, generator=g) * 50
        tensors[f"layers.{i}.t"] = values > 0 if dtype == torch.bool else values.to(dtype)
    tensors["big"] = torch.randn(3000, generator=g)  # 12 kB: over every limit below
    tensors["empty"] = torch.empty(0, 7)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    tensors["tail"] = torch.randint(-100, 100, (64,), generator=g, dtype=torch.int32)
    tensors = dict(sorted(tensors.items(), key=lambda kv: float(torch.rand((), generator=g))))  # shuffled
    return tensors


def stream_write(out, tensors: dict[str, torch.Tensor], max_shard_size: int) -> list:
    with ShardWriter(out, max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.close()


def assert_same_files(actual_dir, expected_dir) -> None:
    actual = sorted(p.name for p in actual_dir.iterdir())
    assert actual == sorted(p.name for p in expected_dir.iterdir())
    for name in actual:
        assert (actual_dir / name).read_bytes() == (expected_dir / name).read_bytes(), name


def dirs(tmp_path):
    a, b = tmp_path / "stream", tmp_path / "reference"
    a.mkdir()
    b.mkdir()
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_shard_size", [600, 2000, 10**9])
def test_same_files_as_huggingface_hub(tmp_path, seed, max_shard_size):
    tensors = random_tensors(seed)
    stream, reference = dirs(tmp_path)
    files = stream_write(stream, tensors, max_shard_size)
    reference_write(reference, tensors, max_shard_size)
    assert_same_files(stream, reference)
    assert sorted(files) == sorted(stream.iterdir())
    if max_shard_size == 10**9:
        assert [p.name for p in files] == ["model.safetensors"]
    else:
        index = json.loads((stream / "model.safetensors.index.json").read_text())
        count = len(files) - 1
        assert count > 2 and files[0].name == f"model-00001-of-{count:05d}.safetensors"
        assert set(index["weight_map"]) == set(tensors)


def test_big_tensor_takes_the_next_number_and_the_open_shard_stays_open(tmp_path):
    tensors = {"a": torch.ones(10), "big": torch.ones(100), "b": torch.ones(10), "c": torch.ones(20)}
    stream, reference = dirs(tmp_path)
    stream_write(stream, tensors, max_shard_size=100)
    reference_write(reference, tensors, max_shard_size=100)
    assert_same_files(stream, reference)
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "big": "model-00001-of-00003.safetensors", "a": "model-00002-of-00003.safetensors",
        "b": "model-00002-of-00003.safetensors", "c": "model-00003-of-00003.safetensors",
    }  # fmt: skip
    assert index["metadata"] == {"total_size": 560}


def test_tensors_sharing_storage_join_the_first_one_uncounted(tmp_path):
    base = torch.arange(40, dtype=torch.float32)
    tensors = {
        "x.first": base[:20], "y": torch.ones(5), "x.second": base[20:],  # one storage, 160 bytes counted once
        "z": torch.ones(30), "e1": torch.empty(0), "w": torch.ones(2), "e2": torch.empty(0, 3),  # empties: one storage
    }  # fmt: skip
    stream, reference = dirs(tmp_path)
    stream_write(stream, tensors, max_shard_size=200)
    reference_write(reference, tensors, max_shard_size=200)
    assert_same_files(stream, reference)
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["x.second"] == index["weight_map"]["x.first"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["e2"] == index["weight_map"]["e1"] == "model-00002-of-00002.safetensors"
    assert index["metadata"]["total_size"] == 160 + 20 + 120 + 8


def test_storage_shared_with_a_written_shard_is_refused(tmp_path):
    base = torch.arange(40, dtype=torch.float32)
    with pytest.raises(ValueError, match="shares its storage"):
        with ShardWriter(tmp_path, max_shard_size=200) as writer:
            writer.add("x.first", base[:20])
            writer.add("z", torch.ones(40))  # writes shard 1
            writer.add("x.second", base[20:])
    assert list(tmp_path.iterdir()) == []


def test_freed_storages_are_not_taken_for_shared_ones(tmp_path):
    """Streamed tensors die once written, and the allocator reuses their addresses."""
    kept = {f"t{i}": torch.full((64,), float(i)) for i in range(30)}
    stream, reference = dirs(tmp_path)
    with ShardWriter(stream, max_shard_size=600) as writer:
        for name, tensor in kept.items():
            writer.add(name, tensor.clone())  # nothing else holds the clone
    reference_write(reference, kept, max_shard_size=600)
    assert_same_files(stream, reference)


def test_nothing_added_writes_nothing(tmp_path):
    assert stream_write(tmp_path, {}, 100) == []
    assert list(tmp_path.iterdir()) == []


def test_exception_removes_the_files_written(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_shard_size=100) as writer:
            for i in range(10):
                writer.add(f"t{i}", torch.ones(20))
            assert len(list(tmp_path.glob("*.tmp"))) >= 5  # shards written as they filled
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_close_does_not_overwrite_and_cleans_up(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"theirs")
    writer = ShardWriter(tmp_path, max_shard_size=100)
    writer.add("t", torch.ones(3))
    with pytest.raises(FileExistsError):
        writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"theirs"


def test_duplicate_name_and_add_after_close(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=100)
    writer.add("t", torch.ones(3))
    with pytest.raises(ValueError, match="already added"):
        writer.add("t", torch.zeros(3))
    files = writer.close()
    assert writer.close() == files == [tmp_path / "model.safetensors"]
    with pytest.raises(ValueError, match="closed"):
        writer.add("u", torch.ones(3))


def test_metadata_and_contiguity(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # not contiguous
    with ShardWriter(tmp_path, 10**6, metadata={"format": "pt", "note": "x"}) as writer:
        writer.add("t", t)
    # Not compared byte for byte: safetensors orders several metadata keys at random.
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert torch.equal(f.get_tensor("t"), t)


def quantized_tiny_llama():
    model = make_tiny_llama(vocab_size=512, num_hidden_layers=2)
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(module.weight, 4, 32, True)
    return model, quantized


def test_checkpoint_order_is_state_dict_order_with_packed_weights_in_place():
    model, quantized = quantized_tiny_llama()
    expected = []
    for name in model.state_dict():
        module = name.rpartition(".")[0]
        if name == "lm_head.weight":
            continue  # tied
        expected += [f"{module}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")] if module in quantized else [name]
    assert list(checkpoint_tensors(model, quantized)) == expected


@pytest.mark.parametrize("max_shard_size", [20_000, 2 * 10**9])
def test_gptq_checkpoint_is_what_huggingface_hub_splits(tmp_path, max_shard_size):
    model, quantized = quantized_tiny_llama()
    stream, reference = dirs(tmp_path)
    write_gptq_checkpoint(stream, model, quantized, None, max_shard_size=max_shard_size)
    reference_write(reference, checkpoint_tensors(model, quantized), max_shard_size)
    for name in ("config.json", "generation_config.json"):
        (stream / name).unlink()
    assert_same_files(stream, reference)
    assert (len(list(stream.iterdir())) > 3) == (max_shard_size == 20_000)


def test_the_open_shard_is_not_held_in_memory(tmp_path):
    """Each tensor's bytes go to disk when added: the writer keeps no reference to it, so a big
    model's open shard (2 GB by default) costs no memory."""
    import gc
    import weakref

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(8)}
    stream, reference = dirs(tmp_path)
    with ShardWriter(stream, max_shard_size=10**6) as writer:
        for name in list(tensors):
            tensor = tensors[name].clone()
            alive = weakref.ref(tensor.untyped_storage())
            writer.add(name, tensor)
            del tensor
            gc.collect()
            assert alive() is None, name
        assert [p.name for p in stream.iterdir()] == ["model-00001.safetensors.tmp.spill"]
    reference_write(reference, tensors, max_shard_size=10**6)
    assert_same_files(stream, reference)
