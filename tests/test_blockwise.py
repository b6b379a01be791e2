"""Blockwise runs (compute.load: blockwise): the model read one decoder block at a time.

On the tiny random Llama saved as safetensors (float32 and, to exercise the storage dtype,
bfloat16): the artifact's files are byte-identical to the whole-model path's and the report's
perplexities equal, for GPTQ, for a prune stage (dense export) and for SparseGPT with joint
quantization, with more than one shard; LazyModel loads and frees blocks (meta again after);
recipes and sources blockwise cannot run are refused with the reason; `auto` chooses by memory;
a whole-model run that cannot fit is refused before loading.
"""

from __future__ import annotations

import json

import pytest
import torch

from compressor import blockwise
from compressor.errors import RecipeError, UserError
from compressor.lazy import LazyModel, parameter_count
from compressor.pipeline import run
from compressor.recipe import load_recipe
from conftest import make_tiny_llama

ARTIFACT_FILES = ("config.json", "quantize_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def source_dir(request, tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("blockwise-src")
    model = make_tiny_llama(initializer_range=0.3, tie_word_embeddings=False, num_hidden_layers=3).to(request.param)
    model.save_pretrained(path, max_shard_size="300KB")  # several shards: blocks span files
    smollm2_tokenizer.save_pretrained(path)
    return path


def _recipe(source, out, stages: str, *extra: str):
    return load_recipe(None, [
        f"model={source}",
        "data.calibration={samples: 4, seq_len: 64}",
        "data.evaluation={seq_len: 128, max_windows: 2}",
        f"stages={stages}",
        f"output={out}",
        "export.max_shard_size=200KB",
        *extra,
    ])  # fmt: skip


def _files(directory) -> dict[str, bytes]:
    names = [p.name for p in directory.iterdir() if p.suffix == ".safetensors" or p.name in ARTIFACT_FILES + ("model.safetensors.index.json",)]
    return {name: (directory / name).read_bytes() for name in sorted(names)}


STAGES = {
    "gptq": "[{quantize: {bits: 4, group_size: 32}}]",
    "wanda-2:4": '[{prune: {method: wanda, pattern: "2:4"}}]',
    "sparsegpt+joint": "[{prune: {method: sparsegpt, sparsity: 0.5, joint_quantize: true}}, {quantize: {bits: 4, group_size: 32}}]",
}


@pytest.mark.parametrize("stages", list(STAGES), ids=list(STAGES))
def test_blockwise_artifact_and_perplexity_equal_the_whole_model_path(source_dir, tmp_path, stages):
    extra = ["export.format=dense"] if stages == "wanda-2:4" else []
    whole = run(_recipe(source_dir, tmp_path / "whole", STAGES[stages], "compute.load=whole", *extra), progress=False)
    lazy = run(_recipe(source_dir, tmp_path / "lazy", STAGES[stages], "compute.load=blockwise", *extra), progress=False)
    assert lazy.model is None and lazy.report.environment["load"] == "blockwise"
    files = _files(whole.output)
    assert len([n for n in files if n.endswith(".safetensors")]) > 1  # sharded
    assert files == _files(lazy.output)
    for key in ("dense", "compressed"):
        assert getattr(lazy.report.perplexity, key) == getattr(whole.report.perplexity, key)
    for key in ("artifact_weights_bytes", "ideal_bytes", "dense_fp16_bytes"):
        assert getattr(lazy.report.size, key) == getattr(whole.report.size, key), key
    assert lazy.report.sparsity == whole.report.sparsity
    assert lazy.report.stages[0].layers.keys() == whole.report.stages[0].layers.keys()
    assert len(lazy.report.stages[0].seconds_per_block) == 3
    manifest = json.loads((lazy.output / "manifest.json").read_text())
    assert set(manifest["files"]) >= {n for n in files if n.endswith(".safetensors")}


def test_lazy_model_loads_and_frees_one_block(source_dir):
    lazy = LazyModel.open(source_dir, torch.float32, torch.device("cpu"))
    params = list(lazy.model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert lazy.model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed, not in the checkpoint
    block = lazy.load("model.layers.1")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in block.parameters())
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    for (name, p), (_, q) in zip(block.named_parameters(), full.model.layers[1].named_parameters()):
        assert torch.equal(p, q), name
    assert all(p.device.type == "meta" for p in lazy.model.model.layers[0].parameters())  # others not read
    lazy.release("model.layers.1")
    assert all(p.device.type == "meta" for p in block.parameters())
    assert parameter_count(lazy.model.config) == sum(p.numel() for p in full.parameters())


def test_tied_lm_head_is_read_from_the_embedding(tmp_path, smollm2_tokenizer):
    make_tiny_llama().save_pretrained(tmp_path)  # tied: the checkpoint has no lm_head.weight
    lazy = LazyModel.open(tmp_path, torch.float32, torch.device("cpu"))
    head = lazy.load("lm_head")
    embedding = lazy.load("model.embed_tokens")
    assert torch.equal(head.weight, embedding.weight)


@pytest.mark.parametrize(
    "stages, extra, fragment",
    [
        ("[{quantize: {bits: 4, group_size: 32}}]", ["export.format=onnx"], "export.format onnx"),
        ("[{prune: {method: structured, target: mlp_channels, ratio: 0.5}}]", ["export.format=dense"], "structured pruning"),
        ('[{prune: {method: wanda, sparsity: 0.5}}, {quantize: {bits: 4, group_size: 32}}]', [], "more than one pass"),
    ],
)
def test_recipes_that_need_the_whole_model_are_refused_blockwise(source_dir, tmp_path, stages, extra, fragment):
    with pytest.raises(RecipeError, match=fragment) as info:
        run(_recipe(source_dir, tmp_path / "out", stages, "compute.load=blockwise", *extra), progress=False)
    assert "compute.load" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_gguf_source_is_refused_blockwise(tmp_path):
    recipe = _recipe("smollm2-135m", tmp_path / "out", STAGES["gptq"], "compute.load=blockwise")
    with pytest.raises(RecipeError, match="GGUF"):
        run(recipe, progress=False)


def test_auto_goes_blockwise_when_the_model_does_not_fit(source_dir, tmp_path, monkeypatch):
    recipe = _recipe(source_dir, tmp_path / "out", STAGES["gptq"])
    config = LazyModel.open(source_dir, torch.float32, torch.device("cpu")).model.config
    need = blockwise.whole_model_bytes(config, torch.float32)
    from compressor.models import resolve_source

    source = resolve_source(str(source_dir))
    monkeypatch.setattr(blockwise, "available_memory_bytes", lambda: 4 * need)
    assert not blockwise.choose_blockwise(recipe, "r.yaml", source, config, torch.float32)
    monkeypatch.setattr(blockwise, "available_memory_bytes", lambda: need)
    assert blockwise.choose_blockwise(recipe, "r.yaml", source, config, torch.float32)
    structured = _recipe(source_dir, tmp_path / "out", "[{prune: {method: structured, target: mlp_channels, ratio: 0.5}}]",
                         "export.format=dense")
    assert not blockwise.choose_blockwise(structured, "r.yaml", source, config, torch.float32)  # cannot: stays whole


def test_a_whole_model_stage_that_cannot_fit_is_refused_before_loading(source_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(blockwise, "available_memory_bytes", lambda: 1000)
    recipe = _recipe(source_dir, tmp_path / "out", "[{prune: {method: structured, target: mlp_channels, ratio: 0.5}}]",
                     "export.format=dense")
    with pytest.raises(UserError, match=r"needs ~0\.0 GB to load whole in float32, but 0\.0 GB are available; "
                                        r"compute.load: blockwise cannot help here \(structured pruning"):  # fmt: skip
        run(recipe, progress=False)
