"""The real SmolLM2-135M end to end: quantize, evaluate, export, load, generate (about a minute).

Smaller calibration than the default recipe (16 x 256 tokens) to fit the CI budget; the full
numbers come from benchmarks/spine.py (BENCHMARKS.md).
"""

from __future__ import annotations

import json

import pytest
import torch

from compressor import runtime
from compressor.data import evaluation_tokens
from compressor.packing import unpack_gptq_v1
from compressor.pipeline import run
from compressor.recipe import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-w4g64"
    recipe = load_recipe(
        "recipes/smollm2-w4g64.yaml",
        [
            "data.calibration.samples=16",
            "data.calibration.seq_len=256",
            "data.evaluation.seq_len=1024",
            "data.evaluation.max_windows=3",
            f"output={out}",
        ],
    )
    return recipe, run(recipe, "recipes/smollm2-w4g64.yaml", progress=False)


def test_quality_and_size(smollm2_run):
    _, result = smollm2_run
    r = json.loads((result.output / "report.json").read_text())
    dense, comp = r["perplexity"]["dense"], r["perplexity"]["compressed"]
    assert dense["windows"] == comp["windows"] == 3 and dense["tokens"] == 3 * 1023
    # The GGUF-derived dense model scores ~11-13 on python-docs; 4-bit GPTQ must stay close.
    assert 5 < dense["perplexity"] < 20
    assert 1.0 < comp["perplexity"] / dense["perplexity"] < 1.25
    assert r["size"]["artifact_over_ideal"] < 1.05
    assert r["size"]["artifact_over_dense_fp16"] < 0.45
    assert len(r["stages"][0]["layers"]) == 30 * 7


def test_artifact_matches_memory_and_generates(smollm2_run):
    recipe, result = smollm2_run
    tokenizer = runtime.load_tokenizer(result.output)
    loaded = runtime.load(result.output)
    ids = evaluation_tokens(tokenizer, recipe.data.evaluation)[:256][None]
    with torch.inference_mode():
        ref = result.model(ids).logits
        got = loaded(ids).logits
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-3
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8


def test_packed_weights_are_the_gptq_codes(smollm2_run):
    from safetensors import safe_open

    _, result = smollm2_run
    name = "model.layers.3.mlp.down_proj"
    with safe_open(str(result.output / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["qweight"].shape == (1536 * 4 // 32, 576) and t["qweight"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1536 // 64, 576)
    assert torch.equal(t["g_idx"], torch.arange(1536, dtype=torch.int32) // 64)  # static groups
    assert (t["qzeros"] == 0x77777777).all()  # symmetric 4-bit: zero 8 stored as 7
    qw = unpack_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    weight = result.model.get_submodule(name).weight
    assert torch.equal(qw.dequantize(), weight)


def test_gguf_export_scores_like_the_artifact(smollm2_run, tmp_path):
    """The default recipe's artifact as GGUF: transformers' GGUF loader scores it as our runtime
    scores the artifact (issue 14: within 0.5%), and llama.cpp (where installed) close behind."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from compressor.evaluation.perplexity import perplexity, window_nll
    from compressor.export.gguf import export_gguf

    recipe, result = smollm2_run
    qc = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False and qc["meta"]["act_order"] is True  # what vLLM accepts
    facts = export_gguf(result.output, tmp_path / "m.gguf", progress=False)
    assert facts["tensor_types"] == {"Q4_0": 210}
    ids = evaluation_tokens(runtime.load_tokenizer(result.output), recipe.data.evaluation)[:1024]
    ours = perplexity(runtime.load(result.output, dtype=torch.float32), ids, seq_len=1024, progress=False).perplexity
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    theirs = perplexity(hf, ids, seq_len=1024, progress=False).perplexity
    assert abs(theirs / ours - 1) < 0.005
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=1024, n_batch=1024, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids.tolist())
        logits = torch.from_numpy(np.asarray(llm.scores[:1024], dtype=np.float32))
    finally:
        llm.close()
    nll = window_nll(logits[None], ids[None].long()) / (len(ids) - 1)
    assert abs(float(torch.exp(nll)) / ours - 1) < 0.02  # llama.cpp rounds activations to 8 bits
