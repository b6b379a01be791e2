"""The serving engine without HTTP: continuous batching, chunked prefill, speculative decoding,
sampling, detokenization and stop strings, admission limits, on a tiny random Llama.

The tiny model uses initializer_range 0.3 so its greedy continuations vary from token to token
(with the default 0.02 it repeats one token forever, which would make equality tests weak).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from compressor.errors import UserError
from compressor.serve.engine import Draining, Engine, EngineConfig, EngineConfigError, Overloaded, RequestRejected
from compressor.serve.kv_cache import kv_bytes_per_token
from compressor.serve.metrics import ServeMetrics
from compressor.serve.sampling import SamplingParams, sample
from compressor.serve.text import IncrementalDetokenizer, StopStringFilter
from conftest import make_tiny_llama

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(initializer_range=0.3)


@pytest.fixture(scope="module")
def other_draft():
    """A different (1-layer) random model: its proposals are almost always rejected."""
    return make_tiny_llama(initializer_range=0.3, seed=1, num_hidden_layers=1)


def prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


def run_concurrently(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    results = [None] * len(requests)

    def one(i):
        results[i] = engine.generate(*requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.fixture
def make_engine(model, smollm2_tokenizer):
    engines = []

    def make(draft=None, start=True, metrics=None, **options):
        options.setdefault("max_model_len", 256)
        engine = Engine(model, smollm2_tokenizer, EngineConfig(**options), draft=draft, metrics=metrics)
        engines.append(engine)
        return engine.start() if start else engine

    yield make
    for engine in engines:
        engine.shutdown(5)


# ------------------------------------------------------------------ greedy equality, batching
def test_concurrent_greedy_outputs_equal_generate(model, make_engine):
    """Rows of different lengths share forwards (3 slots for 6 requests: some join mid-way),
    long prompts are read in chunks of 8, and every output equals generate()'s."""
    metrics = ServeMetrics()
    engine = make_engine(max_batch_size=3, prefill_chunk=8, metrics=metrics)
    ps = prompts([5, 9, 30, 2, 17, 64])
    results = run_concurrently(engine, [(p, SamplingParams(max_tokens=20, **GREEDY)) for p in ps])
    for p, (tokens, _, finish) in zip(ps, results):
        assert tokens == reference(model, p, 20)
        assert finish == "length"
    batch = metrics.registry.get_sample_value
    assert batch("compressor_decode_batch_size_sum") > batch("compressor_decode_batch_size_count"), "never batched"


def test_a_request_joins_the_running_batch(make_engine):
    """B arrives while A decodes; B's tokens come before A is done, and A never pauses."""
    engine = make_engine(max_batch_size=4)
    a_prompt, b_prompt = prompts([4, 6])
    events, lock = [], threading.Lock()

    def sink(name):
        def put(out):
            with lock:
                events.append((name, out))
        return put

    engine.submit(a_prompt, SamplingParams(max_tokens=150, ignore_eos=True, **GREEDY), sink("a"))
    while sum(1 for n, _ in events if n == "a") < 5:
        time.sleep(0.001)
    engine.submit(b_prompt, SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY), sink("b"))
    deadline = time.time() + 30
    while not any(n == "a" and o.finish_reason for n, o in events) and time.time() < deadline:
        time.sleep(0.005)
    order = [n for n, _ in events]
    b_done = max(i for i, (n, o) in enumerate(events) if n == "b" and o.finish_reason)
    a_done = max(i for i, (n, _) in enumerate(events) if n == "a")
    assert b_done < a_done, "B waited for A to finish"
    assert order.count("a") == 150 and order.count("b") == 5


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(make_engine):
    engine = make_engine(max_batch_size=4, prefill_chunk=16)
    a_prompt, b_prompt = prompts([4, 200])
    events, lock = [], threading.Lock()

    def sink(name):
        def put(out):
            with lock:
                events.append(name)
        return put

    engine.submit(a_prompt, SamplingParams(max_tokens=120, ignore_eos=True, **GREEDY), sink("a"))
    while "a" not in events:
        time.sleep(0.001)
    with lock:
        a_before = events.count("a")
    engine.submit(b_prompt, SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY), sink("b"))
    while events.count("b") < 3:
        time.sleep(0.005)
    a_tokens_before_b = events[: events.index("b")].count("a") - a_before
    # 200 prompt tokens at 16 per step take 13 steps, each followed by one decode step for A
    assert a_tokens_before_b >= 12


def test_cancel_frees_the_slot(make_engine):
    engine = make_engine(max_batch_size=1)
    a_prompt, b_prompt = prompts([4, 4])
    a_outputs = []
    a = engine.submit(a_prompt, SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY), a_outputs.append)
    while not a_outputs:
        time.sleep(0.001)
    engine.cancel(a)
    tokens, _, finish = engine.generate(b_prompt, SamplingParams(max_tokens=3, **GREEDY))
    assert len(tokens) == 3 and finish == "length"
    assert a_outputs[-1].finish_reason == "abort" and a.generated < 200
    deadline = time.time() + 5
    while engine.running and time.time() < deadline:  # B's slot is freed right after its last output
        time.sleep(0.001)
    assert engine.running == 0


# ------------------------------------------------------------------ speculative decoding
def test_speculative_with_the_model_itself_accepts_every_proposal(model, make_engine):
    engine = make_engine(draft=model, num_speculative_tokens=4, max_batch_size=4)
    ps = prompts([3, 11, 26], seed=1)
    results = run_concurrently(engine, [(p, SamplingParams(max_tokens=17, **GREEDY)) for p in ps])
    for p, (tokens, _, _) in zip(ps, results):
        assert tokens == reference(model, p, 17)
    assert engine.spec_proposed > 0 and engine.spec_accepted == engine.spec_proposed
    # 17 tokens: one from the prompt, then steps of up to 5; far fewer steps than tokens
    assert engine.steps < 3 * 17 / 2


def test_speculative_with_another_draft_still_equals_greedy(model, other_draft, make_engine):
    """Rejected proposals must leave no trace: outputs equal plain greedy decoding, and sampled
    requests in the same batch (which never speculate) run alongside."""
    metrics = ServeMetrics()
    engine = make_engine(draft=other_draft, num_speculative_tokens=3, max_batch_size=4, prefill_chunk=8, metrics=metrics)
    ps = prompts([3, 11, 26], seed=2)
    requests = [(p, SamplingParams(max_tokens=15, **GREEDY)) for p in ps]
    requests.append((ps[0], SamplingParams(max_tokens=15, temperature=0.8, seed=3, ignore_eos=True)))
    results = run_concurrently(engine, requests)
    for p, (tokens, _, _) in zip(ps, results[:3]):
        assert tokens == reference(model, p, 15)
    assert len(results[3][0]) == 15
    assert engine.spec_proposed > 0 and engine.spec_accepted < engine.spec_proposed
    rate = metrics.registry.get_sample_value("compressor_spec_acceptance_rate")
    assert rate == pytest.approx(engine.spec_accepted / engine.spec_proposed)


def test_a_draft_with_another_vocabulary_is_refused(model, smollm2_tokenizer):
    small_vocab = make_tiny_llama(vocab_size=1000)
    with pytest.raises(UserError, match="vocabulary of 1000 tokens"):
        Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64), draft=small_vocab)


# ------------------------------------------------------------------ sampling
def test_sampling_filters_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    top = logits.argmax(dim=-1).tolist()

    def draw(params, n=1):
        gens = [torch.Generator().manual_seed(params.seed or 0) for _ in range(3)]
        return [sample(logits, [params] * 3, gens) for _ in range(n)]

    assert draw(SamplingParams(max_tokens=1, temperature=1.5, top_k=1))[0] == top
    assert draw(SamplingParams(max_tokens=1, temperature=1.5, top_p=1e-6))[0] == top
    assert draw(SamplingParams(max_tokens=1, temperature=0.0))[0] == top
    a = draw(SamplingParams(max_tokens=1, temperature=1.0, seed=7), n=5)
    assert a == draw(SamplingParams(max_tokens=1, temperature=1.0, seed=7), n=5)
    assert a != draw(SamplingParams(max_tokens=1, temperature=1.0, seed=8), n=5)
    allowed = logits.topk(5, dim=-1).indices
    for row in draw(SamplingParams(max_tokens=1, temperature=2.0, top_k=5, seed=1), n=50):
        assert all(t in allowed[i].tolist() for i, t in enumerate(row))
    # top-p 0.5 keeps the smallest set of most likely tokens whose mass reaches 0.5
    probs = torch.softmax(logits, dim=-1)
    for row in draw(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=2), n=50):
        for i, t in enumerate(row):
            assert probs[i][probs[i] > probs[i, t]].sum() < 0.5


def test_seeded_requests_repeat_inside_a_batch(make_engine):
    engine = make_engine(max_batch_size=4)
    p = prompts([7], seed=4)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    first = engine.generate(p, params)
    others = run_concurrently(engine, [(p, params), (p, params), (p, SamplingParams(max_tokens=12, temperature=1.0, seed=12, ignore_eos=True))])
    assert others[0][0] == others[1][0] == first[0]
    assert others[2][0] != first[0]


# ------------------------------------------------------------------ text
def test_incremental_detokenization_handles_multibyte_characters(smollm2_tokenizer):
    text = "naïve café — 世界 😀 done"
    ids = smollm2_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p]), "some characters span several tokens"


def test_stop_strings_are_held_back_and_cut():
    f = StopStringFilter(("STOP", "\n\n"))
    assert f.push("Hel") == ("Hel", False)
    assert f.push("lo ST") == ("lo ", False)  # "ST" may begin "STOP"
    assert f.push("x") == ("STx", False)  # it did not
    assert f.push(" S") == (" ", False)
    assert f.push("TOP and more") == ("", True)
    assert f.text == "Hello STx "
    g = StopStringFilter(("\n\n",))
    assert g.push("a\n") == ("a", False) and g.push("\nb") == ("", True) and g.text == "a"
    assert StopStringFilter(()).push("anything") == ("anything", False)


def test_stop_string_eos_and_length_finish_reasons(model, make_engine, smollm2_tokenizer):
    engine = make_engine()
    p = prompts([6], seed=5)[0]
    tokens, text, finish = engine.generate(p, SamplingParams(max_tokens=12, **GREEDY))
    assert finish == "length" and len(tokens) == 12 and text == smollm2_tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    _, cut, finish = engine.generate(p, SamplingParams(max_tokens=12, stop=(stop,), **GREEDY))
    assert finish == "stop" and cut == text[: text.index(stop)]
    engine.eos = {tokens[3]}  # pretend the 4th greedy token ends the sequence
    stopped, _, finish = engine.generate(p, SamplingParams(max_tokens=12, **GREEDY))
    assert finish == "stop" and stopped == tokens[: tokens.index(tokens[3]) + 1]
    ignoring, _, finish = engine.generate(p, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    assert finish == "length" and ignoring == tokens


# ------------------------------------------------------------------ limits
def test_request_limits(make_engine):
    engine = make_engine(max_model_len=64, max_prompt_tokens=40, max_tokens=30, start=False)
    engine.check(40, 24)
    for prompt_len, max_tokens, param, code in [(0, 5, "prompt", None), (10, 0, "max_tokens", None), (10, 31, "max_tokens", None),
                                                (41, 5, "prompt", "context_length_exceeded"),
                                                (40, 25, "max_tokens", "context_length_exceeded")]:  # fmt: skip
        with pytest.raises(RequestRejected) as info:
            engine.check(prompt_len, max_tokens)
        assert (info.value.param, info.value.code) == (param, code)


def test_queue_limit_and_draining(make_engine):
    engine = make_engine(max_queue=2, start=False)  # nothing runs, so the queue only fills
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine.submit([5, 6], params, lambda out: None)
    engine.submit([5, 6], params, lambda out: None)
    with pytest.raises(Overloaded):
        engine.submit([5, 6], params, lambda out: None)
    engine.drain()
    with pytest.raises(Draining):
        engine.submit([5, 6], params, lambda out: None)


def test_kv_budget_sets_the_batch_size(model, smollm2_tokenizer):
    per_sequence = kv_bytes_per_token(model.config, torch.float32) * 128
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=128, max_batch_size=8, kv_cache_gb=2.5 * per_sequence / 2**30))
    assert engine.slots == 2 and engine.target.cache.nbytes == 2 * per_sequence
    # The engine names its own options; the CLI spells them as its flags (test_engine_errors_name_the_cli_flags).
    with pytest.raises(EngineConfigError, match="kv_cache_gb .* holds no sequence of max_model_len 128") as err:
        Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=128, kv_cache_gb=0.5 * per_sequence / 2**30))
    assert isinstance(err.value, UserError) and "--" not in str(err.value)
    assert err.value.spelled({"kv_cache_gb": "--kv-cache-gb", "max_model_len": "--max-model-len"}).startswith(
        "--kv-cache-gb ") and "raise --kv-cache-gb or lower --max-model-len" in err.value.spelled(
        {"kv_cache_gb": "--kv-cache-gb", "max_model_len": "--max-model-len"})  # fmt: skip
    with pytest.raises(EngineConfigError, match="max_model_len 1024 exceeds the model's context of 512"):
        Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=1024))


# ------------------------------------------------------------------ the real model (slow)
@pytest.mark.slow
def test_smollm2_batched_greedy_equals_generate(smollm2_tokenizer):
    """SmolLM2-135M (the embedded model): 4 concurrent greedy requests, chunked prefill, equal to generate().

    Batched fp32 matmuls may round differently from batch-1 ones; on this model and these prompts
    no token flips (if one ever does, this test says so rather than hiding it)."""
    from compressor.models import load_model, resolve_source

    model = load_model(resolve_source("smollm2-135m"), torch.float32).eval()
    texts = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]
    ps = [smollm2_tokenizer(t).input_ids for t in texts]
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=256, max_batch_size=4, prefill_chunk=4)).start()
    try:
        results = run_concurrently(engine, [(p, SamplingParams(max_tokens=32, **GREEDY)) for p in ps])
    finally:
        engine.shutdown(5)
    for p, (tokens, _, _) in zip(ps, results):
        expected = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, pad_token_id=2)[0, len(p) :].tolist()
        assert tokens == expected


def test_engine_errors_name_the_cli_flags(tiny_llama_dir):
    """`compress serve`/`generate` translate the engine's option names into their flags."""
    import sys
    import subprocess

    code = "import sys; from compressor.cli import main; sys.argv[0] = 'compress'; main()"
    serve = subprocess.run([sys.executable, "-c", code, "serve", str(tiny_llama_dir), "--port", "0", "--max-model-len", "100000"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert "error: --max-model-len 100000 exceeds the model's context of" in serve.stderr
    generate = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_llama_dir), "hi", "--max-new-tokens", "4",
                               "--seed", str(2**70)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert generate.returncode == 2 and "error: --seed: " in generate.stderr, generate.stderr[-2000:]
