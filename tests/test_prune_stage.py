"""The prune stage in recipes and the pipeline (the algorithms themselves: test_pruning.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compressor import runtime
from compressor.algorithms.pruning import check_nm
from compressor.errors import RecipeError
from compressor.packing import unpack_gptq_v1
from compressor.pipeline import run, validate
from compressor.recipe import load_recipe


def _recipe(tiny_llama_dir, tmp_path, stages: str, *extra: str):
    return load_recipe(None, [
        f"model={tiny_llama_dir}",
        "data.calibration={samples: 4, seq_len: 64}",
        "data.evaluation={seq_len: 128, max_windows: 2}",
        f"stages={stages}",
        f"output={tmp_path / 'out'}",
        *extra,
    ])  # fmt: skip


def _packed(out, name):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    return unpack_gptq_v1(**t, bits=4).dequantize()


@pytest.mark.parametrize(
    "stages, path, fragment",
    [
        ("[{prune: {method: wanda, sparsity: 1.2}}]", "stages[0].prune.sparsity", "less than 1"),
        ('[{prune: {method: wanda, pattern: "3:2"}}]', "stages[0].prune.pattern", "0 < N < M"),
        ('[{prune: {method: wanda, sparsity: 0.6, pattern: "2:4"}}]', "stages[0].prune", "means sparsity 0.5"),
        ("[{prune: {method: sparsegpt}}]", "stages[0].prune", "needs `sparsity` or an N:M `pattern`"),
        ("[{prune: {method: structured, target: layers, ratio: 0.5}}]", "stages[0].prune", "needs `count`"),
        ("[{prune: {method: wanda, sparsity: 0.5, joint_quantize: true}}]", "stages[0].prune", "needs method: sparsegpt"),
    ],
)
def test_bad_prune_options_are_one_line_errors(stages, path, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [f"stages={stages}"])
    assert err.value.path == path and fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "stages, extra, path",
    [
        ("[{prune: {method: sparsegpt, sparsity: 0.5, joint_quantize: true}}]", ["export.format=dense"], "stages[0].prune.joint_quantize"),
        ("[{quantize: {group_size: 32}}, {prune: {method: wanda, sparsity: 0.5}}]", [], "stages[1]"),
        ('[{prune: {method: wanda, pattern: "3:5"}}]', ["export.format=dense"], "stages[0].prune.pattern"),
        ("[{prune: {method: wanda, sparsity: 0.5}}]", [], "export.format"),
    ],
)
def test_stage_order_and_shape_checks(tiny_llama_dir, tmp_path, stages, extra, path):
    with pytest.raises(RecipeError) as err:
        validate(_recipe(tiny_llama_dir, tmp_path, stages, *extra))
    assert err.value.path == path


def test_pruned_zeros_survive_gptq_and_packing(tiny_llama_dir, tmp_path):
    r = _recipe(tiny_llama_dir, tmp_path, "[{prune: {method: sparsegpt, sparsity: 0.5}}, {quantize: {group_size: 32}}]")
    result = run(r, progress=False)
    rep = result.report
    prune_layers = rep.stages[0].layers
    assert len(prune_layers) == 14 and all(abs(v["sparsity"] - 0.5) < 1e-9 for v in prune_layers.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        packed = _packed(result.output, name)
        # every weight pruned before GPTQ is still exactly zero in the artifact
        assert (packed == 0).float().mean() >= 0.5
        assert torch.equal(packed, result.model.get_submodule(name).weight)
    cfg = json.loads((result.output / "config.json").read_text())
    assert cfg["compressor_sparsity"]["structure"] == "unstructured"
    assert abs(cfg["compressor_sparsity"]["global_sparsity"] - 0.5) < 1e-6
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert "## Sparsity" in (result.output / "report.md").read_text()


def test_joint_sparsegpt_gptq_keeps_2_4_in_the_artifact(tiny_llama_dir, tmp_path):
    r = _recipe(tiny_llama_dir, tmp_path, '[{prune: {method: sparsegpt, pattern: "2:4", joint_quantize: true}}, {quantize: {group_size: 32}}]')
    result = run(r, progress=False)
    assert result.report.stages[1].fused_into == "stages[0]"
    assert "| in stages[0] | in stages[0] |" in (result.output / "report.md").read_text()  # not counted twice
    qc = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert qc["static_groups"] is True and qc["desc_act"] is False
    for block in range(2):
        for rel in ("self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{block}.{rel}"
            packed = _packed(result.output, name)
            assert check_nm(packed != 0, 2, 4)
            assert torch.equal(packed, result.model.get_submodule(name).weight)
    loaded = runtime.load(result.output, cache_dequantized=True)  # the float model: bit for bit
    ids = torch.randint(0, 49152, (1, 32))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def test_dense_export_loads_with_plain_transformers(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = _recipe(
        tiny_llama_dir, tmp_path, "[{prune: {method: wanda, sparsity: 0.5, layer_sparsity: {'*.down_proj': 0.25}}}]",
        "export.format=dense",
    )  # fmt: skip
    result = run(r, progress=False)
    layers = result.report.stages[0].layers
    assert layers["model.layers.0.mlp.down_proj"]["sparsity"] == 0.25
    assert layers["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5
    cfg = json.loads((result.output / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["compressor_sparsity"]["method"] == "wanda"
    plain = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)
    assert (plain.model.layers[1].mlp.up_proj.weight == 0).float().mean() == 0.5
    ids = torch.randint(0, 49152, (1, 32))
    with torch.inference_mode():
        a, b = plain(ids).logits, result.model(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_sweep_writes_json_and_plot(tiny_llama_dir, tmp_path):
    from compressor.sweep import sweep

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\n"
        "data: {calibration: {samples: 4, seq_len: 64}, evaluation: {seq_len: 128, max_windows: 2}}\n"
        "stages: [{prune: {method: magnitude, sparsity: 0.5}}]\nexport: {format: dense}\n"
    )
    summary = sweep(recipe, "stages[0].prune.sparsity", [0.1, 0.6], tmp_path / "sw", progress=False)
    ppl = [p["perplexity"] for p in summary["points"]]
    assert [round(p["sparsity"], 2) for p in summary["points"]] == [0.1, 0.6]
    assert ppl[0] != ppl[1] and all((tmp_path / "sw" / f"sparsity={v}" / "report.json").exists() for v in (0.1, 0.6))
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["dense"]["perplexity"] > 0


def test_semi_structured_runtime_refuses_without_a_capable_gpu():
    from compressor.errors import UserError
    from compressor.runtime.sparse import semi_structured_supported, sparsify_2_4_

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert not semi_structured_supported(torch.device("cpu"))
    with pytest.raises(UserError, match="compute capability >= 8.0"):
        sparsify_2_4_(model)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs an sm_80+ GPU")
def test_semi_structured_matches_dense_on_gpu():
    from compressor.algorithms.pruning import magnitude_prune
    from compressor.runtime.sparse import sparsify_2_4_

    lin = torch.nn.Linear(256, 128, bias=False)
    lin.weight.data = magnitude_prune(lin.weight.data, pattern="2:4").weight
    model = torch.nn.Sequential(lin).half().cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    ref = model(x)
    assert sparsify_2_4_(model) == ["0"]
    torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)
