"""Choosing the next token: greedy at temperature 0, else temperature + top-k + top-p sampling.

Each request samples with its own torch.Generator (seeded by the request's `seed`), so a seeded
request draws the same random numbers whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# a temperature below this is greedy: dividing logits by it would overflow them to inf (and the
# probabilities to NaN), and the distribution it asks for is greedy's to float precision anyway
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (load tests want exact lengths)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


@dataclass
class _Batch:
    rows: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [n, vocab]."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()  # greedy rows keep this (first maximum, like generate())
    todo = _Batch()
    for i, p in enumerate(params):
        if not p.greedy:
            todo.rows.append(i)
            todo.temperature.append(p.temperature)
            todo.top_k.append(p.top_k)
            todo.top_p.append(p.top_p)
    if not todo.rows:
        return chosen
    probs, index = _filtered_probs(logits[todo.rows], todo)
    # one draw per row from its own generator (a seeded request repeats whatever shares its batch),
    # then one read-back for all rows
    picks = torch.cat([torch.multinomial(probs[j], 1, generator=generators[row]) for j, row in enumerate(todo.rows)])
    if index is not None:
        picks = index.gather(1, picks[:, None])[:, 0]
    for row, token in zip(todo.rows, picks.tolist()):
        chosen[row] = token
    return chosen


def _filtered_probs(logits: torch.Tensor, todo: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature, top-k and top-p; in sorted order (with the sort index) when filtered."""
    device = logits.device
    logits = logits / torch.tensor(todo.temperature, device=device)[:, None]
    if all(k <= 0 for k in todo.top_k) and all(p >= 1.0 for p in todo.top_p):
        return torch.softmax(logits, dim=-1), None
    sorted_logits, index = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=device)[None, :]
    # clamped to the vocabulary: a top_k past it filters nothing, and a huge one must not overflow int64
    top_k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in todo.top_k], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = torch.tensor(todo.top_p, device=device)[:, None]
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), index
