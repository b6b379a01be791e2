"""`compress serve` over HTTP, with the `openai` package as the client, against real servers on
localhost: a tiny GPTQ artifact (loaded through compressor.runtime) in a uvicorn thread for most
tests, and `compress serve` as a subprocess for SIGTERM.

Greedy outputs are compared with `generate()` of the same loaded artifact, one at a time and in
a concurrent batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner

from compressor import runtime
from compressor.cli import main
from compressor.serve import build
from compressor.serve.api import create_app
from compressor.serve.engine import Engine, EngineConfig
from compressor.serve.metrics import ServeMetrics
from conftest import write_tiny_gptq_artifact

NAME = "tiny-gptq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a free localhost port in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2_tokenizer):
    """A 4-bit GPTQ artifact of a tiny random Llama (RTN-quantized: export and load are what matter here)."""
    return write_tiny_gptq_artifact(tmp_path_factory.mktemp("serve") / NAME, smollm2_tokenizer)


@pytest.fixture(scope="module")
def served(artifact):
    """(server, engine) for the artifact: 4 slots, 256 tokens of context."""
    app, engine = build(str(artifact), device="cpu", max_model_len=256, max_batch_size=4, prefill_chunk=32)
    server = ServerThread(app)
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def reference(artifact):
    """generate() of the same artifact, loaded the same way, greedy."""
    model, tokenizer = runtime.load(artifact), runtime.load_tokenizer(artifact)

    def complete(text: str, max_tokens: int, chat: bool = False) -> str:
        ids = tokenizer(text, add_special_tokens=not chat).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    complete.tokenizer = tokenizer
    return complete


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


PROMPTS = ["def fibonacci(n):", "The capital of France is", "Once upon a time", "import numpy as np\n", "1, 2, 3,", "Hello"]


# ------------------------------------------------------------------ completions and chat
def test_completion_equals_generate(client, reference):
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == reference(PROMPTS[0], 24)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(reference.tokenizer(PROMPTS[0]).input_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)


def test_concurrent_requests_equal_generate(served, reference):
    """12 clients at once on 4 slots: requests wait, join the running batch, and leave it."""
    server, _ = served
    before = metric(server, "compressor_decode_batch_size_count"), metric(server, "compressor_decode_batch_size_sum")

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            jobs = [c.completions.create(model=NAME, prompt=PROMPTS[i % 6], max_tokens=10 + 3 * i, temperature=0) for i in range(12)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for i, r in enumerate(results):
        assert r.choices[0].text == reference(PROMPTS[i % 6], 10 + 3 * i), i
    steps = metric(server, "compressor_decode_batch_size_count") - before[0]
    rows = metric(server, "compressor_decode_batch_size_sum") - before[1]
    assert rows / steps > 2, "requests did not share decode steps"


def test_chat_uses_the_chat_template(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(prompt, 16, chat=True)
    assert r.usage.prompt_tokens == len(reference.tokenizer(prompt, add_special_tokens=False).input_ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "prime number."}]}]
    r2 = client.chat.completions.create(model=NAME, messages=parts, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Name a prime number."}], max_tokens=16, temperature=0)
    assert r2.choices[0].message.content == plain.choices[0].message.content


# ------------------------------------------------------------------ streaming
def test_streaming_completion(client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    stream = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 5 and "".join(texts) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "Count to five."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format(served):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", served[0].url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        json.loads(event[len("data: ") :])


# ------------------------------------------------------------------ sampling
def test_stop_strings(client):
    text = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_sampling_parameters(client):
    def complete(**kw):
        return client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=12, **kw).choices[0].text

    greedy = complete(temperature=0)
    assert complete(temperature=1.3, extra_body={"top_k": 1}) == greedy  # top_k is not in the SDK's signature
    assert complete(temperature=1.0, top_p=1e-9) == greedy
    a = complete(temperature=1.0, seed=123, extra_body={"ignore_eos": True})
    assert a == complete(temperature=1.0, seed=123, extra_body={"ignore_eos": True})
    assert a != complete(temperature=1.0, seed=124, extra_body={"ignore_eos": True})


# ------------------------------------------------------------------ models, health, metrics
def test_models_health_metrics(client, served):
    server, _ = served
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    before = metric(server, "compressor_generation_tokens_total")
    client.completions.create(model=NAME, prompt="Hi", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ("compressor_requests_total", "compressor_queue_depth", "compressor_running_sequences", "compressor_decode_batch_size_bucket",
                 "compressor_time_to_first_token_seconds_bucket", "compressor_inter_token_latency_seconds_bucket",
                 "compressor_prompt_tokens_total", "compressor_spec_acceptance_rate"):  # fmt: skip
        assert name in text, name
    assert metric(server, "compressor_generation_tokens_total") == before + 7
    assert metric(server, "compressor_requests_total", endpoint="/v1/completions", status="200") >= 1


# ------------------------------------------------------------------ errors
def error_of(server, body, path="/v1/completions", raw: bytes | None = None):
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}) if raw is not None else httpx.post(server.url + path, json=body)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return r.status_code, error


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"model": NAME, "prompt": "x", "max_tokens": -5}, "max_tokens", "at least 1"),
        ({"model": NAME, "prompt": "x", "max_tokens": 10**9}, "max_tokens", "exceeds this server's limit"),
        ({"model": NAME, "prompt": "x", "max_tokens": "ten"}, "max_tokens", "valid integer"),
        ({"model": NAME, "prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
        ({"model": NAME, "prompt": "x", "temperature": 9.0}, "temperature", "less than or equal to 2"),
        ({"model": NAME, "prompt": 42}, "prompt", "valid string"),
        ({"model": NAME}, "prompt", "Field required"),
        ({"model": NAME, "prompt": "x", "n": 2}, "n", "less than or equal to 1"),
        ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"model": NAME, "prompt": ""}, "prompt", "empty"),
        ({"model": NAME, "prompt": [1, 2, 10**7]}, "prompt", "token ids must lie"),
    ],
)
def test_bad_requests_get_400(served, body, param, fragment):
    status, error = error_of(served[0], body)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param) and fragment in error["message"], error


def test_malformed_json_unknown_model_and_context(client, served):
    server, _ = served
    status, error = error_of(server, None, raw=b'{"model": "tiny-gptq", "prompt": ')
    assert status == 400 and "not valid JSON" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "gpt-4" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="word " * 300, max_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="word " * 200, max_tokens=100)
    assert info.value.body["code"] == "context_length_exceeded" and "256" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
    assert info.value.body["param"].startswith("messages")
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_overload_gets_429_and_shutdown_503(artifact, smollm2_tokenizer):
    """An engine that never runs (thread not started) makes the queue fill deterministically."""
    model = runtime.load(artifact)
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64, max_queue=1))
    server = ServerThread(create_app(engine, smollm2_tokenizer, NAME, ServeMetrics()))
    try:
        body = {"model": NAME, "prompt": "Hi", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as waiting:
            assert waiting.status_code == 200  # queued
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=10)
            with pytest.raises(openai.RateLimitError) as info:
                c.completions.create(model=NAME, prompt="Hi", max_tokens=4)
            assert info.value.response.headers["retry-after"] == "1"
            engine.drain()
            with pytest.raises(openai.InternalServerError) as info:
                c.completions.create(model=NAME, prompt="Hi", max_tokens=4)
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
            assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.stop()


def test_disconnect_mid_stream_frees_the_slot(served):
    server, engine = served
    aborted = metric(server, "compressor_sequences_finished_total", reason="abort")
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10
    while (engine.running or metric(server, "compressor_sequences_finished_total", reason="abort") == aborted) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    assert metric(server, "compressor_sequences_finished_total", reason="abort") == aborted + 1


# ------------------------------------------------------------------ speculative, CLI, SIGTERM
def test_speculative_server_matches_and_reports_acceptance(artifact):
    app, _ = build(str(artifact), device="cpu", draft=str(artifact), num_speculative_tokens=3, max_model_len=128)
    server = ServerThread(app)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        spec = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0).choices[0].text
        assert metric(server, "compressor_spec_acceptance_rate") == 1.0  # the draft is the model itself
        assert metric(server, "compressor_spec_proposed_tokens_total") > 0
    finally:
        server.stop()
    plain = runtime.load(artifact)
    ids = runtime.load_tokenizer(artifact)(PROMPTS[0]).input_ids
    out = plain.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=2)
    assert spec == runtime.load_tokenizer(artifact).decode(out[0, len(ids) :], skip_special_tokens=True)


def test_cli_refuses_a_busy_port(artifact):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(artifact), "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --host 127.0.0.1 --port") and "cannot listen" in result.stderr


def test_sigterm_drains_in_flight_requests(artifact):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", "serve", str(artifact), "--port", str(port), "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.poll() is not None else "no start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": NAME, "prompt": "Hi", "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and len(pieces) == 0:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                pieces.append(line)
        chunks = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")]
        assert [p for p in pieces if p][-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        started = time.time()
        assert proc.wait(30) == 0, proc.stdout.read().decode()
        assert time.time() - started < 10
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
