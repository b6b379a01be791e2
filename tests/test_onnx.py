"""ONNX export (MatMulNBits decoder with past key/values) and its onnxruntime runtime.

The ONNX graph must run the artifact's own quantized weights: the MatMulNBits tensors dequantize
bit for bit to `dequantize_gptq_v1`, and onnxruntime's logits match the PyTorch runtime's on the
same artifact up to float32 summation order. Measured max |logit difference| (float32, CPU EP,
accuracy_level 0): tiny Llama ~3e-7 (logits ~1), SmolLM2-135M ~7e-5 (logits up to ~41); the
tolerances below leave ~30x (tiny) and ~7x (SmolLM2) headroom. accuracy_level 4 (int8
activations) is a different, approximate computation: ~6e-3 on the tiny model, ~1.7 on SmolLM2.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml

from compressor import runtime
from compressor.algorithms.quant import rtn_quantize
from compressor.errors import RecipeError, UserError
from compressor.artifacts.directory import verify_manifest
from compressor.export.onnx import dequantize_nbits, export_onnx, gptq_to_nbits
from compressor.packing import pack_gptq_v1
from compressor.pipeline import run, validate
from compressor.recipe import load_recipe
from compressor.runtime import dequantize_gptq_v1
from compressor.runtime import onnx as onnx_runtime
from conftest import assert_user_error, invoke

TINY_ATOL = 1e-5
SMOLLM2_ATOL = 5e-4
PROMPTS = ("def fibonacci(n):", "The capital of France is")




def write_recipe(path, model_dir, output, export="gptq", **quantize):
    recipe = {
        "model": str(model_dir),
        "data": {"calibration": {"samples": 4, "seq_len": 64}},
        "stages": [{"quantize": {"bits": 4, "group_size": 32, **quantize}}],
        "evaluate": {"perplexity": False},
        "export": {"format": export},
        "output": str(output),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama_dir):
    """GPTQ artifacts of the tiny Llama and their ONNX exports.

    `static`: the default recipe (act-order with static groups: g_idx = k // group_size).
    `act_order`: groups formed in act-order (permuted g_idx), and down_proj left unquantized.
    """
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, quantize in (("static", {}), ("act_order", {"static_groups": False, "skip": ["lm_head", "*.down_proj"]})):
        recipe = write_recipe(root / f"{name}.yaml", tiny_llama_dir, root / name, **quantize)
        run(load_recipe(recipe), progress=False)
        out[name] = (root / name, export_onnx(root / name, root / f"{name}-onnx", progress=False))
    return out


def gptq_layers(path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    return {n: {s: tensors[f"{n}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx") if f"{n}.{s}" in tensors} for n in names}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_conversion_is_exact(bits, group_size, act_order):
    """Dequantizing the MatMulNBits tensors in numpy gives dequantize_gptq_v1's weight, bit for bit."""
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits))
    if act_order:  # RTN over a random column order, stored in the original order (GPTQ desc_act layout)
        perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
        qw = rtn_quantize(weight[:, perm], bits, group_size, sym=False)
        inverse = torch.argsort(perm)
        qw.codes, qw.g_idx = qw.codes[:, inverse].contiguous(), qw.g_idx[inverse].contiguous()
    else:
        qw = rtn_quantize(weight, bits, group_size, sym=False)
    qw.zeros = qw.zeros.clamp(min=1)  # v1 cannot store a zero of 0
    t = pack_gptq_v1(qw)
    w = gptq_to_nbits(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    expected = dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float32).numpy()
    assert (w.perm is not None) == (act_order and group_size != -1)
    assert w.block_size == (16 if group_size == 48 else 32)  # largest power of two inside every group
    order = w.perm if w.perm is not None else np.arange(96)
    assert np.array_equal(dequantize_nbits(w), expected[:, order])
    assert w.packed.dtype == np.uint8 and w.packed.shape == (48, 96 // w.block_size, w.block_size * bits // 8)


def test_bits_matmulnbits_cannot_run():
    qw = rtn_quantize(torch.randn(32, 64), 3, 32, sym=True)
    t = pack_gptq_v1(qw)
    with pytest.raises(UserError, match="3-bit weights cannot be exported to ONNX"):
        gptq_to_nbits(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 3, "layer")


@pytest.mark.parametrize("kind", ["static", "act_order"])
def test_graph_holds_our_weights_as_matmulnbits(artifacts, kind):
    """One MatMulNBits per quantized linear, none for skipped ones, and its tensors are the artifact's."""
    gptq, onnx_dir = artifacts[kind]
    model = onnx.load(onnx_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    layers = gptq_layers(gptq)
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert set(nodes) == set(layers)
    assert len(layers) == (14 if kind == "static" else 12)
    float_matmuls = {n.name.removesuffix("/MatMul") for n in model.graph.node if n.op_type == "MatMul"}
    if kind == "act_order":
        assert float_matmuls == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    else:
        assert float_matmuls == set()
    assert [n.name for n in model.graph.node if n.op_type == "Gemm"] == ["lm_head"]
    inits = initializers(model)
    # Tied embeddings: one [vocab, hidden] matrix feeds both the embedding Gather and lm_head.
    assert sum(a.shape == (49152, 64) for a in inits.values()) == 1

    for name, t in layers.items():
        node = nodes[name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["accuracy_level"] == 0
        packed, scales, zeros = (inits[i] for i in node.input[1:4])
        k, n = attrs["K"], attrs["N"]
        w = gptq_to_nbits(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
        w.packed, w.scales, w.zero_points = packed, scales, zeros  # dequantize what the file holds
        expected = dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, torch.float32).numpy()
        g_idx = t["g_idx"].numpy()
        trivial = np.array_equal(g_idx, np.arange(k) // 32)
        assert trivial == (kind == "static")
        producer = next(p for p in model.graph.node if node.input[0] in p.output)
        if trivial:  # K keeps its order: the activation goes in as it is
            assert producer.op_type != "Gather"
            order = np.arange(k)
        else:  # the activation is gathered in the order the blocks were cut
            assert producer.op_type == "Gather"
            order = inits[producer.input[1]]
            assert sorted(order.tolist()) == list(range(k))
        assert (k, n) == (expected.shape[1], expected.shape[0])
        assert np.array_equal(dequantize_nbits(w), expected[:, order]), name


# ---------------------------------------------------------------------------- runtime parity
def _torch_logits(model, ids, mask=None):
    with torch.inference_mode():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("kind", ["static", "act_order"])
def test_logits_match_the_pytorch_runtime(artifacts, kind, smollm2_tokenizer):
    gptq, onnx_dir = artifacts[kind]
    ort_model, pt_model = onnx_runtime.load(onnx_dir), runtime.load(gptq)
    ids = smollm2_tokenizer("def fibonacci(n):\n    if n < 2:\n        return n", return_tensors="np").input_ids
    expected = _torch_logits(pt_model, ids)

    prefill = ort_model.logits(ids)
    assert prefill.shape == expected.shape
    assert np.abs(prefill - expected).max() < TINY_ATOL
    # Prompt half, then one token at a time through the key/value cache.
    half = ids.shape[1] // 2
    step = ort_model.forward(ids[:, :half])
    steps = [step.logits]
    for j in range(half, ids.shape[1]):
        assert step.past["past_key_values.1.key"].shape == (1, 2, j, 16)
        step = ort_model.forward(ids[:, j : j + 1], step.past, np.ones((1, j + 1), np.int64))
        steps.append(step.logits)
    assert np.abs(np.concatenate(steps, axis=1) - expected).max() < TINY_ATOL

    # A left-padded batch: each row equals that sequence alone (and the PyTorch runtime's padded batch).
    rows = [ids[0, :9], ids[0, 3:9]]
    batch = np.array([rows[0], np.r_[[2, 2, 2], rows[1]]])
    mask = np.array([[1] * 9, [0, 0, 0] + [1] * 6])
    padded = ort_model.forward(batch, attention_mask=mask).logits
    assert np.abs(padded[0] - ort_model.logits(rows[0][None])[0]).max() < TINY_ATOL
    assert np.abs(padded[1, 3:] - ort_model.logits(rows[1][None])[0]).max() < TINY_ATOL
    assert np.abs(padded[1, 3:] - _torch_logits(pt_model, batch, mask)[1, 3:]).max() < TINY_ATOL


@pytest.mark.parametrize("kind", ["static", "act_order"])
def test_greedy_generation_matches_the_pytorch_runtime(artifacts, kind, smollm2_tokenizer):
    gptq, onnx_dir = artifacts[kind]
    ort_model, pt_model = onnx_runtime.load(onnx_dir), runtime.load(gptq)
    for prompt in PROMPTS:
        ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = pt_model.generate(ids, max_new_tokens=32, do_sample=False).numpy()
        got = ort_model.generate(ids.numpy(), 32)
        assert got.shape == expected.shape and np.array_equal(got, expected), prompt
    # Without stopping at end-of-sequence, exactly max_new_tokens come back.
    assert ort_model.generate(ids.numpy(), 5, stop_at_eos=False).shape == (1, ids.shape[1] + 5)


def test_int8_accuracy_level(artifacts, tmp_path, smollm2_tokenizer):
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: close, not equal."""
    gptq, _ = artifacts["static"]
    out = export_onnx(gptq, tmp_path / "acc4", accuracy_level=4, progress=False)
    model = onnx.load(out / "model.onnx")
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    ids = smollm2_tokenizer("def fibonacci(n):", return_tensors="np").input_ids
    expected = _torch_logits(runtime.load(gptq), ids)
    diff = np.abs(onnx_runtime.load(out).logits(ids) - expected).max()
    assert 0 < diff < 0.05 * np.abs(expected).max()


def test_artifact_directory(artifacts):
    gptq, onnx_dir = artifacts["static"]
    assert onnx_runtime.is_onnx_artifact(onnx_dir) and not onnx_runtime.is_onnx_artifact(gptq)
    assert not runtime.is_gptq_artifact(onnx_dir)  # no GPTQ quantization_config: nothing loads it as safetensors
    assert verify_manifest(onnx_dir) is True
    names = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "onnx_config.json", "config.json", "tokenizer.json", "generation_config.json", "manifest.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    oc = json.loads((onnx_dir / "onnx_config.json").read_text())
    assert oc["matmul_nbits"] == {"bits": 4, "block_sizes": [32], "accuracy_level": 0, "layers": 14}
    assert oc["quantization_config"]["quant_method"] == "gptq"
    assert not [p for p in onnx_dir.parent.iterdir() if ".tmp-" in p.name]
    (onnx_dir / "model.onnx").open("r+b").write(b"\0")  # corrupt one byte
    try:
        with pytest.raises(UserError, match="sha256"):
            onnx_runtime.load(onnx_dir)
    finally:
        export_onnx(gptq, onnx_dir, overwrite=True, progress=False)


# ------------------------------------------------------------------------------------- CLI
def test_cli_export_and_generate(artifacts, tmp_path):
    gptq, _ = artifacts["act_order"]
    out = tmp_path / "cli-onnx"
    result = invoke("export", gptq, "--format", "onnx", "--output", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"onnx artifact: {out} (") and onnx_runtime.is_onnx_artifact(out)
    onnx_text = invoke("generate", out, "def fibonacci(n):", "--max-new-tokens", "12")
    torch_text = invoke("generate", gptq, "def fibonacci(n):", "--max-new-tokens", "12")
    assert onnx_text.exit_code == 0, onnx_text.output
    assert onnx_text.stdout == torch_text.stdout and len(onnx_text.stdout) > len("def fibonacci(n):\n")
    sampled = invoke("generate", out, "def fibonacci(n):", "--max-new-tokens", "12", "--temperature", "1.5", "--seed", "3")
    assert sampled.exit_code == 0 and sampled.stdout.startswith("def fibonacci(n):")
    assert sampled.stdout == invoke("generate", out, "def fibonacci(n):", "--max-new-tokens", "12", "--temperature", "1.5",
                                    "--seed", "3").stdout  # fmt: skip
    info = invoke("info", out)
    assert info.exit_code == 0 and "ONNX artifact (opset 23), 12 MatMulNBits linears, bits=4" in info.stdout

    assert_user_error(invoke("export", gptq, "--format", "onnx", "--output", out), str(out), "already exists", "--overwrite")
    assert invoke("export", gptq, "--format", "onnx", "--output", out, "--overwrite", "--no-progress").exit_code == 0
    assert_user_error(invoke("export", gptq, "--format", "awq", "--output", tmp_path / "x"), "--format", "'awq'", "onnx, gguf, compressed-tensors")
    assert_user_error(invoke("export", tmp_path / "missing", "--format", "onnx", "--output", tmp_path / "x"), "not a directory")
    assert_user_error(invoke("export", out, "--format", "onnx", "--output", tmp_path / "x"), "not a GPTQ artifact")
    assert_user_error(invoke("export", gptq, "--format", "onnx", "--output", tmp_path / "y", "--accuracy-level", "2"),
                      "--accuracy-level")  # fmt: skip
    scored = [invoke("eval", d, "--seq-len", "64", "--max-windows", "2", "--json") for d in (out, gptq)]
    assert all(r.exit_code == 0 for r in scored), [r.output for r in scored]
    onnx_ppl, torch_ppl = (json.loads(r.stdout.strip().splitlines()[-1]) for r in scored)
    assert onnx_ppl["tokens"] == torch_ppl["tokens"] == 2 * 63
    assert abs(onnx_ppl["perplexity"] - torch_ppl["perplexity"]) <= 1e-4 * torch_ppl["perplexity"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------- recipe
def test_recipe_exports_onnx(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, tmp_path / "out", export="onnx")
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert onnx_runtime.is_onnx_artifact(out) and verify_manifest(out) is True
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "report.json", "report.md", "recipe.yaml", "tokenizer.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary GPTQ copy left
    size = json.loads((out / "report.json").read_text())["size"]
    assert size["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert size["onnx_over_gptq"] == pytest.approx(size["onnx_bytes"] / size["artifact_weights_bytes"])
    assert 1.0 <= size["artifact_over_ideal"] < 1.05  # the GPTQ weights the ONNX file was made from
    model = onnx.load(out / "model.onnx")
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 14
    gen = invoke("generate", out, "hello", "--max-new-tokens", "4")
    assert gen.exit_code == 0 and gen.stdout.startswith("hello")


def test_recipe_validation(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, tmp_path / "out", export="onnx", bits=3)
    with pytest.raises(RecipeError, match=r"stages\[0\].quantize.bits: 3 is not allowed: export.format onnx needs bits 2, 4, 8"):
        validate(load_recipe(recipe), str(recipe))
    no_quantize = load_recipe(recipe, ["stages=[{prune: {method: magnitude, sparsity: 0.5}}]"])
    with pytest.raises(RecipeError, match="export.format: 'onnx' is not allowed: needs a quantize stage"):
        validate(no_quantize)
    validate(load_recipe(recipe, ["stages[0].quantize.bits=8"]))


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    from transformers import GPT2Config

    from compressor.export.onnx import decoder_shape

    with pytest.raises(UserError, match="ONNX export supports model types llama, mistral, qwen2, qwen3, not 'gpt2'"):
        decoder_shape(GPT2Config())


def test_dynamic_rope_is_refused_at_validation(tmp_path, tiny_llama_dir):
    """Checked by decoder_shape, which `compress run` calls before any work (not only when the graph is built)."""
    import shutil

    model_dir = tmp_path / "dynamic-rope"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, tmp_path / "out", export="onnx")
    with pytest.raises(RecipeError, match="rope_type 'dynamic' is not supported by the ONNX export"):
        validate(load_recipe(recipe), str(recipe))


# ------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_onnx_matches_the_pytorch_runtime(tmp_path_factory, smollm2_tokenizer):
    """The real SmolLM2-135M at 4 bits, group size 64, sym (the shipped recipe's layout).

    RTN weights written straight to a GPTQ v1 artifact keep this quick: the graph and the
    runtimes are under test here, not GPTQ (tests/test_smollm2_e2e.py covers that).
    """
    from compressor.artifacts.directory import write_manifest
    from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint
    from compressor.models import load_model, resolve_source

    root = tmp_path_factory.mktemp("smollm2-onnx")
    model = load_model(resolve_source("smollm2-135m"), torch.float32)
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(module.weight.detach(), 4, 64, sym=True)
    gptq = root / "gptq"
    gptq.mkdir()
    write_gptq_checkpoint(gptq, model, quantized, gptq_quantization_config(4, 64, True, False, True, 0.01, True), smollm2_tokenizer)
    write_manifest(gptq)
    del model
    onnx_dir = export_onnx(gptq, root / "onnx", progress=False)
    ort_model, pt_model = onnx_runtime.load(onnx_dir), runtime.load(gptq)
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(onnx_dir / "model.onnx").graph.node) == 30 * 7
    ids = smollm2_tokenizer("import numpy as np\n\ndef softmax(x):\n    \"\"\"Softmax of x.\"\"\"\n", return_tensors="np").input_ids
    expected = _torch_logits(pt_model, ids)
    assert np.abs(ort_model.logits(ids) - expected).max() < SMOLLM2_ATOL
    step = ort_model.forward(ids[:, :-4])
    for j in range(ids.shape[1] - 4, ids.shape[1]):
        step = ort_model.forward(ids[:, j : j + 1], step.past, np.ones((1, j + 1), np.int64))
        assert np.abs(step.logits[0, -1] - expected[0, j]).max() < SMOLLM2_ATOL
    for prompt in PROMPTS:
        p = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            want = pt_model.generate(p, max_new_tokens=32, do_sample=False).numpy()
        assert np.array_equal(ort_model.generate(p.numpy(), 32), want), prompt
