"""Hostile and careless requests against `compress serve` (issue 16): one request must never fail
or stall the others.

Against a real `compress serve` subprocess (default --max-request-bytes): numbers past int64 and
lone surrogates get 400 while a concurrent request completes, a body over the limit gets 413
(with and without Content-Length), /health answers while a large prompt is tokenized, and a
seeded fuzz of every endpoint with JSON of right and wrong shapes gets no 5xx. In-process, with a
failure injected into one sequence (sampling, stop strings, its forward), only that sequence's
request fails and the engine goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import compressor.serve.engine as engine_module
from compressor.serve.api import DEFAULT_MAX_REQUEST_BYTES, create_app
from compressor.serve.engine import Engine, EngineConfig, RequestRejected
from compressor.serve.metrics import ServeMetrics
from compressor.serve.sampling import SamplingParams, sample
from compressor.serve.text import StopStringFilter
from conftest import assert_user_error, invoke, make_tiny_llama, write_tiny_gptq_artifact
from test_serve import ServerThread, free_port
from test_serve_engine import prompts, reference

NAME = "tiny-gptq"
LIMIT = 2 * 2**20  # `compress serve`'s default --max-request-bytes
GOOD = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0}
POISON = 1313  # the seed of a request whose sampling the injected failure hits


# ------------------------------------------------------------------ a `compress serve` subprocess
@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2_tokenizer):
    return write_tiny_gptq_artifact(tmp_path_factory.mktemp("hardening") / NAME, smollm2_tokenizer)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """The URL of `compress serve ARTIFACT` (4 slots, 256 tokens of context, default body limit)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("hardening-log") / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads: tracebacks must not block the server
        proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", "serve", str(artifact), "--port", str(port), "--device", "cpu",
                                 "--max-model-len", "256", "--max-batch-size", "4", "--prefill-chunk", "32"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()  # nothing failed inside the server


def post(url: str, path: str, body=None, raw: bytes | None = None, **kw) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()  # ensure_ascii: "\ud800" goes as the escape
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def error_of(r: httpx.Response) -> dict:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def sse_events(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# ------------------------------------------------------------------ numbers past what torch takes
def test_huge_top_k_is_400_and_a_concurrent_request_completes(server):
    """top_k 2**63 used to pass validation and overflow in the shared sampling step, failing every request in it."""
    body = {**GOOD, "prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()
        seen = [next(line for line in lines if line.startswith("data: "))]  # decoding now: a bad request would share its steps
        for path, bad in [("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 4, "top_k": 2**63}),
                          ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "top_k": 2**64})]:  # fmt: skip
            r = post(server, path, bad)
            assert r.status_code == 400 and error_of(r)["param"] == "top_k", r.text
        seen += list(lines)
    events = sse_events(seen)
    assert not any("error" in e for e in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and [line for line in seen if line][-1] == "data: [DONE]"


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
def test_seed_outside_int64_is_400(server, seed):
    r = post(server, "/v1/completions", {**GOOD, "temperature": 1.0, "seed": seed})
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == "seed" and ("less than or equal" in error["message"] or "greater than or equal" in error["message"])


def test_the_int64_bounds_themselves_are_served(server):
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"top_k": 2**63 - 1}, {"temperature": 1e-320}):
        r = post(server, "/v1/completions", {**GOOD, "temperature": 1.0, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, (extra, r.text)


# ------------------------------------------------------------------ text that is not UTF-8
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {**GOOD, "prompt": "hi \ud800 there"}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": ["\udfff"]}, "prompt"),
        ("/v1/completions", {**GOOD, "stop": ["ok", "\ud800"]}, "stop"),
        ("/v1/completions", {**GOOD, "model": "\ud800"}, "model"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
         "messages.0.content"),
    ],
)  # fmt: skip
def test_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw or b"\\udfff" in raw  # sent as JSON's escape, the only way a surrogate gets in
    r = post(server, path, raw=raw)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"].startswith(param) and "not valid UTF-8" in error["message"] and "lone surrogate" in error["message"], error


# ------------------------------------------------------------------ large bodies
def test_body_over_the_limit_is_413_with_and_without_content_length(server):
    raw = json.dumps({**GOOD, "prompt": "a" * LIMIT}).encode()
    r = post(server, "/v1/completions", raw=raw)
    assert r.request.headers["content-length"] == str(len(raw))
    assert r.status_code == 413, r.text
    error = error_of(r)
    assert error["code"] == "request_too_large" and f"({len(raw)} bytes)" in error["message"] and str(LIMIT) in error["message"]

    def chunks(data: bytes, size: int = 65536):
        for i in range(0, len(data), size):
            yield data[i : i + size]

    r = httpx.post(server + "/v1/completions", content=chunks(raw), headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large", r.text
    # a chunked body under the limit reaches the app whole
    small = json.dumps(GOOD).encode()
    r = httpx.post(server + "/v1/completions", content=chunks(small, 7), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    assert httpx.get(server + "/health").status_code == 200
    counted = [line for line in httpx.get(server + "/metrics").text.splitlines()
               if line.startswith('compressor_requests_total{endpoint="/v1/completions",status="413"} ')]  # fmt: skip
    assert counted and float(counted[0].split()[-1]) >= 2, counted


def test_health_answers_while_a_large_prompt_is_tokenized(server):
    """A prompt just under the limit takes ~2 s to tokenize; that must not stall the event loop."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=LIMIT // 5))  # words of 5.5 letters on average and a space: past LIMIT
    raw = json.dumps({**GOOD, "prompt": text[: LIMIT - 200]}).encode()
    assert LIMIT - 300 < len(raw) <= LIMIT
    result = {}

    def big() -> None:
        started = time.perf_counter()
        r = post(server, "/v1/completions", raw=raw)
        result.update(status=r.status_code, code=r.json()["error"]["code"], seconds=time.perf_counter() - started)

    sender = threading.Thread(target=big)
    sender.start()
    latencies = []
    while sender.is_alive():
        started = time.perf_counter()
        assert httpx.get(server + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    sender.join()
    assert result["status"] == 400 and result["code"] == "context_length_exceeded", result  # read and tokenized, then refused
    assert len(latencies) >= 5, (result, latencies)  # it took long enough for the check below to mean something
    assert max(latencies) < 1.0, (result, max(latencies))


# ------------------------------------------------------------------ fuzz
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed",
          "stream", "stream_options", "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "echo", "ignore_eos"]  # fmt: skip
ODD_INTS = [0, 1, -1, 7, 255, 256, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]
ODD_FLOATS = [0.0, 0.5, 1.0, 1.5, 2.0, -0.1, 2.0001, 1e-320, 1e-30, 1e308, math.nan, math.inf, -math.inf]
ODD_STRS = ["", "x", NAME, "Hello", "\ud800", "a\udfffb", "\x00", "héllo wörld ✓", "x" * 3000, "<|im_start|>", "{", "user"]


EDGES = {  # values at and past the edges of each field's type, drawn more often than anything at all
    **dict.fromkeys(["max_tokens", "max_completion_tokens", "top_k", "seed", "n"], ODD_INTS),
    **dict.fromkeys(["temperature", "top_p", "presence_penalty", "frequency_penalty"], [*ODD_FLOATS, 0, 1, -1]),
    **dict.fromkeys(["model", "stop"], [*ODD_STRS, ODD_STRS[:5], ["\ud800"]]),
    "prompt": [*ODD_STRS, ["\ud800"], [2**63], [-1], [49152], [0] * 300, []],
    "messages": [[{"role": "user", "content": s}] for s in ODD_STRS]
    + [[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], [{"role": "assistant"}], [{"role": "tool", "content": None}], []],
}  # fmt: skip


def field_value(rng: random.Random, key: str):
    return rng.choice(EDGES[key]) if key in EDGES and rng.random() < 0.7 else random_value(rng)


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([*ODD_INTS, rng.randint(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice(ODD_FLOATS)
    if kind == 4:
        return rng.choice(ODD_STRS)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice([*FIELDS, "role", "content", "type", "text", "\ud800"]): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def right_shape(rng: random.Random, path: str) -> dict:
    """A valid request, its optional fields drawn at random."""
    if path == "/v1/completions":
        body = {"model": NAME, "prompt": rng.choice(["Hello", "def f(x):", [1, 2, 3], ["Once upon"], "✓ héllo"]), "max_tokens": rng.randint(1, 8)}
    else:
        content = rng.choice(["Name a prime.", [{"type": "text", "text": "Name "}, {"type": "text", "text": "a prime."}]])
        body = {"model": NAME, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}][rng.randrange(2) :],
                rng.choice(["max_tokens", "max_completion_tokens"]): rng.randint(1, 8)}  # fmt: skip
    options = {
        "temperature": [0.0, 0.7, 2.0, 1e-320], "top_p": [1.0, 0.9, 1e-9], "top_k": [-1, 0, 1, 40, 2**63 - 1],
        "seed": [None, 0, 2**63 - 1, -(2**63)], "stop": [None, "\n", ["a", "b", "c", "d"]], "stream": [False, True],
        "ignore_eos": [False, True], "user": ["someone"], "n": [1], "presence_penalty": [0.0],
    }  # fmt: skip
    for key in rng.sample(sorted(options), rng.randrange(len(options))):
        body[key] = rng.choice(options[key])
    if body.get("stream") and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


def wrong_shape(rng: random.Random, path: str) -> dict:
    """A valid request with one to three fields replaced by random values, dropped, or added."""
    body = right_shape(rng, path)
    for _ in range(rng.randint(1, 3)):
        op, key = rng.randrange(4), rng.choice([*body, *FIELDS])
        if op <= 1:
            body[key] = field_value(rng, key)
        elif op == 2:
            body.pop(key, None)
        else:
            body[rng.choice(["extra", "best_of", "logit_bias", "suffix", "tools"])] = random_value(rng)
    return body


RAW_BODIES = [
    b"", b"{", b"[]", b"null", b"123", b'"text"', b"\xff\xfe{}", b'{"model": "tiny-gptq", "prompt": "\xff\xfe"}',
    b"[" * 50_000 + b"]" * 50_000, b'{"model": "tiny-gptq", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "tiny-gptq", "prompt": "x", "temperature": NaN}', b'{"model": "tiny-gptq", "prompt": "x", "top_p": -Infinity}',
    b'{"model": "tiny-gptq", "model": 5, "prompt": "x"}',
]  # fmt: skip


OTHER_ROUTES = [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models?limit=%ED%A0%80"), ("GET", "/v1/completions"),
                ("POST", "/health"), ("DELETE", "/v1/models"), ("GET", "/nothing/%ff")]  # fmt: skip


def fuzz_cases(rng: random.Random, count: int) -> list[tuple[str, str, bytes | None, dict, bool]]:
    """(method, path, body, headers, right shape) for `count` requests."""
    cases = []
    for _ in range(count):
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        roll = rng.random()
        headers = {"content-type": "application/json"}
        if roll < 0.25:
            cases.append(("POST", path, json.dumps(right_shape(rng, path)).encode(), headers, True))
        elif roll < 0.7:
            cases.append(("POST", path, json.dumps(wrong_shape(rng, path)).encode(), headers, False))
        elif roll < 0.78:
            cases.append(("POST", path, json.dumps(random_value(rng)).encode(), headers, False))
        elif roll < 0.88:
            cases.append(("POST", path, rng.choice(RAW_BODIES), rng.choice([headers, {"content-type": "text/plain"}, {}]), False))
        else:
            method, path = rng.choice(OTHER_ROUTES)
            body = json.dumps(random_value(rng)).encode() if method == "POST" else None
            cases.append((method, path, body, headers, method == "GET" and path in ("/v1/models", "/health", "/metrics")))
    return cases


def test_fuzz_the_http_api(server):
    """150 requests of right and wrong shapes, 8 at a time, among 10 greedy requests: no 5xx, the
    right shapes all served, the greedy ones all equal to the same request served alone."""
    rng = random.Random(16)
    expected = post(server, "/v1/completions", GOOD).json()["choices"][0]["text"]
    cases = fuzz_cases(rng, 150)
    good = [("POST", "/v1/completions", json.dumps(GOOD).encode(), {"content-type": "application/json"}, "good")] * 10
    jobs = cases + good
    rng.shuffle(jobs)

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, job):
        method, path, body, headers, _ = job
        async with gate:
            r = await client.request(method, path, content=body, headers=headers)
            return r.status_code, r.text

    async def run():
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(*(one(client, gate, job) for job in jobs))

    results = asyncio.run(run())
    for job, (status, text) in zip(jobs, results):
        method, path, body, _, kind = job
        where = (method, path, (body or b"")[:300], status, text[:300])
        assert status < 500, where
        if status >= 400:
            assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, where
        if kind:
            assert status == 200, where
        if status == 200 and path.startswith("/v1/") and "completions" in path:
            assert "server_error" not in text, where  # no error event in a stream either
        if kind == "good":
            assert json.loads(text)["choices"][0]["text"] == expected, where
    statuses = [status for status, _ in results]
    assert statuses.count(200) >= 40 and statuses.count(400) >= 40, sorted(set(statuses))  # both kinds were exercised
    deadline = time.time() + 10  # the last response can leave a moment before its sequence is retired
    while (health := httpx.get(server + "/health").json()) != {"status": "ok", "running": 0, "waiting": 0} and time.time() < deadline:
        time.sleep(0.05)
    assert health == {"status": "ok", "running": 0, "waiting": 0}


# ------------------------------------------------------------------ a failure inside one sequence
@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(initializer_range=0.3)


@pytest.fixture
def poisoned_sampling(monkeypatch):
    """Sampling raises for any batch holding a request seeded POISON (as a bad row would)."""
    real = engine_module.sample

    def sample_or_fail(logits, params, generators):
        if any(p.seed == POISON for p in params):
            raise RuntimeError("injected sampling failure")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_module, "sample", sample_or_fail)


def run_together(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Outputs per request, all submitted before the engine starts so they share every step."""
    outputs = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def sink(i):
        def take(out):
            outputs[i].append(out)
            if out.finish_reason:
                done[i].set()

        return take

    for i, (prompt, params) in enumerate(requests):
        engine.submit(prompt, params, sink(i))
    engine.start()
    try:
        for event in done:
            assert event.wait(60)
    finally:
        engine.shutdown(5)
    return outputs


def tokens_of(outputs) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


@pytest.mark.parametrize("speculative", [False, True])
def test_a_sampling_failure_fails_only_its_sequence(model, smollm2_tokenizer, poisoned_sampling, speculative):
    ps = prompts([5, 9, 14, 7], seed=3)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = [(ps[0], greedy), (ps[1], SamplingParams(max_tokens=12, temperature=1.0, seed=POISON)), (ps[2], greedy),
                (ps[3], SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True))]  # fmt: skip
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64, max_batch_size=4), draft=model if speculative else None)
    outputs = run_together(engine, requests)
    assert outputs[1][-1].finish_reason == "error" and "injected sampling failure" in outputs[1][-1].error
    for i in (0, 2):
        assert outputs[i][-1].finish_reason == "length" and tokens_of(outputs[i]) == reference(model, ps[i], 12)
    assert outputs[3][-1].finish_reason == "length" and len(tokens_of(outputs[3])) == 12


def test_a_stop_string_failure_fails_only_its_sequence(model, smollm2_tokenizer, monkeypatch):
    real = StopStringFilter.push

    def push_or_fail(self, piece):
        if "POISON" in self.stops:
            raise ValueError("injected stop-string failure")
        return real(self, piece)

    monkeypatch.setattr(StopStringFilter, "push", push_or_fail)
    ps = prompts([6, 11, 8], seed=4)
    requests = [(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=("POISON",) if i == 1 else ())) for i, p in enumerate(ps)]
    outputs = run_together(Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64, max_batch_size=4)), requests)
    assert outputs[1][-1].finish_reason == "error" and "injected stop-string failure" in outputs[1][-1].error
    for i in (0, 2):
        assert outputs[i][-1].finish_reason == "length" and tokens_of(outputs[i]) == reference(model, ps[i], 10)


def test_a_failed_forward_fails_its_sequences_and_the_engine_goes_on(model, smollm2_tokenizer, monkeypatch):
    """A prefill forward that raises fails the prompt it carried, not a sequence already decoding,
    and the next request is served."""
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=256, max_batch_size=4)).start()
    try:
        a_prompt, b_prompt, c_prompt = prompts([8, 12, 6], seed=5)
        a_out, a_started = [], threading.Event()
        a_done = threading.Event()

        def a_sink(out):
            a_out.append(out)
            a_started.set()
            if out.finish_reason:
                a_done.set()

        engine.submit(a_prompt, SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True), a_sink)
        assert a_started.wait(30)
        real = engine.target.hidden

        def hidden_or_fail(rows):
            if any(start == 0 for _, _, start in rows):  # a new prompt's first chunk
                raise RuntimeError("injected forward failure")
            return real(rows)

        monkeypatch.setattr(engine.target, "hidden", hidden_or_fail)
        with pytest.raises(RuntimeError, match="injected forward failure"):
            engine.generate(b_prompt, SamplingParams(max_tokens=5, temperature=0.0))
        monkeypatch.setattr(engine.target, "hidden", real)
        tokens, _, finish = engine.generate(c_prompt, SamplingParams(max_tokens=5, temperature=0.0))
        assert finish == "length" and tokens == reference(model, c_prompt, 5)
        assert a_done.wait(60)
    finally:
        engine.shutdown(5)
    assert a_out[-1].finish_reason == "length" and tokens_of(a_out) == reference(model, a_prompt, 150)


def test_a_failing_request_gets_its_own_error_over_http(model, smollm2_tokenizer, poisoned_sampling):
    """Over HTTP: the failing request gets 500 (or an error event when streaming), a concurrent one completes."""
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=256, max_batch_size=4)).start()
    server = ServerThread(create_app(engine, smollm2_tokenizer, NAME, ServeMetrics()))
    try:
        body = {**GOOD, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            seen = [next(line for line in lines if line.startswith("data: "))]
            bad = {**GOOD, "temperature": 1.0, "seed": POISON}
            r = post(server.url, "/v1/completions", bad)
            assert r.status_code == 500 and "injected sampling failure" in error_of(r)["message"], r.text
            with httpx.stream("POST", server.url + "/v1/completions", json={**bad, "stream": True}, timeout=60) as failing:
                events = list(failing.iter_lines())
            assert any("injected sampling failure" in e for e in events) and [e for e in events if e][-1] == "data: [DONE]", events
            seen += list(lines)
        events = sse_events(seen)
        assert not any("error" in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
        engine.shutdown(5)


# ------------------------------------------------------------------ the engine's own checks, sampling, options
def test_engine_rejects_what_would_fail_a_step(model, smollm2_tokenizer):
    """Callers other than the HTTP API (compress generate, embedding programs) get the same guard."""
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64))
    ok = SamplingParams(max_tokens=4, temperature=1.0)
    for prompt, params, param in [
        ([1, 49152], ok, "prompt"), ([-1], ok, "prompt"),
        ([1], SamplingParams(max_tokens=4, seed=2**70), "seed"), ([1], SamplingParams(max_tokens=4, top_k=-3), "top_k"),
        ([1], SamplingParams(max_tokens=4, top_k=2**63), "top_k"), ([1], SamplingParams(max_tokens=4, temperature=math.nan), "temperature"),
        ([1], SamplingParams(max_tokens=4, temperature=math.inf), "temperature"), ([1], SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
    ]:  # fmt: skip
        with pytest.raises(RequestRejected) as info:
            engine.submit(prompt, params, lambda out: None)
        assert info.value.param == param, (prompt, params)
    assert engine.waiting == 0


def test_sampling_takes_a_huge_top_k_and_a_tiny_temperature():
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=2**63, top_p=0.9), SamplingParams(max_tokens=1, temperature=1e-320)]
    tokens = sample(logits, params, generators)
    assert 0 <= tokens[0] < 100 and tokens[1] == int(logits[1].argmax())  # a vanishing temperature is greedy, not NaN


def test_max_request_bytes_is_checked(model, smollm2_tokenizer, artifact):
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64))
    assert DEFAULT_MAX_REQUEST_BYTES == LIMIT
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_request_bytes"):
            create_app(engine, smollm2_tokenizer, NAME, ServeMetrics(), max_request_bytes=bad)
    result = invoke("serve", artifact, "--max-request-bytes", "0")
    assert result.exit_code == 2 and "--max-request-bytes" in result.output
    assert "2097152" in invoke("serve", "--help").output


def test_generate_refuses_out_of_range_options(artifact):
    """`compress generate` runs the same engine: its guard is a one-line error there, not a traceback."""
    assert_user_error(invoke("generate", artifact, "Hi", "--device", "cpu", "--temperature", "1", "--seed", str(2**70)), "--seed: seed must lie in")
    assert_user_error(invoke("generate", artifact, "Hi", "--device", "cpu", "--temperature", "inf"), "--temperature: temperature must be a finite")
