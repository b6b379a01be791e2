"""The serving engine: continuous batching over a slot KV cache, with optional speculative decoding.

One thread owns the model (torch forwards must not run concurrently) and loops:

1. admit waiting requests into free slots (at most `max_batch_size` run at once);
2. prefill: up to `prefill_chunk` prompt tokens, taken first-come-first-served across the
   sequences still reading their prompts (one padded forward), so a long prompt is read over
   several iterations instead of stalling everyone else's decoding;
3. decode: one forward over every sequence that has finished its prompt, one new token each
   (or, with a draft model, up to k+1 tokens for greedy sequences, see `_propose`/`_decode`);
4. finished or cancelled sequences leave and free their slot; the next iteration admits more.

Failures stay as small as they can: a request that would fail inside a step is rejected by
`submit`; an exception while sampling or detokenizing for one sequence ends that sequence alone
with an error output; a failed forward ends the sequences it carried (other slots are untouched);
the loop keeps serving either way.

Callers (the HTTP handlers) `submit` token ids with a `sink` that receives one `Output` per
iteration that produced tokens; the sink is called on the engine thread and must only hand the
output over (e.g. `loop.call_soon_threadsafe`).

Speculative decoding (greedy sequences only): the draft proposes k tokens greedily with its own
slot cache, the served model scores the last token plus the k proposals in one forward, the
longest prefix that matches the served model's own greedy choices is kept plus the served
model's token after it. The result is the served model's greedy decoding; both caches "roll
back" for free because a sequence's length is bookkeeping (see kv_cache.py). Sampled sequences
in the same batch take one ordinary token per step in the same forward.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compressor.errors import UserError
from compressor.serve.kv_cache import kv_bytes_per_token
from compressor.serve.metrics import ServeMetrics
from compressor.serve.backends import ServingModel, backend_for
from compressor.serve.sampling import SamplingParams, make_generator, sample
from compressor.serve.text import IncrementalDetokenizer, StopStringFilter

log = logging.getLogger(__name__)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class EngineError(Exception):
    """A request the engine will not take; `param`/`code` follow OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class EngineConfigError(UserError):
    """The engine cannot run with these options (raised when it is built, not per request).

    The message names options by their EngineConfig field (`max_model_len`, and `draft` for the
    draft model); a caller with its own names for them, such as the CLI's --max-model-len, gets
    the message in those with `spelled(names)`.
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.spelled({}))

    def spelled(self, names: dict[str, str]) -> str:
        options = {name: names.get(name, name) for name in (*EngineConfig.__dataclass_fields__, "draft")}
        return self.template.format(**options, **self.values)


class RequestRejected(EngineError):
    """The request itself is invalid (HTTP 400)."""


class Overloaded(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""


class Draining(EngineError):
    """The server is shutting down (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int  # prompt + completion tokens of one sequence
    max_batch_size: int = 32  # sequences decoding together
    max_prompt_tokens: int | None = None  # default: max_model_len - 1
    max_tokens: int | None = None  # the largest max_tokens a request may ask; default: max_model_len - 1
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    prefill_chunk: int = 256  # prompt tokens per iteration
    kv_cache_gb: float = 4.0  # budget for the slot caches (served model and draft together)
    num_speculative_tokens: int = 4  # k, with a draft model


@dataclass
class Output:
    """What one iteration produced for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Sequence:
    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, sink: Callable[[Output], None], tokenizer, device):
        self.id, self.prompt, self.params, self.sink = seq_id, prompt, params, sink
        self.tokens = list(prompt)  # prompt + generated
        self.slot: int | None = None
        self.cached = 0  # tokens whose K/V are in the served model's cache
        self.draft_cached = 0  # the same for the draft's cache
        self.generator = make_generator(params, device)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringFilter(params.stop)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.last_token_time: float | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)


def _last_logits(model: ServingModel, rows) -> torch.Tensor:
    """Logits [B, vocab] after each row's last new token (rows as for `hidden`)."""
    hidden, _ = model.hidden(rows)
    last = torch.tensor([len(tokens) - 1 for _, tokens, _ in rows], device=hidden.device)
    return model.head(hidden[torch.arange(len(rows), device=hidden.device), last]).float()


def _eos_ids(model_eos, tokenizer) -> set[int]:
    ids = set()
    for value in (model_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig, draft=None, metrics: ServeMetrics | None = None):
        self.tokenizer, self.config, self.metrics = tokenizer, config, metrics
        target = backend_for(model)  # chosen once; nothing below branches on the kind of model
        drafter = backend_for(draft) if draft is not None else None
        if drafter is not None and drafter.kind != target.kind:
            raise EngineConfigError("{draft}: the draft must run on the same backend (torch or onnx) as the served model")
        self.device, self.dtype, self.backend = target.device, target.dtype, target.label
        model_config, draft_config = target.config, drafter.config if drafter is not None else None
        context = getattr(model_config, "max_position_embeddings", None)
        if context and config.max_model_len > context:
            raise EngineConfigError("{max_model_len} {length} exceeds the model's context of {context} tokens",
                                    length=config.max_model_len, context=context)  # fmt: skip
        if draft is not None and draft_config.vocab_size != model_config.vocab_size:
            raise EngineConfigError("{draft}: vocabulary of {draft_vocab} tokens differs from the served model's "
                                    "{vocab}; the draft must share the tokenizer",
                                    draft_vocab=draft_config.vocab_size, vocab=model_config.vocab_size)  # fmt: skip
        self.k = config.num_speculative_tokens if draft is not None else 0
        capacity = config.max_model_len + self.k  # verification reads up to k positions past the last token
        per_slot = capacity * sum(kv_bytes_per_token(c, self.dtype) for c in (model_config, draft_config) if c is not None)
        slots = min(config.max_batch_size, int(config.kv_cache_gb * 2**30 // per_slot))
        if slots < 1:
            raise EngineConfigError("{kv_cache_gb} {budget} holds no sequence of {max_model_len} {length} "
                                    "(one needs {need:.3f} GB); raise {kv_cache_gb} or lower {max_model_len}",
                                    budget=config.kv_cache_gb, length=config.max_model_len, need=per_slot / 2**30)  # fmt: skip
        if slots < config.max_batch_size:
            log.warning("KV cache budget %.2f GB fits %d sequences of %d tokens; batch size limited to %d",
                        config.kv_cache_gb, slots, capacity, slots)  # fmt: skip
        self.slots = slots
        self.target = target.new_cache(slots, capacity, self.dtype, self.device)
        self.draft = drafter.new_cache(slots, capacity, self.dtype, self.device) if drafter is not None else None
        self.eos = _eos_ids(target.eos_ids(), tokenizer)
        self.vocab_size = int(model_config.vocab_size)
        self.max_prompt_tokens = config.max_prompt_tokens or config.max_model_len - 1
        self.max_tokens = config.max_tokens or config.max_model_len - 1

        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._free_slots = list(range(slots))
        self._next_id = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._started = False
        self._finished = threading.Event()  # set when the loop has returned
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.steps = 0
        if metrics:
            metrics.kv_cache_bytes.set(self.target.cache.nbytes + (self.draft.cache.nbytes if self.draft else 0))

    # ------------------------------------------------------------------ the caller's side (any thread)
    def start(self) -> Engine:
        """Run the loop on a background thread (tests, benchmarks, embedding in another program)."""
        self._started = True
        self._thread = threading.Thread(target=self._loop, name="compressor-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until `shutdown` (from another thread) ends it.

        `compress serve` runs the engine on the main thread, the one that loaded the model: with
        torch's OpenMP backend, parallel CPU ops on a second thread, once the main thread has
        used its own thread team, ran ~1.7x slower here (two teams competing for the cores).
        """
        self._started = True
        self._loop()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejected when a request of this size cannot run."""
        if prompt_tokens < 1:
            raise RequestRejected("the prompt is empty", "prompt")
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > self.max_tokens:
            raise RequestRejected(f"max_tokens {max_tokens} exceeds this server's limit of {self.max_tokens}", "max_tokens")
        if prompt_tokens > self.max_prompt_tokens:
            raise RequestRejected(
                f"the prompt has {prompt_tokens} tokens; this server accepts at most {self.max_prompt_tokens}",
                "prompt", "context_length_exceeded",
            )  # fmt: skip
        if prompt_tokens + max_tokens > self.config.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.config.max_model_len} tokens; the request has "
                f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} = {prompt_tokens + max_tokens}",
                "max_tokens", "context_length_exceeded",
            )  # fmt: skip

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise RequestRejected for what would fail inside a step, where it would fail the whole
        batch: token ids outside the model's vocabulary, sampling parameters out of range."""
        self.check(len(prompt), params.max_tokens)
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestRejected(f"token ids must lie in [0, {self.vocab_size - 1}]", "prompt")
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise RequestRejected(f"temperature must be a finite number >= 0, got {params.temperature}", "temperature")
        if not 0 < params.top_p <= 1:
            raise RequestRejected(f"top_p must lie in (0, 1], got {params.top_p}", "top_p")
        if not 0 <= params.top_k <= INT64_MAX:
            raise RequestRejected(f"top_k must lie in [0, {INT64_MAX}], got {params.top_k}", "top_k")
        if params.seed is not None and not INT64_MIN <= params.seed <= INT64_MAX:  # torch.Generator takes int64
            raise RequestRejected(f"seed must lie in [{INT64_MIN}, {INT64_MAX}], got {params.seed}", "seed")

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Output], None]) -> Sequence:
        self.check_request(prompt, params)
        with self._cond:
            if not self._accepting:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(f"the server is busy ({len(self._waiting)} requests waiting); retry later")
            seq = Sequence(self._next_id, list(prompt), params, sink, self.tokenizer, self.device)
            self._next_id += 1
            self._waiting.append(seq)
            self._gauges()
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` (the client went away); its slot is freed before the next forward."""
        if seq.finish_reason is None:
            seq.cancelled = True
            with self._cond:
                self._cond.notify()

    def drain(self) -> None:
        """Refuse new requests (Draining); the ones already taken run to completion."""
        with self._cond:
            self._accepting = False

    def shutdown(self, timeout: float | None = None) -> None:
        """Drain, wait up to `timeout` s for in-flight requests, abort what is left, stop the thread."""
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if not self._started:
            return
        if not self._finished.wait(timeout):
            with self._cond:
                for seq in [*self._waiting, *self._running]:
                    seq.cancelled = True
                self._cond.notify()
            self._finished.wait()
        if self._thread is not None:
            self._thread.join()

    def generate(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """(token ids, text, finish reason) of one request, blocking. On an engine that was not
        started (`compress generate`), the calling thread runs the loop until this request ends."""
        outputs: list[Output] = []
        done = threading.Event()

        def sink(out: Output) -> None:
            outputs.append(out)
            if out.finish_reason:
                done.set()

        self.submit(prompt, params, sink)
        if not self._started:
            with torch.inference_mode():
                while not done.is_set() and self._iteration(wait=False):
                    pass
        done.wait()
        if outputs[-1].finish_reason == "error":
            raise RuntimeError(outputs[-1].error)
        return [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs), outputs[-1].finish_reason

    # ------------------------------------------------------------------ the engine thread
    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._running))

    def _loop(self) -> None:
        try:
            self._serve_requests()
        finally:
            self._finished.set()

    def _serve_requests(self) -> None:
        with torch.inference_mode():
            while self._iteration(wait=True):
                pass

    def _iteration(self, wait: bool) -> bool:
        """Admit, step once, retire; False when the loop should end (stopped, or with wait=False idle)."""
        with self._cond:
            while not (self._waiting or self._running or self._stop):
                if not wait:
                    return False
                self._cond.wait()
            if self._stop and not self._waiting and not self._running:
                return False
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "abort")
                    continue
                seq.slot = heapq.heappop(self._free_slots)
                self._running.append(seq)
            self._gauges()
        for seq in [s for s in self._running if s.cancelled]:
            self._retire(seq, "abort")
        if not self._running:
            return True
        started = time.perf_counter()
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - last resort (the step isolates what it can): fail the batch, keep serving
            log.exception("engine step failed")
            for seq in list(self._running):
                self._retire(seq, "error", error=f"{type(exc).__name__}: {exc}")
        for seq in [s for s in self._running if s.finish_reason]:
            self._retire(seq, seq.finish_reason)
        self.steps += 1
        if self.metrics:
            self.metrics.step_time.observe(time.perf_counter() - started)
        return True

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Record the end of `seq`; tell its client unless the output already carried the reason."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
            self._emit(seq, Output("", [], reason, len(seq.prompt), seq.generated, error))
        if self.metrics:
            self.metrics.finished.labels(seq.finish_reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - seq.arrival)

    def _retire(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Take `seq` out of the batch and free its slot."""
        self._finish(seq, reason, error)
        self._running.remove(seq)
        with self._cond:
            heapq.heappush(self._free_slots, seq.slot)
            self._gauges()

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """End `seq` alone with an error (its client is told); the others in the step carry on."""
        log.error("sequence %d failed", seq.id, exc_info=exc)
        seq.finish_reason = "error"  # retired at the end of this iteration
        self._emit(seq, Output("", [], "error", len(seq.prompt), seq.generated, f"{type(exc).__name__}: {exc}"))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """One token per sequence; None for a sequence whose sampling failed (it fails alone)."""
        try:
            return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:  # noqa: BLE001 - find the culprit row by row (rows drawn before the failure draw again)
            log.debug("batched sampling failed; sampling row by row", exc_info=True)
        tokens: list[int | None] = []
        for i, seq in enumerate(seqs):
            try:
                tokens.append(sample(logits[i : i + 1], [seq.params], [seq.generator])[0])
            except Exception as exc:  # noqa: BLE001
                self._fail(seq, exc)
                tokens.append(None)
        return tokens

    def _deliver(self, seq: Sequence, tokens: list[int]) -> None:
        """`_append`, failing only `seq` if its detokenizer or stop strings raise."""
        try:
            self._append(seq, tokens)
        except Exception as exc:  # noqa: BLE001
            self._fail(seq, exc)

    def _fail_forward(self, seqs: list[Sequence], exc: Exception) -> None:
        """A shared forward raised: its sequences fail; slots outside it were not touched, the engine goes on."""
        log.error("forward of %d sequences failed", len(seqs), exc_info=exc)
        for seq in seqs:
            self._fail(seq, exc)

    def _emit(self, seq: Sequence, out: Output) -> None:
        try:
            seq.sink(out)
        except Exception:  # noqa: BLE001 - a closed event loop or a dead client must not stop the engine
            log.debug("dropping output of sequence %d", seq.id, exc_info=True)
            seq.cancelled = True

    def _step(self) -> None:
        reading = [s for s in self._running if not s.prefilled]
        if reading:
            self._prefill(reading)
        ready = [s for s in self._running if s.prefilled and s.finish_reason is None and not s.cancelled]
        if ready:
            self._decode(ready)

    def _prefill(self, seqs: list[Sequence]) -> None:
        budget, batch = self.config.prefill_chunk, []
        for seq in seqs:
            n = min(len(seq.prompt) - seq.cached, budget)
            if n <= 0:
                break
            batch.append((seq, seq.prompt[seq.cached : seq.cached + n]))
            budget -= n
        rows = [(seq.slot, chunk, seq.cached) for seq, chunk in batch]
        try:
            hidden, valid = self.target.hidden(rows)
            if self.draft is not None:  # greedy sequences will speculate: the draft reads their prompt too
                drafted = [(seq.slot, chunk, seq.draft_cached) for seq, chunk in batch if seq.params.greedy]
                if drafted:
                    self.draft.hidden(drafted)
        except Exception as exc:  # noqa: BLE001
            self._fail_forward([seq for seq, _ in batch], exc)
            return
        for seq, chunk in batch:
            seq.cached += len(chunk)
            if self.draft is not None and seq.params.greedy:
                seq.draft_cached += len(chunk)
        done = [i for i, (seq, _) in enumerate(batch) if seq.prefilled]
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(c) for _, c in batch))
            self.metrics.prefill_tokens_per_step.observe(sum(len(c) for _, c in batch))
        if not done:
            return
        seqs_done = [batch[i][0] for i in done]
        try:
            last = valid.sum(dim=1) - 1
            rows_done = torch.tensor(done, device=hidden.device)
            logits = self.target.head(hidden[rows_done, last[rows_done]]).float()
        except Exception as exc:  # noqa: BLE001
            self._fail_forward(seqs_done, exc)
            return
        for seq, token in zip(seqs_done, self._sample(logits, seqs_done)):
            if token is not None:
                self._deliver(seq, [token])

    def _propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """k greedy draft tokens per sequence; the draft first catches up on tokens it has not read."""
        rows = [(s.slot, s.tokens[s.draft_cached :], s.draft_cached) for s in seqs]
        proposals = [[t] for t in _last_logits(self.draft, rows).argmax(dim=-1).tolist()]
        for s in seqs:
            s.draft_cached = len(s.tokens)
        for _ in range(k - 1):
            rows = [(s.slot, [p[-1]], s.draft_cached) for s, p in zip(seqs, proposals)]
            for p, t in zip(proposals, _last_logits(self.draft, rows).argmax(dim=-1).tolist()):
                p.append(t)
            for s in seqs:
                s.draft_cached += 1
        return proposals

    def _decode(self, seqs: list[Sequence]) -> None:
        if self.metrics:
            self.metrics.batch_size.observe(len(seqs))
        # a sequence speculates when greedy and at least 2 tokens from its limit; it verifies k_i <= k proposals
        budget = {s.id: min(self.k, s.params.max_tokens - s.generated - 1) for s in seqs if s.params.greedy}
        speculating = [s for s in seqs if budget.get(s.id, 0) > 0]
        proposals: dict[int, list[int]] = {}
        try:
            if speculating:
                k = max(budget[s.id] for s in speculating)
                for s, p in zip(speculating, self._propose(speculating, k)):
                    proposals[s.id] = p[: budget[s.id]]
            rows = [(s.slot, [s.tokens[-1], *proposals.get(s.id, [])], s.cached) for s in seqs]
            hidden, valid = self.target.hidden(rows)
            logits = self.target.head(hidden[valid]).float()  # [tokens fed, vocab], row by row
            greedy = logits.argmax(dim=-1).tolist() if proposals else []  # the served model's greedy tokens, every position
        except Exception as exc:  # noqa: BLE001
            self._fail_forward(seqs, exc)
            return
        starts = [0]
        for _, tokens, _ in rows:
            starts.append(starts[-1] + len(tokens))

        plain = [i for i, s in enumerate(seqs) if s.id not in proposals]
        if plain:
            picked = self._sample(logits[[starts[i] for i in plain]], [seqs[i] for i in plain])
            for i, token in zip(plain, picked):
                if token is None:
                    continue
                seqs[i].cached += 1
                self._deliver(seqs[i], [token])
        proposed_now = accepted_now = 0
        for i, s in enumerate(seqs):
            if s.id not in proposals:
                continue
            proposed = proposals[s.id]
            choices = greedy[starts[i] : starts[i + 1]]
            accepted = 0
            while accepted < len(proposed) and proposed[accepted] == choices[accepted]:
                accepted += 1
            n = len(s.tokens)
            s.cached += 1 + accepted  # the last token and the accepted proposals; rejected ones are forgotten
            s.draft_cached = min(s.draft_cached, n + accepted)
            proposed_now += len(proposed)
            accepted_now += accepted
            self._deliver(s, proposed[:accepted] + [choices[accepted]])
        self.spec_proposed += proposed_now
        self.spec_accepted += accepted_now
        if proposals and self.metrics:
            self.metrics.spec_proposed.inc(proposed_now)
            self.metrics.spec_accepted.inc(accepted_now)
            self.metrics.spec_acceptance.set(self.spec_accepted / self.spec_proposed)

    def _append(self, seq: Sequence, tokens: list[int]) -> None:
        """Add generated tokens (stopping at eos, a stop string or max_tokens) and emit the new text."""
        now = time.perf_counter()
        text, taken = "", []
        for token in tokens:
            seq.tokens.append(token)
            taken.append(token)
            if token in self.eos and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
                text += seq.stops.finish(seq.detok.flush())
                break
            piece, hit = seq.stops.push(seq.detok.add(token))
            text += piece
            if hit:
                seq.finish_reason = "stop"
                break
            if seq.generated >= seq.params.max_tokens:
                seq.finish_reason = "length"
                text += seq.stops.finish(seq.detok.flush())
                break
        if self.metrics:
            self.metrics.generation_tokens.inc(len(taken))
            if seq.last_token_time is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                gap = (now - seq.last_token_time) / len(taken)
                for _ in taken:
                    self.metrics.itl.observe(gap)
        seq.last_token_time = now
        self._emit(seq, Output(text, taken, seq.finish_reason, len(seq.prompt), seq.generated))


def default_max_model_len(model, cap: int = 2048) -> int:
    context = getattr(backend_for(model).config, "max_position_embeddings", None) or cap
    return int(min(context, cap))


__all__ = [
    "Draining",
    "Engine",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "Output",
    "Overloaded",
    "RequestRejected",
    "SamplingParams",
    "default_max_model_len",
]
