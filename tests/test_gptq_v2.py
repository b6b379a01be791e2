"""gptq_v2 checkpoints (qzeros hold the zero points themselves; GPTQModel's format): written by
`export.checkpoint_format: gptq_v2`, read by the runtime and every converter exactly like v1, and
(where gptqmodel is installed) loaded by GPTQModel, which refuses asymmetric v1 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import runtime
from compressor.packing import pack_qzeros, qzeros_v1_to_v2, qzeros_v2_to_v1, unpack_along_rows, unpack_qzeros_v1
from conftest import assert_user_error, invoke, write_tiny_gptq_artifact

IDS = torch.tensor([[1, 504, 3937, 314, 253, 1345]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qzeros_v1_and_v2_convert_exactly(bits):
    torch.manual_seed(bits)
    zeros = torch.randint(1, 2**bits, (6, 64))
    v1, v2 = pack_qzeros(zeros, bits, offset=1), pack_qzeros(zeros, bits, offset=0)
    assert torch.equal(unpack_qzeros_v1(v1, bits, 64), zeros)
    assert torch.equal(unpack_along_rows(v2.T.contiguous(), bits, 64).T, zeros)
    assert torch.equal(qzeros_v1_to_v2(v1, bits, 64), v2) and torch.equal(qzeros_v2_to_v1(v2, bits, 64), v1)
    with pytest.raises(ValueError, match="zero point of 0"):
        qzeros_v2_to_v1(pack_qzeros(zeros * 0, bits, offset=0), bits, 64)


def _artifact(path, tokenizer, checkpoint_format: str, bits: int = 4, sym: bool = False):
    return write_tiny_gptq_artifact(path, tokenizer, bits, 32, sym=sym, act_order=True, checkpoint_format=checkpoint_format)


def _logits(path):
    with torch.no_grad():
        return runtime.load(path, dtype=torch.float32)(IDS).logits


@pytest.mark.parametrize("bits", [3, 4])
def test_v2_reads_as_v1_everywhere(tmp_path, smollm2_tokenizer, bits):
    from safetensors.torch import load_file

    v1 = _artifact(tmp_path / "v1", smollm2_tokenizer, "gptq", bits)
    v2 = _artifact(tmp_path / "v2", smollm2_tokenizer, "gptq_v2", bits)
    assert json.loads((v2 / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    a, b = load_file(v1 / "model.safetensors"), load_file(v2 / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.qzeros"
    assert not torch.equal(a[name], b[name]) and torch.equal(qzeros_v1_to_v2(a[name], bits, 128), b[name])
    assert all(torch.equal(a[n], b[n]) for n in a if not n.endswith(".qzeros"))
    assert torch.equal(_logits(v1), _logits(v2))
    result = invoke("info", v2)
    assert result.exit_code == 0 and "checkpoint_format=gptq_v2" in result.stdout


def test_converters_read_v2_like_v1(tmp_path, smollm2_tokenizer):
    from compressor.export.gguf import write_gguf

    v1 = _artifact(tmp_path / "v1", smollm2_tokenizer, "gptq")
    v2 = _artifact(tmp_path / "v2", smollm2_tokenizer, "gptq_v2")
    write_gguf(v1, tmp_path / "v1.gguf", progress=False, name="m")
    write_gguf(v2, tmp_path / "v2.gguf", progress=False, name="m")
    assert (tmp_path / "v1.gguf").read_bytes() == (tmp_path / "v2.gguf").read_bytes()
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")  # the GGUF half ran above
    from safetensors.torch import load_file

    from compressor.export.compressed_tensors import write_compressed_tensors_artifact

    for d in ("ct1", "ct2"):
        (tmp_path / d).mkdir()
    write_compressed_tensors_artifact(v1, tmp_path / "ct1", progress=False)
    write_compressed_tensors_artifact(v2, tmp_path / "ct2", progress=False)
    a, b = load_file(tmp_path / "ct1" / "model.safetensors"), load_file(tmp_path / "ct2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_recipe_writes_v2_and_refuses_it_for_other_formats(tmp_path, tiny_llama_dir):
    from test_cli import write_recipe

    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    write_recipe(recipe, tiny_llama_dir, out, sym=False)
    assert_user_error(invoke("validate", recipe, "--set", "export.checkpoint_format=gptq_v2", "--set", "export.format=onnx"),
                      "export.checkpoint_format", "export.format gptq only")  # fmt: skip
    result = invoke("run", recipe, "--set", "export.checkpoint_format=gptq_v2", "--no-progress")
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    assert runtime.load(out)(IDS).logits.isfinite().all()


def test_gptqmodel_loads_v2_asymmetric_and_refuses_v1(tmp_path, smollm2_tokenizer):
    """GPTQModel itself: the reason gptq_v2 exists here. Skips where gptqmodel (and optimum, which
    transformers' GPTQ path needs) are not installed; they are not project dependencies."""
    gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed here (not a project dependency)")
    pytest.importorskip("optimum", reason="optimum is not installed here (transformers' GPTQ loader needs it)")
    from transformers import AutoModelForCausalLM

    v1 = _artifact(tmp_path / "v1", smollm2_tokenizer, "gptq")
    v2 = _artifact(tmp_path / "v2", smollm2_tokenizer, "gptq_v2")
    sym = _artifact(tmp_path / "sym", smollm2_tokenizer, "gptq", sym=True)
    with pytest.raises(ValueError, match="sym=False"):
        gptqmodel.GPTQModel.load(str(v1), device="cpu")
    for path in (v2, sym):
        ref = _logits(path)
        for model in (gptqmodel.GPTQModel.load(str(path), device="cpu").model,
                      AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu")):  # fmt: skip
            with torch.no_grad():
                got = model(IDS).logits.float()
            rel = float((got - ref).abs().max() / ref.abs().max())
            assert rel < 0.03  # GPTQModel.load computes in bfloat16 (1.7e-2 here), transformers in float16 (2.5e-3)
