"""compressed-tensors export (`pack-quantized`, what llm-compressor writes) of GPTQ v1 artifacts.

The export re-expresses the artifact's own codes, scales and zero points: the weights that
compressed-tensors decompresses equal `dequantize_gptq_v1` bit for bit in float16, and the model
transformers loads from the export gives our runtime's logits (float32: up to summation order;
measured ~2e-6 relative on the tiny model, checked at 1e-3). vLLM itself is not run here (no GPU
and no vLLM on CI); the config is checked the way vLLM parses it (QuantizationArgs and
SparsityCompressionConfig validation).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install 'compressed-tensors>=0.20')")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.config import SparsityCompressionConfig, SparsityStructure  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402

from compressor import runtime  # noqa: E402
from compressor.algorithms.pruning import check_nm, magnitude_prune  # noqa: E402
from compressor.algorithms.quant import rtn_quantize  # noqa: E402
from compressor.errors import ArtifactError, UserError  # noqa: E402
from compressor.artifacts.directory import verify_manifest  # noqa: E402
from compressor.export.compressed_tensors import (  # noqa: E402
    RECIPE_FIX,
    convert_checkpoint_dir,
    export_compressed_tensors,
    write_compressed_tensors_artifact,
)
from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint  # noqa: E402
from compressor.packing import dequantize_gptq_v1  # noqa: E402
from compressor.prune import sparsity_config  # noqa: E402
from conftest import make_tiny_llama, write_tiny_gptq_artifact  # noqa: E402

RELATIVE_TOLERANCE = 1e-3
IDS = torch.tensor([[1, 17, 2024, 31337, 512, 7, 49000, 3]])
CONFIGS = {"w4g32-sym": (4, True), "w8g32-sym": (8, True), "w4g32-asym": (4, False)}
# compressed-tensors 0.20.1 compresses the meta-device model transformers builds before loading
# without packing asymmetric zero points ([N, G] int8), while real checkpoints (llm-compressor's,
# and ours) store them packed ([N*bits/32, G] int32, what vLLM reads): plain `from_pretrained`
# then fails with a size mismatch. `dequantize=True` decompresses the checkpoint tensors instead.
ASYM_DEFAULT_LOAD = "compressed-tensors 0.20.1 does not pack asymmetric zero points on the meta model transformers loads into"


def write_gptq(out, tokenizer, bits=4, sym=True, group_size=32, pattern=None, skip=(), **overrides):
    """A GPTQ artifact of a tiny random Llama, block linears RTN-quantized (but those ending in one of
    `skip`); with `pattern` (e.g. "2:4") they are magnitude-pruned first, and config.json records
    it as the pipeline does."""
    model = make_tiny_llama(initializer_range=0.3, **overrides)
    quantized, pruned = {}, []
    for name, linear in model.named_modules():
        if isinstance(linear, nn.Linear) and ".layers." in name and not name.endswith(tuple(skip)):
            if pattern:
                linear.weight.data = magnitude_prune(linear.weight.data, pattern=pattern).weight
                pruned.append(name)
            quantized[name] = rtn_quantize(linear.weight, bits, group_size, sym)  # keeps zeros exactly zero
            linear.weight.data = quantized[name].dequantize()
    if pattern:
        summary = {"structure": pattern, "method": "magnitude", "sparsity_of_block_linears": 0.5,
                   "sparsity_of_pruned_linears": 0.5}  # fmt: skip
        model.config.compressor_sparsity = sparsity_config(summary, pruned, ["lm_head"])
    out.mkdir(parents=True, exist_ok=True)
    config = gptq_quantization_config(bits, group_size, sym, True, True, 0.01, True)  # act-order, static groups
    write_gptq_checkpoint(out, model, quantized, config, tokenizer=tokenizer)
    return out


def quantized_names(gptq_dir) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in load_file(gptq_dir / "model.safetensors") if k.endswith(".qweight"))


def relative_error(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def decompressed(out_dir) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' own decompressor rebuilds it."""
    config = QuantizationConfig.model_validate(json.loads((out_dir / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(out_dir / "model.safetensors")
    weights = {}
    for key in tensors:
        if key.endswith(".weight_packed"):
            module = key[: -len(".weight_packed")]
            local = {k[len(module) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{module}.weight_")}
            weights[module] = compressor.decompress(local, scheme)["weight"]
    return weights


def load_with_transformers(out_dir, dtype, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": as intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, **extra).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory, smollm2_tokenizer):
    """(name, bits, sym, gptq_dir, export_dir, facts-free export) for each configuration."""
    bits, sym = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    gptq_dir = write_gptq(root / "gptq", smollm2_tokenizer, bits, sym)
    out = export_compressed_tensors(gptq_dir, root / "ct", progress=False)
    return request.param, bits, sym, gptq_dir, out


@pytest.fixture(scope="module")
def runtime_logits():
    cache = {}

    def logits(gptq_dir):
        if gptq_dir not in cache:
            with torch.no_grad():  # not inference_mode: the CPU kernels track tensor versions
                cache[gptq_dir] = runtime.load(gptq_dir)(IDS).logits.float()
        return cache[gptq_dir]

    return logits


def test_config_is_what_llm_compressor_writes(exported):
    _, bits, sym, gptq_dir, out = exported
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert qc["sparsity_config"] == {} and qc["transform_config"] == {} and qc["version"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized" and group["input_activations"] is None
    weights = group["weights"]
    assert weights == {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 32,
                       "dynamic": False, "actorder": "static"}  # fmt: skip
    # vLLM validates each group's weights with QuantizationArgs (extra keys forbidden); transformers the whole block.
    assert QuantizationArgs.model_validate(weights).num_bits == bits
    QuantizationConfig.model_validate(qc)
    assert config["dtype"] == "float16" and "compressor_sparsity" not in config
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "generation_config.json", "manifest.json", "model.safetensors"} <= names
    assert "quantize_config.json" not in names  # AutoGPTQ's file would claim GPTQ
    assert verify_manifest(out)


def test_tensors_reexpress_the_gptq_tensors_exactly(exported):
    _, bits, sym, gptq_dir, out = exported
    source, tensors = load_file(gptq_dir / "model.safetensors"), load_file(out / "model.safetensors")
    weights = decompressed(out)
    modules = quantized_names(gptq_dir)
    assert sorted(weights) == modules and len(modules) == 14
    for name in modules:
        s = {k: source[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        # For 4/8 bits both formats are little-endian streams of the unsigned codes along K.
        assert torch.equal(tensors[f"{name}.weight_packed"], s["qweight"].T)
        assert torch.equal(tensors[f"{name}.weight_scale"], s["scales"].T)
        n, k = s["scales"].shape[1], s["qweight"].shape[0] * 32 // bits
        assert tensors[f"{name}.weight_shape"].tolist() == [n, k]
        assert (f"{name}.weight_zero_point" in tensors) == (not sym) and f"{name}.weight_g_idx" not in tensors
        expected = dequantize_gptq_v1(**s, bits=bits, dtype=torch.float16)
        assert weights[name].dtype == torch.float16 and torch.equal(weights[name], expected), name
    plain = {k for k in source if k.rpartition(".")[0] not in modules}
    for key in plain:  # embeddings, norms: copied as stored
        assert torch.equal(tensors[key], source[key]) and tensors[key].dtype == torch.float16


def gptq_weight(gptq_dir, layer, bits, dtype) -> torch.Tensor:
    s = load_file(gptq_dir / "model.safetensors")
    return dequantize_gptq_v1(*(s[f"{layer}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), bits, dtype)


@pytest.mark.parametrize("dequantize", [False, True], ids=["compressed-load", "dequantize-load"])
def test_transformers_loads_the_export_and_matches_our_runtime(exported, runtime_logits, dequantize):
    """The default load keeps the weights packed and decompresses them on the first forward, in the
    model's dtype (the scales are cast to it first): in float32 that is our runtime's exact
    dequantization. `dequantize=True` decompresses each checkpoint tensor in its own dtype (fp16)
    and casts the result: float16 weights (exactly `dequantize_gptq_v1` in fp16, checked), which
    differ from the runtime's float32 ones by that rounding (measured <= 1.7e-3 on the logits)."""
    name, bits, sym, gptq_dir, out = exported
    if not sym and not dequantize:
        pytest.xfail(ASYM_DEFAULT_LOAD)
    layer = "model.layers.1.mlp.down_proj"
    model = load_with_transformers(out, torch.float32, dequantize)
    with torch.inference_mode():
        logits = model(IDS).logits  # the first forward decompresses the packed weights (compressed load)
    exact = gptq_weight(gptq_dir, layer, bits, torch.float16 if dequantize else torch.float32).float()
    assert torch.equal(model.get_submodule(layer).weight, exact)
    tolerance = 5e-3 if dequantize else RELATIVE_TOLERANCE
    assert relative_error(logits, runtime_logits(gptq_dir)) <= tolerance

    half = load_with_transformers(out, torch.float16, dequantize)
    with torch.inference_mode():
        half(IDS[:, :2])
    weight = half.get_submodule(layer).weight
    assert weight.dtype == torch.float16 and torch.equal(weight, gptq_weight(gptq_dir, layer, bits, torch.float16))


def test_2_4_pruned_model_exports_with_sparsity_metadata(tmp_path, smollm2_tokenizer, runtime_logits):
    gptq_dir = write_gptq(tmp_path / "gptq", smollm2_tokenizer, pattern="2:4")
    out = tmp_path / "ct"
    out.mkdir()
    facts = write_compressed_tensors_artifact(gptq_dir, out, progress=False)
    assert facts["format"] == "pack-quantized" and facts["bits"] == 4 and facts["sparsity_structure"] == "2:4"
    assert facts["weights_bytes"] == (out / "model.safetensors").stat().st_size
    config = json.loads((out / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    assert sparsity["global_sparsity"] == 0.5
    # What vLLM's CompressedTensorsConfig._parse_sparsity_config does with it:
    parsed = SparsityCompressionConfig.model_validate(sparsity)
    assert parsed.sparsity_structure == SparsityStructure.TWO_FOUR.value and parsed.format == "dense"
    assert config["compressor_sparsity"]["structure"] == "2:4"  # our own record stays

    weights = decompressed(out)
    assert len(weights) == 14
    for name, weight in weights.items():
        assert check_nm(weight != 0, 2, 4), name  # every 4 inputs keep at most 2
    model = load_with_transformers(out, torch.float32)
    with torch.inference_mode():
        logits = model(IDS).logits
    assert relative_error(logits, runtime_logits(gptq_dir)) <= RELATIVE_TOLERANCE
    assert check_nm(model.get_submodule("model.layers.0.self_attn.q_proj").weight != 0, 2, 4)


def test_float_linears_biases_and_an_untied_lm_head(tmp_path, smollm2_tokenizer, runtime_logits):
    gptq_dir = write_gptq(tmp_path / "gptq", smollm2_tokenizer, skip=("down_proj",), attention_bias=True,
                          tie_word_embeddings=False)  # fmt: skip
    out = export_compressed_tensors(gptq_dir, tmp_path / "ct", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    source, tensors = load_file(gptq_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for key in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(tensors[key], source[key])
    model = load_with_transformers(out, torch.float32)
    with torch.inference_mode():
        logits = model(IDS).logits
    assert relative_error(logits, runtime_logits(gptq_dir)) <= RELATIVE_TOLERANCE


def test_declared_sparsity_is_checked_against_the_weights(tmp_path, smollm2_tokenizer):
    gptq_dir = write_gptq(tmp_path / "gptq", smollm2_tokenizer)  # dense
    config = json.loads((gptq_dir / "config.json").read_text())
    config["compressor_sparsity"] = {"structure": "2:4", "method": "wanda", "global_sparsity": 0.5,
                                     "targets": ["q_proj"], "ignore": ["lm_head"]}  # fmt: skip
    (gptq_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError) as err:
        export_compressed_tensors(gptq_dir, tmp_path / "ct", progress=False)
    assert "q_proj: config.json declares 2:4 sparsity but the weights are not" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "ct").exists()


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_refusals_are_one_line_errors(tmp_path, smollm2_tokenizer, tiny_llama_dir):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(UserError) as err:
        export_compressed_tensors(file, tmp_path / "a")
    assert "not a directory" in one_line(err)
    with pytest.raises(UserError) as err:
        export_compressed_tensors(tiny_llama_dir, tmp_path / "a")  # a dense transformers directory
    assert "not a GPTQ artifact" in one_line(err)

    gptq_dir = write_tiny_gptq_artifact(tmp_path / "w3", smollm2_tokenizer, bits=3)
    with pytest.raises(UserError) as err:
        export_compressed_tensors(gptq_dir, gptq_dir)
    assert "is the input artifact" in one_line(err)
    with pytest.raises(UserError) as err:
        export_compressed_tensors(gptq_dir, tmp_path / "a")
    assert "3-bit weights cannot be exported as compressed-tensors: supported bits are 4 and 8" in one_line(err)
    assert not (tmp_path / "a").exists()


def test_permuted_g_idx_is_refused_naming_the_recipe_option(tmp_path, smollm2_tokenizer):
    gptq_dir = write_gptq(tmp_path / "gptq", smollm2_tokenizer)
    tensors = load_file(gptq_dir / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.g_idx"
    tensors[name] = tensors[name][torch.randperm(64, generator=torch.Generator().manual_seed(0))].contiguous()
    save_file(tensors, gptq_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        export_compressed_tensors(gptq_dir, tmp_path / "ct")
    text = one_line(err)
    assert "model.layers.0.mlp.up_proj" in text and "permuted g_idx" in text and RECIPE_FIX in text
    assert RECIPE_FIX == "stages[i].quantize.static_groups: true"


def test_missing_package_is_a_one_line_error(tmp_path, smollm2_tokenizer, monkeypatch):
    gptq_dir = write_tiny_gptq_artifact(tmp_path / "gptq", smollm2_tokenizer)
    monkeypatch.setitem(__import__("sys").modules, "compressed_tensors", None)
    with pytest.raises(UserError) as err:
        export_compressed_tensors(gptq_dir, tmp_path / "ct")
    assert "pip install 'compressed-tensors>=0.20'" in one_line(err)


def test_convert_checkpoint_dir_deletes_the_gptq_copy(tmp_path, smollm2_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    facts = convert_checkpoint_dir(lambda d: write_gptq(d, smollm2_tokenizer, bits=8), out, progress=False)
    assert facts["bits"] == 8 and facts["gptq_weights_bytes"] > 0 and facts["weights_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary GPTQ directory is gone
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    shutil.rmtree(out)


def test_recipe_exports_compressed_tensors_and_validate_refuses_what_it_cannot_hold(tmp_path, tiny_llama_dir):
    from test_cli import write_recipe

    from conftest import assert_user_error, invoke

    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    write_recipe(recipe, tiny_llama_dir, out)
    fmt = "export.format=compressed-tensors"
    assert_user_error(invoke("validate", recipe, "--set", fmt, "--set", "stages[0].quantize.bits=3"), "compressed-tensors", "bits 4 and 8")
    assert_user_error(invoke("validate", recipe, "--set", fmt, "--set", "stages[0].quantize.static_groups=false"),
                      "stages[0].quantize.static_groups: true")  # fmt: skip
    result = invoke("run", recipe, "--set", fmt, "--no-progress")
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert verify_manifest(out) is True
    report = json.loads((out / "report.json").read_text())
    assert report["size"]["compressed_tensors_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    info = invoke("info", out)
    assert info.exit_code == 0 and "llama compressed-tensors artifact (pack-quantized, 4-bit, group size 32, symmetric)" in info.stdout
