"""`compress serve --backend onnx`: the engine running an ONNX artifact with onnxruntime.

A tiny GPTQ artifact is exported to ONNX; greedy completions served from the ONNX artifact must
equal generate() of the GPTQ artifact in torch and OnnxCausalLM.generate of the ONNX one, alone
and in batches of different prompt lengths (each row then has entries of the shared past that
are not its own, masked key by key), with chunked prefill and with an ONNX draft.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from compressor import runtime
from compressor.export.onnx import export_onnx
from compressor.runtime import onnx as onnx_runtime
from compressor.serve import engine as engine_module
from compressor.serve import build, load_for_serving
from compressor.serve.engine import Engine, EngineConfig
from compressor.serve.onnx_backend import OnnxModel
from compressor.serve.sampling import SamplingParams
from conftest import assert_user_error, invoke, write_tiny_gptq_artifact
from test_serve import ServerThread
from test_serve_engine import run_concurrently

NAME = "tiny-onnx"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "Once upon a time there was a", "import numpy as np\n", "1, 2, 3,", "Hello"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, smollm2_tokenizer):
    """(GPTQ artifact, its ONNX export) of a tiny random Llama, RTN-quantized to 4 bits."""
    root = tmp_path_factory.mktemp("serve-onnx")
    gptq = write_tiny_gptq_artifact(root / "tiny-gptq", smollm2_tokenizer)
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
        requests = [(ids, SamplingParams(max_tokens=n, temperature=0)) for ids, n in zip(prompts, max_tokens)]
        results = [tokens for tokens, _, _ in run_concurrently(engine, requests)]
    finally:
        engine.shutdown(10)
    assert all(len(r) == n for r, n in zip(results, max_tokens))  # random weights: no early eos here
    for ids, n, got in zip(prompts, max_tokens, results):
        assert got == reference(ids, n)
    if draft:
        assert engine.spec_proposed > 0 and engine.spec_accepted == engine.spec_proposed


def test_one_bad_request_fails_alone(served, monkeypatch):
    """Issue 16 on this backend: a top_k past int64 gets 400 before the engine, an (injected)
    sampling failure fails only its own request, and a request decoding meanwhile completes."""
    real = engine_module.sample

    def sample_or_fail(logits, params, generators):
        if any(p.seed == 1313 for p in params):
            raise RuntimeError("injected sampling failure")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_module, "sample", sample_or_fail)
    url = served[0].url + "/v1/completions"
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as running:
        lines = running.iter_lines()
        seen = [next(line for line in lines if line.startswith("data: "))]
        r = httpx.post(url, json={"model": NAME, "prompt": "Hi", "max_tokens": 4, "top_k": 2**63}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
        r = httpx.post(url, json={"model": NAME, "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, "seed": 1313}, timeout=60)
        assert r.status_code == 500 and "injected sampling failure" in r.json()["error"]["message"], r.text
        seen += list(lines)
    chunks = [json.loads(line[6:]) for line in seen if line.startswith("data: {")]
    assert not any("error" in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) for c in chunks) > 0


def test_backend_errors(artifacts):
    gptq, onnx_dir = artifacts

    def serve(*args):
        return invoke("serve", *args, "--port", "0", "--device", "cpu")

    assert_user_error(serve(gptq, "--backend", "onnx"), str(gptq), "not an ONNX artifact", f"compress export {gptq} --format onnx --output DIR")
    assert_user_error(serve(onnx_dir, "--backend", "torch"), str(onnx_dir), "an ONNX artifact runs only on the onnx backend")
    assert_user_error(serve(onnx_dir, "--draft", gptq), f"--draft {gptq}: not an ONNX artifact")
    assert_user_error(serve(gptq, "--draft", onnx_dir), f"--draft {onnx_dir}: an ONNX artifact runs only on the onnx backend")
    bad = serve(onnx_dir, "--backend", "gpu")  # click's own choice check
    assert bad.exit_code == 2 and "'gpu' is not one of 'auto', 'torch', 'onnx'" in bad.stderr, bad.stderr
