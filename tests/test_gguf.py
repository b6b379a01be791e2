"""GGUF export (compressor/export/gguf.py): our GPTQ codes as ggml blocks, checked bit for bit with
the `gguf` package's own dequantizer, loaded by transformers and (where llama-cpp-python is
installed) run by llama.cpp itself on the tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor import runtime
from compressor.algorithms.quant import rtn_quantize
from compressor.errors import UserError
from compressor.export.gguf import GGUF_FILE, gguf_weight, rope_pair_rows, write_gguf
from compressor.packing import dequantize_gptq_v1, pack_gptq_v1
from conftest import assert_user_error, invoke, make_tiny_llama, write_tiny_gptq_artifact

gguf = pytest.importorskip("gguf")


def _reference(qw) -> np.ndarray:
    t = pack_gptq_v1(qw)
    return dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], qw.bits, torch.float32).numpy()


def _dequantized(qw) -> tuple[np.ndarray, str]:
    w = gguf_weight(qw)
    return gguf.quants.dequantize(w.data, w.qtype), w.qtype.name


@pytest.mark.parametrize("bits, sym, group_size, qtype", [(4, True, 32, "Q4_0"), (4, True, 128, "Q4_0"), (4, True, -1, "Q4_0"),
                                                          (8, True, 64, "Q8_0"), (4, False, 64, "Q4_1")])  # fmt: skip
def test_blocks_dequantize_to_our_weights(bits, sym, group_size, qtype):
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.rand(48, 1)
    qw = rtn_quantize(weight, bits, group_size, sym)
    got, name = _dequantized(qw)
    assert name == qtype and got.shape == (48, 256)
    ref = _reference(qw)
    if sym:
        assert np.array_equal(got, ref)  # Q4_0 and Q8_0 are exact
    else:
        # Q4_1's offset m = fp16(-d * zero) is the one rounding: at most half an fp16 ulp of d * zero
        offset = (qw.scales.float() * qw.zeros.float()).numpy()  # [G, N]
        bound = np.repeat(np.spacing(offset.astype(np.float16)).astype(np.float32).T, 64, axis=1)
        assert np.all(np.abs(got - ref) <= bound / 2 + 1e-6 * np.abs(ref))
        assert not np.array_equal(got, ref)  # the rounding is real, so the bound is what is tested


def test_nibble_and_scale_layout_is_ggmls():
    """One Q4_0 block by hand: fp16 d, then byte j = q[j] | q[j + 16] << 4."""
    qw = rtn_quantize(torch.randn(1, 32), 4, 32, True)
    data = gguf_weight(qw).data[0]
    codes = qw.codes[0].numpy()
    assert data[:2].view(np.float16)[0] == qw.scales[0, 0].numpy()
    assert np.array_equal(data[2:], codes[:16] | (codes[16:] << 4))


def test_refusals_name_the_recipe_option():
    weight = torch.randn(8, 96)
    with pytest.raises(UserError, match="bits to 4 or 8"):
        gguf_weight(rtn_quantize(weight, 3, 32, True))
    with pytest.raises(UserError, match="multiple of 32.*group_size"):
        gguf_weight(rtn_quantize(weight, 4, 48, True))
    with pytest.raises(UserError, match="sym: true"):
        gguf_weight(rtn_quantize(weight, 8, 32, False))
    permuted = rtn_quantize(weight, 4, 32, True)
    permuted.g_idx = permuted.g_idx[torch.randperm(96)]
    with pytest.raises(UserError, match="static_groups: true"):
        gguf_weight(permuted)


def test_rope_pair_rows_interleave_each_heads_halves():
    order = rope_pair_rows(8, 2)  # two heads of 4 rows: (0,1 | 2,3) -> (0,2,1,3)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _artifact(path, tokenizer, sym: bool = True, bits: int = 4, model=None):
    """A tiny GPTQ artifact, RTN-quantized (sym or asym), act-order with static groups in its config."""
    return write_tiny_gptq_artifact(path, tokenizer, bits, 32, model=model, sym=sym, act_order=True)


IDS = [1, 504, 3937, 314, 253, 1345, 28, 1621, 30, 2]


def _runtime_logits(artifact) -> np.ndarray:
    model = runtime.load(artifact, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("sym, bits", [(True, 4), (False, 4), (True, 8)], ids=["q4_0", "q4_1", "q8_0"])
def test_transformers_loads_the_gguf_and_matches_our_runtime(tmp_path, smollm2_tokenizer, sym, bits):
    """transformers dequantizes the blocks and undoes llama.cpp's q/k row order: a wrong block
    layout, scale or permutation shows up in the logits."""
    from transformers import AutoModelForCausalLM

    artifact = _artifact(tmp_path / "gptq", smollm2_tokenizer, sym, bits)
    facts = write_gguf(artifact, tmp_path / GGUF_FILE, progress=False)
    assert facts["quantized_linears"] == 14 and set(facts["tensor_types"]) == {"Q4_0" if bits == 4 and sym else "Q4_1" if bits == 4 else "Q8_0"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].numpy()
    ref = _runtime_logits(artifact)
    scale = np.abs(ref).max()
    # Q4_0/Q8_0: the same float32 weights (float32 rounding only); Q4_1: one fp16 rounding of m
    assert np.abs(got - ref).max() / scale < (1e-5 if sym else 2e-3)


def test_metadata_and_tokenizer(tmp_path, smollm2_tokenizer):
    artifact = _artifact(tmp_path / "gptq", smollm2_tokenizer)
    write_gguf(artifact, tmp_path / "m.gguf", progress=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == (4, 2, 16)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 49152 and tokens[1] == "<|im_start|>" and tokens[smollm2_tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert field("tokenizer.ggml.token_type")[1] == 3  # special tokens are control tokens
    assert len(field("tokenizer.ggml.merges")) > 40000
    assert field("tokenizer.ggml.eos_token_id") == smollm2_tokenizer.eos_token_id
    assert "im_start" in field("tokenizer.chat_template")
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_q.weight"] == "Q4_0" and names["blk.1.ffn_down.weight"] == "Q4_0"
    assert names["blk.0.attn_norm.weight"] == "F32" and names["token_embd.weight"] == "F16"
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd


def test_llama_cpp_runs_the_gguf(tmp_path, smollm2_tokenizer):
    """llama.cpp itself: loads the file, its logits follow our runtime's, and it generates."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here")
    artifact = _artifact(tmp_path / "gptq", smollm2_tokenizer)
    write_gguf(artifact, tmp_path / "m.gguf", progress=False)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(IDS)
        got = np.array(llm.scores[: len(IDS)])
        out = llm.create_completion("def fibonacci(n):", max_tokens=4, temperature=0)
    finally:
        llm.close()
    ref = _runtime_logits(artifact)
    # llama.cpp rounds activations to 8 bits for its Q4_0 dot products: close, not equal
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
    assert out["usage"]["completion_tokens"] >= 1


def test_cli_export_info_and_overwrite(tmp_path, smollm2_tokenizer):
    artifact = _artifact(tmp_path / "gptq", smollm2_tokenizer)
    out = tmp_path / "tiny.gguf"
    result = invoke("export", artifact, "--format", "gguf", "--output", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "14 Q4_0 linears" in result.stdout and out.is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    info = invoke("info", out)
    assert info.exit_code == 0 and "GGUF file (llama, 2 blocks" in info.stdout and "14 Q4_0" in info.stdout
    before = out.read_bytes()
    assert_user_error(invoke("export", artifact, "--format", "gguf", "--output", out), "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert invoke("export", artifact, "--format", "gguf", "--output", out, "--overwrite", "--no-progress").exit_code == 0
    assert out.read_bytes() == before  # deterministic
    assert_user_error(invoke("export", artifact, "--format", "gguf", "--output", tmp_path / "x.bin"), "ending in .gguf")
    assert_user_error(invoke("export", artifact, "--format", "ggml", "--output", out), "'ggml' is not supported", "gguf")


def test_cli_refuses_a_dynamic_act_order_artifact(tmp_path, smollm2_tokenizer):
    model = make_tiny_llama(initializer_range=0.3)
    artifact = _artifact(tmp_path / "gptq", smollm2_tokenizer, model=model)
    # permute one linear's g_idx in the stored file, as dynamic act-order writes it
    from safetensors.torch import load_file, save_file

    tensors = load_file(artifact / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name][torch.randperm(tensors[name].numel(), generator=torch.Generator().manual_seed(0))].contiguous()
    save_file(tensors, artifact / "model.safetensors", metadata={"format": "pt"})
    (artifact / "manifest.json").unlink(missing_ok=True)
    out = tmp_path / "x.gguf"
    assert_user_error(invoke("export", artifact, "--format", "gguf", "--output", out), "model.layers.0.mlp.down_proj", "static_groups: true")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_recipe_exports_gguf_and_validate_refuses_what_it_cannot_hold(tmp_path, tiny_llama_dir):
    from test_cli import write_recipe

    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    write_recipe(recipe, tiny_llama_dir, out)
    bad = invoke("validate", recipe, "--set", "export.format=gguf", "--set", "stages[0].quantize.static_groups=false")
    assert_user_error(bad, "export.format", "static_groups: true")
    assert_user_error(invoke("validate", recipe, "--set", "export.format=gguf", "--set", "stages[0].quantize.bits=3"), "bits to 4 or 8")
    result = invoke("run", recipe, "--set", "export.format=gguf", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["gguf_config.json", "layer_errors.png", "manifest.json", GGUF_FILE,
                                                     "recipe.yaml", "report.json", "report.md"]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["size"]["gguf_bytes"] == (out / GGUF_FILE).stat().st_size
    info = invoke("info", out)
    assert info.exit_code == 0 and "GGUF file (llama" in info.stdout and "manifest: verified" in info.stdout


def test_a_dense_checkpoint_is_written_in_float16_or_rounded_to_nearest(tmp_path, tiny_llama_dir):
    """The baseline of benchmarks/gguf_quality.py: the same writer, float16 or gguf's own RTN quantizer."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = dense(torch.tensor([IDS])).logits[0].numpy()
    for rtn, tolerance in ((None, 1e-2), ("Q4_0", 0.5)):
        out = tmp_path / f"{rtn}.gguf"
        facts = write_gguf(tiny_llama_dir, out, progress=False, round_to_nearest=rtn)
        assert facts["tensor_types"] == ({"Q4_0": 14} if rtn else {})
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(got - ref).max() / np.abs(ref).max() < tolerance
        if rtn:  # every block linear is gguf's quantization of the dense weight (q/k in llama.cpp's row order)
            reader = gguf.GGUFReader(out)
            stored = {t.name: np.asarray(t.data) for t in reader.tensors}
            q = dense.model.layers[0].self_attn.q_proj.weight.detach().numpy()[rope_pair_rows(64, 4)]
            assert np.array_equal(stored["blk.0.attn_q.weight"].reshape(-1), gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q4_0).reshape(-1))
    with pytest.raises(UserError, match="Q4_0, Q4_1 or Q8_0"):
        write_gguf(tiny_llama_dir, tmp_path / "x.gguf", round_to_nearest="Q5_K")


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_load_in_transformers_and_llama_cpp(tmp_path, smollm2_tokenizer, kind):
    """mistral writes as llama (q/k rows permuted), qwen2 (q/k/v biases, untied lm_head) and qwen3
    (q_norm/k_norm) under their own names with rows as they are."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]  # fmt: skip
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                               # transformers' GGUF reader takes Qwen3's head_dim from its default (128), not the file
                                               head_dim=128 if kind == "qwen3" else 16,
                                               initializer_range=0.3, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = getattr(transformers, model_cls)(config).eval().requires_grad_(False)
    if kind == "qwen2":  # random biases, so that a bias in the wrong place shows
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    artifact = write_tiny_gptq_artifact(tmp_path / "gptq", smollm2_tokenizer, 4, 32, model=model, act_order=True)
    facts = write_gguf(artifact, tmp_path / GGUF_FILE, progress=False)
    assert facts["architecture"] == ("llama" if kind == "mistral" else kind) and facts["tensor_types"] == {"Q4_0": 14}
    names = {t.name for t in gguf.GGUFReader(tmp_path / GGUF_FILE).tensors}
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2") and ("blk.0.attn_q_norm.weight" in names) == (kind == "qwen3")
    ref = _runtime_logits(artifact)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here")

    def llama_cpp_logits(path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        try:
            llm.eval(IDS)
            return np.array(llm.scores[: len(IDS)])
        finally:
            llm.close()

    # The layout (names, q/k order, biases, norms) pinned tightly on float16 weights, where llama.cpp
    # computes in float; then the Q4_0 file, where it rounds activations to 8 bits (a few % here:
    # random weights of std 0.3 and biases of std 0.5 give outsized activations).
    model.save_pretrained(tmp_path / "dense")
    smollm2_tokenizer.save_pretrained(tmp_path / "dense")
    write_gguf(tmp_path / "dense", tmp_path / "dense.gguf", progress=False)
    with torch.no_grad():
        dense_ref = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "dense.gguf") - dense_ref).max() / np.abs(dense_ref).max() < 0.01
    got = llama_cpp_logits(tmp_path / GGUF_FILE)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.1 and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
