"""The CPU decode step (compressor/serve/cpu_step.py on kernels/cpu_decode.c).

Each C operation against the transformers/torch formula it replaces (RMSNorm with the residual
add, rotary embedding + Qwen3's head norms + the slot-cache write, grouped-query attention over
each row's own slot and position, silu * up), including argument checks and that a row's result
depends neither on its batch nor on the thread count. Then the whole step on tiny RTN artifacts of
Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms): its logits against transformers' forward on
the same loaded model at every position (a prompt chunk, then single tokens); every token's result
independent of its batch and of how its prompt was chunked; speculative decoding on it equal to
plain greedy; the engine using it, with batched greedy outputs equal to `complete` (what
`compress generate` runs) one request at a time; and each reason it declines a model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from compressor import runtime
from compressor.serve import Engine, EngineConfig, complete
from compressor.serve.cpu_step import CpuStep
from compressor.serve.backends import backend_for
from compressor.serve.kv_cache import SlotKVCache
from compressor.serve.sampling import SamplingParams
from conftest import make_tiny_llama, write_tiny_gptq_artifact
from test_cpu_kernels import max_relative_error, needs_kernels
from test_serve_engine import prompts, run_concurrently

pytestmark = needs_kernels


@pytest.fixture(scope="module")
def lib():
    from compressor.kernels import build

    return build.load_cpu_library()


def rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, in float64."""
    x = x.double()
    return weight.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on [rows, heads, D] with cos/sin [rows, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# --- the C operations --------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 75])  # 75: the 8-wide loop's scalar tail
def test_add_rms_norm_matches_llama_rmsnorm(lib, dim):
    gen = torch.Generator().manual_seed(0)
    h, delta, weight = (torch.randn(5, dim, generator=gen) for _ in range(3))
    weight = weight[0].contiguous()
    expected_h = h + delta
    y = torch.zeros(5, dim + 3)  # strided output rows
    assert lib.cq_cpu_add_rms_norm(h.data_ptr(), delta.data_ptr(), weight.data_ptr(), y.data_ptr(), 5, dim, dim, dim + 3, 1e-5) == 0
    assert torch.equal(h, expected_h)  # the residual add, exactly
    assert max_relative_error(y[:, :dim], rms_reference(expected_h, weight, 1e-5)) < 1e-6
    assert not y[:, dim:].any()  # nothing written past each row
    alone = torch.empty(5, dim)
    assert lib.cq_cpu_add_rms_norm(h.data_ptr(), None, weight.data_ptr(), alone.data_ptr(), 5, dim, dim, dim, 1e-5) == 0
    assert torch.equal(alone, y[:, :dim]) and torch.equal(h, expected_h)  # no delta: h unchanged
    assert lib.cq_cpu_add_rms_norm(h.data_ptr(), None, weight.data_ptr(), alone.data_ptr(), 5, dim, dim - 1, dim, 1e-5) != 0


HEADS, KV_HEADS, HEAD_DIM, SLOTS, CAPACITY = 6, 2, 16, 3, 10


def rope_inputs(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen)
    angles = torch.rand(rows, HEAD_DIM // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
    return qkv, cos.contiguous(), sin.contiguous()


def rope_store(lib, qkv, cos, sin, slots, positions, q_norm=None, k_norm=None):
    caches = torch.zeros(2, SLOTS, KV_HEADS, CAPACITY, HEAD_DIM)
    slots, positions = torch.tensor(slots), torch.tensor(positions)
    code = lib.cq_cpu_rope_store(
        qkv.data_ptr(), qkv.shape[1], qkv.shape[0], HEADS, KV_HEADS, HEAD_DIM, cos.data_ptr(), sin.data_ptr(),
        None if q_norm is None else q_norm.data_ptr(), None if k_norm is None else k_norm.data_ptr(), 1e-6,
        caches[0].data_ptr(), caches[1].data_ptr(), slots.data_ptr(), positions.data_ptr(), SLOTS, CAPACITY,
    )  # fmt: skip
    return code, caches


@pytest.mark.parametrize("head_norms", [False, True], ids=["llama", "qwen3-qk-norm"])
def test_rope_store_rotates_q_and_k_and_writes_the_slot_cache(lib, head_norms):
    qkv, cos, sin = rope_inputs(3)
    original = qkv.clone()
    gen = torch.Generator().manual_seed(1)
    q_norm, k_norm = (torch.randn(HEAD_DIM, generator=gen) for _ in range(2)) if head_norms else (None, None)
    slots, positions = [2, 0, 2], [5, 0, 9]
    code, (keys, values) = rope_store(lib, qkv, cos, sin, slots, positions, q_norm, k_norm)
    assert code == 0
    q = original[:, : HEADS * HEAD_DIM].view(3, HEADS, HEAD_DIM)
    k = original[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(3, KV_HEADS, HEAD_DIM)
    v = original[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(3, KV_HEADS, HEAD_DIM)
    if head_norms:  # Qwen3 normalizes each head before the rotation
        q, k = rms_reference(q, q_norm, 1e-6).float(), rms_reference(k, k_norm, 1e-6).float()
    expected_q, expected_k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    assert max_relative_error(qkv[:, : HEADS * HEAD_DIM].view(3, HEADS, HEAD_DIM), expected_q) < 1e-6
    written = torch.zeros(SLOTS, KV_HEADS, CAPACITY, dtype=torch.bool)
    for row, (slot, pos) in enumerate(zip(slots, positions)):
        assert max_relative_error(keys[slot, :, pos], expected_k[row]) < 1e-6
        assert torch.equal(values[slot, :, pos], v[row])
        written[slot, :, pos] = True
    assert not keys[~written].any() and not values[~written].any()  # nothing else touched


@pytest.mark.parametrize("slots,positions", [([3], [0]), ([-1], [0]), ([0], [CAPACITY]), ([0], [-1])])
def test_rope_store_refuses_rows_outside_the_cache(lib, slots, positions):
    qkv, cos, sin = rope_inputs(1)
    code, caches = rope_store(lib, qkv, cos, sin, slots, positions)
    assert code != 0 and not caches.any()


def attention_reference(q, keys, values, slots, positions, scale):
    """softmax(scale q k^T) v per row and head, in float64, keys 0..position of the row's slot."""
    group = HEADS // KV_HEADS
    out = torch.empty(len(slots), HEADS, HEAD_DIM, dtype=torch.float64)
    for row, (slot, pos) in enumerate(zip(slots, positions)):
        for head in range(HEADS):
            k = keys[slot, head // group, : pos + 1].double()
            v = values[slot, head // group, : pos + 1].double()
            weights = torch.softmax(scale * (k @ q[row, head].double()), dim=0)
            out[row, head] = weights @ v
    return out.view(len(slots), -1)


def attention(lib, q, keys, values, slots, positions, threads=2):
    slots_t, positions_t = torch.tensor(slots), torch.tensor(positions)
    out = torch.empty(len(slots), HEADS * HEAD_DIM)
    code = lib.cq_cpu_attention(
        q.data_ptr(), q.shape[1], len(slots), HEADS, KV_HEADS, HEAD_DIM, keys.data_ptr(), values.data_ptr(),
        slots_t.data_ptr(), positions_t.data_ptr(), SLOTS, CAPACITY, 0.25, out.data_ptr(), threads,
    )  # fmt: skip
    assert code == 0
    return out


def test_attention_matches_the_softmax_reference_per_slot_and_position(lib):
    gen = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(SLOTS, KV_HEADS, CAPACITY, HEAD_DIM, generator=gen) for _ in range(2))
    q = torch.randn(4, HEADS * HEAD_DIM + 8, generator=gen)  # strided rows, as q inside the qkv buffer
    slots, positions = [1, 0, 2, 1], [9, 0, 4, 3]
    out = attention(lib, q, keys, values, slots, positions)
    expected = attention_reference(q[:, : HEADS * HEAD_DIM].view(4, HEADS, HEAD_DIM), keys, values, slots, positions, 0.25)
    assert max_relative_error(out, expected) < 2e-6
    assert torch.equal(attention(lib, q, keys, values, slots, positions, threads=1), out)  # thread count: same bits
    for row in range(4):  # a row alone: the same bits as in the batch
        alone = attention(lib, q[row : row + 1].contiguous(), keys, values, slots[row : row + 1], positions[row : row + 1])
        assert torch.equal(alone[0], out[row])


def test_silu_mul_matches_torch(lib):
    gate_up = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(3)) * 4
    out = torch.empty(3, 40)
    assert lib.cq_cpu_silu_mul(gate_up.data_ptr(), 3, 40, out.data_ptr()) == 0
    gate, up = gate_up.chunk(2, dim=-1)
    assert max_relative_error(out, F.silu(gate.double()) * up.double()) < 1e-6


# --- the step on tiny artifacts ----------------------------------------------------------------


def tiny_model(kind: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if kind == "llama":
        return make_tiny_llama(initializer_range=0.3)
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.data.normal_(0, 0.3)
    else:  # q_norm / k_norm per head
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def artifact(request, tmp_path_factory, smollm2_tokenizer):
    out = tmp_path_factory.mktemp("cpu-step") / request.param
    return write_tiny_gptq_artifact(out, smollm2_tokenizer, model=tiny_model(request.param))


def test_step_logits_match_transformers_forward(artifact):
    """A 9-token prompt chunk, then 16 tokens one at a time, through the engine's model on the
    step, in slot 1 of a 3-slot cache: the logits at every position against transformers' forward
    of the whole sequence on the same loaded model."""
    model = runtime.load(artifact)
    target = backend_for(model).new_cache(3, 64, torch.float32, "cpu")
    assert target.cpu_step is not None
    ids = prompts([25], seed=4)[0]
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0]
        hidden, valid = target.hidden([(1, ids[:9], 0)])
        assert hidden.shape == (1, 9, model.config.hidden_size) and valid.all()
        assert max_relative_error(target.head(hidden[0]), expected[:9]) < 2e-5  # measured ~3e-6
        for pos in range(9, len(ids)):
            hidden, valid = target.hidden([(1, [ids[pos]], pos)])
            assert hidden.shape == (1, 1, model.config.hidden_size) and valid.all()
            assert max_relative_error(target.head(hidden[:, 0])[0], expected[pos]) < 2e-5, pos


def test_a_tokens_result_does_not_depend_on_its_batch_or_chunking(artifact):
    """Prompts read together in one padded step (rows of different lengths), or alone in chunks of
    3: every token's hidden state is bitwise the same; so are the next tokens' afterwards."""
    model = runtime.load(artifact)
    together_model = backend_for(model).new_cache(3, 64, torch.float32, "cpu")
    alone_model = backend_for(model).new_cache(3, 64, torch.float32, "cpu")
    ps = prompts([7, 3, 11], seed=5)
    with torch.inference_mode():
        together, valid = together_model.hidden([(slot, p, 0) for slot, p in enumerate(ps)])
        assert valid.sum(dim=1).tolist() == [7, 3, 11]
        for slot, p in enumerate(ps):
            chunks = [alone_model.hidden([(slot, p[i : i + 3], i)])[0][0] for i in range(0, len(p), 3)]
            assert torch.equal(torch.cat(chunks), together[slot, : len(p)])
        step = [(slot, [5 + slot], len(p)) for slot, p in enumerate(ps)]
        assert torch.equal(together_model.hidden(step)[0], alone_model.hidden(step)[0])


def test_speculative_decoding_on_the_step_equals_plain_greedy(artifact, smollm2_tokenizer):
    """The artifact as its own draft: proposals (one-token rows) and their verification (k+1-token
    rows) run on the step, so every proposal is accepted and the output is plain greedy's."""
    model, draft = runtime.load(artifact), runtime.load(artifact)
    ps = prompts([4, 10], seed=7)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for name, d in (("speculative", draft), ("plain", None)):
        engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64, num_speculative_tokens=3), draft=d).start()
        try:
            outputs[name] = [tokens for tokens, _, _ in run_concurrently(engine, [(p, params) for p in ps])]
        finally:
            engine.shutdown(5)
        if d is not None:
            assert engine.spec_proposed > 0 and engine.spec_accepted == engine.spec_proposed
    assert outputs["speculative"] == outputs["plain"]


def test_engine_batches_on_the_step_and_equals_complete(artifact, smollm2_tokenizer, monkeypatch):
    """Concurrent greedy requests (3 slots for 5 requests, chunked prefill) through a started
    engine give the tokens `complete` (compress generate) gives for each prompt alone; the
    decode steps ran on the CPU step."""
    model = runtime.load(artifact)
    calls = []
    original = CpuStep.__call__
    monkeypatch.setattr(CpuStep, "__call__", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
    ps = prompts([3, 9, 17, 5, 12], seed=6)
    engine = Engine(model, smollm2_tokenizer, EngineConfig(max_model_len=64, max_batch_size=3, prefill_chunk=8)).start()
    try:
        results = run_concurrently(engine, [(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for p in ps])
    finally:
        engine.shutdown(5)
    assert calls and max(calls) > 1  # batched steps on the C path
    for p, (tokens, _, _) in zip(ps, results):
        alone = complete(model, smollm2_tokenizer, p, 12)
        assert tokens[: len(alone)] == alone  # complete stops at end-of-sequence; the engine ignored it


def test_complete_refuses_more_than_the_context(artifact, smollm2_tokenizer):
    from compressor.errors import UserError

    model = runtime.load(artifact)
    with pytest.raises(UserError, match="--max-new-tokens 600: the prompt's 3 tokens"):
        complete(model, smollm2_tokenizer, [1, 2, 3], 600)


# --- when the step declines --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory, smollm2_tokenizer):
    return write_tiny_gptq_artifact(tmp_path_factory.mktemp("cpu-step") / "llama", smollm2_tokenizer)


def _cache(model, dtype=torch.float32):
    return SlotKVCache(model.config, 2, 32, dtype, "cpu")


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda a: make_tiny_llama(), "not GPTQ layers (a dense model)"),
        (lambda a: runtime.load(a, cache_dequantized=True), "keep float weights"),
        (lambda a: runtime.load(a, dtype=torch.bfloat16), "computes in torch.bfloat16"),
    ],
    ids=["dense", "cache-dequantized", "bfloat16"],
)
def test_the_step_declines_with_its_reason(llama_artifact, make, reason, caplog):
    model = make(llama_artifact)
    with caplog.at_level(logging.INFO, logger="compressor.serve.cpu_step"):
        assert CpuStep.build(model, _cache(model, next(model.parameters()).dtype)) is None
    assert reason in caplog.text and "the engine runs transformers' forward" in caplog.text


def test_the_step_declines_when_the_kernels_are_off(llama_artifact, monkeypatch, caplog):
    model = runtime.load(llama_artifact)
    monkeypatch.setenv("COMPRESSOR_CPU_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="compressor.serve.cpu_step"):
        assert CpuStep.build(model, _cache(model)) is None
    assert "CPU kernels are unavailable" in caplog.text
