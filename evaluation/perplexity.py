"""Perplexity of a causal LM on a token stream, by one fixed protocol.

1. `seq_len` is capped by `model.config.max_position_embeddings`.
2. The stream is cut into non-overlapping windows of `seq_len` tokens; the final partial
   window is dropped (`max_windows` keeps only the first N).
3. Each window is scored on its own: no context is carried over from the previous window, so
   a window's first token is never predicted and each window yields `seq_len - 1` predictions.
4. The NLL of every next-token prediction is computed in float32 from the logits
   (cross-entropy of logits[:, :-1] against ids[:, 1:]) and summed over all windows (the
   running total is a Python float, float64).
5. perplexity = exp(total NLL / number of predictions).

Windows are batched `batch_size` at a time without padding (all windows have the same
length), so the batch size does not change the result beyond float rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressor.errors import UserError


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    windows: int
    seq_len: int  # after the cap by max_position_embeddings

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_windows(model, token_ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """[windows, seq_len] ids by steps 1-2 of the protocol (seq_len capped by the model's context)."""
    max_pos = getattr(model, "max_position_embeddings", None) or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq_len = min(seq_len, max_pos) if max_pos else seq_len
    token_ids = token_ids.reshape(-1)
    n_windows = token_ids.numel() // seq_len
    if n_windows == 0:
        raise UserError(
            f"data.evaluation: perplexity needs at least {seq_len} tokens (one window of seq_len), "
            f"but the evaluation text has {token_ids.numel()} tokens"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return token_ids[: n_windows * seq_len].view(n_windows, seq_len)


def perplexity(
    model,
    token_ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Score `token_ids` ([T] int64) with `model` by the protocol in the module docstring.

    `model` is a transformers causal LM, or anything called as `model(input_ids=...)` that returns
    `.logits` (compressor.runtime.onnx.OnnxCausalLM: the ONNX artifact scored by onnxruntime).
    """
    windows = evaluation_windows(model, token_ids, seq_len, max_windows)
    n_windows, seq_len = windows.shape
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    total_nll = 0.0
    with torch.inference_mode(), tqdm(total=n_windows, desc=desc, unit="window", disable=not progress) as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total_nll += window_nll(logits, batch).item()
            bar.update(len(batch))

    tokens = n_windows * (seq_len - 1)
    mean_nll = total_nll / tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, tokens, n_windows, seq_len)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of [B, S] ids under [B, S, V] logits, in float32 (half-precision
    log-softmax over a large vocabulary loses digits)."""
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


class BlockwisePerplexity:
    """The same protocol, one decoder block at a time, for a model that is never whole in memory.

    `inputs` are the first block's inputs for the windows, `batch_size` windows per entry as
    `perplexity` batches them: (hidden states, the keyword arguments the model passes each block),
    from `compressor.engine.capture_block_inputs`. `advance(block)` runs every window through the
    next block; `finish(final_norm, lm_head)` scores them. The arithmetic is the whole model's,
    batch for batch, so the result is `perplexity`'s.
    """

    def __init__(self, windows: torch.Tensor, inputs: list[tuple[torch.Tensor, dict]]):
        self.windows, self.inputs = windows, inputs

    @torch.inference_mode()
    def advance(self, block: torch.nn.Module) -> None:
        outputs = []
        for hidden, kwargs in self.inputs:
            out = block(hidden, **kwargs)
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out, kwargs))
        self.inputs = outputs

    @torch.inference_mode()
    def finish(self, final_norm: torch.nn.Module, lm_head: torch.nn.Module) -> PerplexityResult:
        n_windows, seq_len = self.windows.shape
        total_nll, start = 0.0, 0
        for hidden, _ in self.inputs:
            batch = self.windows[start : start + hidden.shape[0]].to(hidden.device)
            start += hidden.shape[0]
            total_nll += window_nll(lm_head(final_norm(hidden)), batch).item()
        tokens = n_windows * (seq_len - 1)
        mean_nll = total_nll / tokens
        return PerplexityResult(math.exp(mean_nll), mean_nll, tokens, n_windows, seq_len)
