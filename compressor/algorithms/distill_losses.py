"""Knowledge-distillation losses as pure functions over logits and hidden states.

Shapes: logits are [B, S, V] (any leading shape works, the vocabulary is last), `input_ids` are
[B, S], hidden states [B, S, D]. Every loss is computed in float32 (half-precision softmax over a
50k vocabulary loses digits) from `log_softmax`, never from `softmax(...).log()`, which
underflows to -inf for unlikely tokens.

- `forward_kl` (Hinton et al., 2015): KL(teacher || student) between softmax(logits / T) of the
  two models. It is mode-covering: the student is pushed to give mass wherever the teacher does.
  Minitron (Muralidharan et al., 2024) found it the best logit loss for distilling pruned LLMs.
- `reverse_kl`: KL(student || teacher), mode-seeking (MiniLLM, Gu et al., 2023).
- Both are summed over the vocabulary, averaged over tokens (not over the vocabulary: the value
  does not depend on V), and multiplied by T^2. The gradient of the softened KL shrinks like
  1/T^2, so the factor keeps its scale comparable to the LM loss whatever T is (Hinton).
- `lm_loss`: the ordinary next-token cross entropy; the prediction at position i is scored
  against token i + 1, so the last position has no target.
- `hidden_state_loss`: per token, the mean squared error over the hidden width (`mse`) or
  1 - cosine similarity (`cosine`), averaged over tokens.
- `combined_loss`: (1 - lm_weight) * KD + lm_weight * LM + hidden_weight * hidden, the mix of a
  `distill` stage (see `compressor.recipe.DistillStage`).

`mask` ([B, S] bool, True = counts) selects positions: mask[b, i] selects the distribution at
position i (for the KL) and the prediction made at position i, of token i + 1 (for the LM loss;
mask[:, -1] is ignored there). A mask that selects nothing is an error, not a silent 0 or nan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

KD_LOSSES = ("forward_kl", "reverse_kl")
HIDDEN_LOSSES = ("mse", "cosine")


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over tokens of KL(p_teacher || p_student), p = softmax(logits / T)."""
    s, t = _log_probs(student_logits, teacher_logits, temperature)
    return _token_mean(_kl(t, s), mask) * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over tokens of KL(p_student || p_teacher), p = softmax(logits / T)."""
    s, t = _log_probs(student_logits, teacher_logits, temperature)
    return _token_mean(_kl(s, t), mask) * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL: logits[:, i] predicts input_ids[:, i + 1]."""
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    pred = logits[:, :-1].float()
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
    return _token_mean(nll.view(pred.shape[:-1]), None if mask is None else mask[:, :-1])


def hidden_state_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token MSE (mean over the width) or 1 - cosine similarity, averaged over tokens."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(student_hidden.shape)}, "
            f"teacher {tuple(teacher_hidden.shape)}"
        )
    s, t = student_hidden.float(), teacher_hidden.float()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden-state loss {kind!r}; expected one of {HIDDEN_LOSSES}")
    return _token_mean(per_token, mask)


def combined_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    lm_weight: float = 0.0,
    hidden_loss: str = "none",
    hidden_weight: float = 0.0,
    hidden_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - lm_weight) * KD + lm_weight * LM + hidden_weight * hidden, and the parts.

    `hidden_pairs` are (student, teacher) hidden states of the mapped layers; the hidden part is
    their mean, so `hidden_weight` does not grow with the number of pairs. The parts dict holds
    detached, unweighted values: `kd` (absent when teacher_logits is None, allowed only with
    lm_weight 1), `lm`, `hidden` (when used) and `total`. A part whose weight is 0 is still
    computed for the record, without a graph.
    """
    if loss not in KD_LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {KD_LOSSES}")
    if not 0 <= lm_weight <= 1:
        raise ValueError(f"lm_weight must be in [0, 1], got {lm_weight}")
    use_hidden = hidden_loss != "none" and hidden_weight > 0
    if use_hidden and not hidden_pairs:
        raise ValueError("a hidden-state loss needs at least one (student, teacher) pair")
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)

    if teacher_logits is None:
        if lm_weight < 1:
            raise ValueError("teacher_logits may be omitted only when lm_weight is 1")
    else:
        kd_fn = forward_kl if loss == "forward_kl" else reverse_kl
        with torch.set_grad_enabled(torch.is_grad_enabled() and lm_weight < 1):
            kd = kd_fn(student_logits, teacher_logits, temperature, mask)
        parts["kd"] = kd.detach()
        if lm_weight < 1:
            total = total + (1 - lm_weight) * kd

    with torch.set_grad_enabled(torch.is_grad_enabled() and lm_weight > 0):
        lm = lm_loss(student_logits, input_ids, mask)
    parts["lm"] = lm.detach()
    if lm_weight > 0:
        total = total + lm_weight * lm

    if use_hidden:
        hidden = torch.stack([hidden_state_loss(s, t, hidden_loss, mask) for s, t in hidden_pairs]).mean()
        parts["hidden"] = hidden.detach()
        total = total + hidden_weight * hidden

    parts["total"] = total.detach()
    return total, parts


# ----------------------------------------------------------------------------------- helpers
def _log_probs(student_logits, teacher_logits, temperature):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits differ in shape: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} "
            "(a different vocabulary?)"
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return s, t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token, summed over the last axis. Terms with p = 0 are 0 (not 0 * inf = nan),
    which matters when a model masks part of its vocabulary with -inf logits."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(device=per_token.device, dtype=torch.bool)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the tokens {tuple(per_token.shape)}")
    if not mask.any():
        raise ValueError("the mask selects no token")
    return per_token[mask].mean()
