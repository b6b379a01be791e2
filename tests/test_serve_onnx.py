"""`compress serve --backend onnx`: the engine running an ONNX artifact with onnxruntime.

A tiny GPTQ artifact is exported to ONNX; greedy completions served from the ONNX artifact must
equal generate() of the GPTQ artifact in torch and OnnxCausalLM.generate of the ONNX one, alone
and in batches of different prompt lengths (each row then has entries of the shared past that
are not its own, masked key by key), with chunked prefill and with an ONNX draft.
"""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest
import torch
from click.testing import CliRunner

from compressor import runtime
from compressor.algorithms.quant import rtn_quantize
from compressor.cli import main
from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint
from compressor.export.onnx import export_onnx
from compressor.runtime import onnx as onnx_runtime
from compressor.serve import build, load_for_serving
from compressor.serve.engine import Engine, EngineConfig
from compressor.serve.onnx_backend import OnnxModel
from compressor.serve.sampling import SamplingParams
from conftest import make_tiny_llama
from test_serve import ServerThread

NAME = "tiny-onnx"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "Once upon a time there was a", "import numpy as np\n", "1, 2, 3,", "Hello"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, smollm2_tokenizer):
    """(GPTQ artifact, its ONNX export) of a tiny random Llama, RTN-quantized to 4 bits."""
    model = make_tiny_llama(initializer_range=0.3)
    quantized = {}
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(linear.weight, 4, 32, True)
            linear.weight.data = quantized[name].dequantize()
    root = tmp_path_factory.mktemp("serve-onnx")
    gptq = root / "tiny-gptq"
    gptq.mkdir()
    write_gptq_checkpoint(gptq, model, quantized, gptq_quantization_config(4, 32, True, False, False, 0.01, True), tokenizer=smollm2_tokenizer)
    return gptq, export_onnx(gptq, root / NAME, progress=False)


@pytest.fixture(scope="module")
def served(artifacts):
    """(server, engine) for the ONNX artifact, picked by --backend auto: 4 slots, 256 tokens of context."""
    app, engine = build(str(artifacts[1]), device="cpu", max_model_len=256, max_batch_size=4, prefill_chunk=32)
    assert isinstance(engine.target, OnnxModel)
    server = ServerThread(app)
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def reference(artifacts):
    """Greedy token ids of `text` from torch generate() (GPTQ artifact), checked equal to OnnxCausalLM.generate."""
    gptq, onnx_dir = artifacts
    torch_model, tokenizer = runtime.load(gptq), runtime.load_tokenizer(gptq)
    onnx_model = onnx_runtime.load(onnx_dir)

    def complete(ids: list[int], max_tokens: int) -> list[int]:
        out = torch_model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
        tokens = out[0, len(ids) :].tolist()
        assert onnx_model.generate([ids], max_tokens)[0, len(ids) :].tolist() == tokens
        return tokens

    complete.tokenizer = tokenizer
    complete.text = lambda prompt, max_tokens: tokenizer.decode(complete(tokenizer(prompt).input_ids, max_tokens), skip_special_tokens=True)
    return complete


def client_for(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_equals_torch_and_onnx_generate(served, reference):
    for prompt in PROMPTS[:3]:
        r = client_for(served[0]).completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == reference.text(prompt, 16), prompt


def test_concurrent_requests_of_different_lengths(served, reference):
    """12 requests at once on 4 slots: rows of different lengths share every prefill and decode step."""
    server, engine = served
    steps_before = engine.steps

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            jobs = [c.completions.create(model=NAME, prompt=PROMPTS[i % 6], max_tokens=6 + 2 * i, temperature=0) for i in range(12)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for i, r in enumerate(results):
        assert r.choices[0].text == reference.text(PROMPTS[i % 6], 6 + 2 * i), i
    generated = sum(6 + 2 * i for i in range(12))
    assert engine.steps - steps_before < generated / 2, "requests did not share steps"


def test_streaming(served, reference):
    client = client_for(served[0])
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 5 and "".join(texts) == reference.text(PROMPTS[2], 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def run_concurrently(engine, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    results = [None] * len(prompts)

    def one(i):
        results[i] = engine.generate(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0))[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("draft", [False, True], ids=["plain", "draft"])
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_chunked_prefill_and_draft(artifacts, reference, backend, draft):
    """Prompts read 3 tokens per step (several rows per prefill, mid-prompt starts) while others decode;
    with the model as its own draft, every proposal is accepted and the output is unchanged. The torch
    backend (the GPTQ artifact) gives the same tokens as the onnx one."""
    model, tokenizer = load_for_serving(str(artifacts[backend == "onnx"]), "cpu", backend=backend)
    config = EngineConfig(max_model_len=128, max_batch_size=3, prefill_chunk=3, num_speculative_tokens=3)
    engine = Engine(model, tokenizer, config, draft=model if draft else None).start()
    try:
        prompts = [tokenizer(p).input_ids for p in PROMPTS[:5]]
        max_tokens = [5, 12, 8, 3, 10]
        results = run_concurrently(engine, prompts, max_tokens)
    finally:
        engine.shutdown(10)
    assert all(len(r) == n for r, n in zip(results, max_tokens))  # random weights: no early eos here
    for ids, n, got in zip(prompts, max_tokens, results):
        assert got == reference(ids, n)
    if draft:
        assert engine.spec_proposed > 0 and engine.spec_accepted == engine.spec_proposed


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_backend_errors(artifacts):
    gptq, onnx_dir = artifacts

    def serve(*args):
        return CliRunner().invoke(main, ["serve", *map(str, args), "--port", "0", "--device", "cpu"])

    assert_user_error(serve(gptq, "--backend", "onnx"), str(gptq), "not an ONNX artifact", f"compress export {gptq} --format onnx --output DIR")
    assert_user_error(serve(onnx_dir, "--backend", "torch"), str(onnx_dir), "an ONNX artifact runs only on the onnx backend")
    assert_user_error(serve(onnx_dir, "--draft", gptq), f"--draft {gptq}: not an ONNX artifact")
    assert_user_error(serve(gptq, "--draft", onnx_dir), f"--draft {onnx_dir}: an ONNX artifact runs only on the onnx backend")
    bad = serve(onnx_dir, "--backend", "gpu")  # click's own choice check
    assert bad.exit_code == 2 and "'gpu' is not one of 'auto', 'torch', 'onnx'" in bad.stderr, bad.stderr
