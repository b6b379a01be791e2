"""The perplexity protocol against the model's own loss, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import UserError
from compressor.evaluation.perplexity import PerplexityResult, perplexity
from conftest import make_tiny_llama

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=VOCAB)


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_loss(model, window: torch.Tensor) -> float:
    """transformers' own mean next-token loss for one window."""
    with torch.no_grad():
        return model(window[None], labels=window[None]).loss.item()


def test_one_window_matches_transformers_loss(model):
    ids = random_ids(64)
    res = perplexity(model, ids, seq_len=64, progress=False)
    assert res.windows == 1 and res.tokens == 63 and res.seq_len == 64
    assert res.perplexity == pytest.approx(math.exp(hf_loss(model, ids)), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(res.mean_nll), rel=1e-12)


def test_windows_are_token_weighted_and_partial_window_is_dropped(model):
    ids = random_ids(3 * 32 + 17, seed=1)
    res = perplexity(model, ids, seq_len=32, progress=False)
    assert (res.windows, res.tokens) == (3, 3 * 31)
    # Each window is scored independently; the 17 trailing tokens are never seen.
    nll = sum(hf_loss(model, w) * 31 for w in ids[:96].view(3, 32))
    assert res.mean_nll == pytest.approx(nll / 93, rel=1e-5)
    assert res == perplexity(model, ids[:96], seq_len=32, progress=False)


def test_batch_size_does_not_change_the_result(model):
    ids = random_ids(4 * 32, seed=2)
    one = perplexity(model, ids, seq_len=32, batch_size=1, progress=False)
    three = perplexity(model, ids, seq_len=32, batch_size=3, progress=False)  # batches of 3 and 1
    assert (one.windows, one.tokens) == (three.windows, three.tokens) == (4, 124)
    assert three.mean_nll == pytest.approx(one.mean_nll, rel=1e-5)


def test_max_windows_keeps_the_first_windows(model):
    ids = random_ids(5 * 32, seed=3)
    res = perplexity(model, ids, seq_len=32, max_windows=2, progress=False)
    assert (res.windows, res.tokens) == (2, 62)
    assert res.mean_nll == pytest.approx(perplexity(model, ids[:64], seq_len=32, progress=False).mean_nll, rel=1e-6)
    assert perplexity(model, ids, seq_len=32, max_windows=99, progress=False).windows == 5


def test_seq_len_is_capped_by_max_position_embeddings():
    small = make_tiny_llama(vocab_size=VOCAB, max_position_embeddings=24)
    res = perplexity(small, random_ids(100, seed=4), seq_len=2048, progress=False)
    assert (res.seq_len, res.windows, res.tokens) == (24, 4, 4 * 23)


def test_too_few_tokens(model):
    with pytest.raises(UserError, match=r"at least 32 tokens .* has 31 tokens"):
        perplexity(model, random_ids(31), seq_len=32, progress=False)


def test_to_dict():
    res = PerplexityResult(perplexity=2.0, mean_nll=math.log(2.0), tokens=10, windows=2, seq_len=6)
    assert res.to_dict() == {"perplexity": 2.0, "mean_nll": math.log(2.0), "tokens": 10, "windows": 2, "seq_len": 6}
