"""`compress serve`: an OpenAI-compatible server with continuous batching and speculative decoding.

engine.py    scheduler (continuous batching, chunked prefill, speculative decoding)
cpu_step.py  the engine's forward for Llama-family artifacts on the CPU kernels (instead of transformers')
kv_cache.py  slot KV cache + the 4-D masks that let rows of different lengths share a forward
sampling.py  greedy / temperature / top-k / top-p with per-request seeds
text.py      incremental detokenization and stop strings
api.py       FastAPI app: OpenAI schemas, SSE streaming, errors, /metrics
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

from compressor.errors import UserError
from compressor.serve.engine import Engine, EngineConfig, RequestRejected, default_max_model_len
from compressor.serve.metrics import ServeMetrics

__all__ = ["Engine", "EngineConfig", "complete", "load_for_serving", "serve"]

log = logging.getLogger(__name__)


BACKENDS = ("auto", "torch", "onnx")


def load_for_serving(path: str, device: str = "auto", backend: str = "auto", key: str = "ARTIFACT", dtype: str = "auto",
                     cache_dequantized: bool = False):  # fmt: skip
    """(model, tokenizer): an ONNX artifact through onnxruntime (`backend` auto or onnx), a GPTQ
    artifact through compressor.runtime (its kernels; `dtype`, `cache_dequantized` as in
    models.load_any), else any model source (torch)."""
    from compressor.models import load_any
    from compressor.runtime import onnx as onnx_runtime

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not allowed: {', '.join(BACKENDS)}")
    p = Path(path)
    is_onnx = p.is_dir() and onnx_runtime.is_onnx_artifact(p)
    if backend == "onnx" and not is_onnx:
        raise UserError(f"{key} {path}: not an ONNX artifact (no model.onnx + onnx_config.json); the onnx backend runs "
                        f"one made by `compress export {path} --format onnx --output DIR`")  # fmt: skip
    if backend == "torch" and is_onnx:
        raise UserError(f"{key} {path}: an ONNX artifact runs only on the onnx backend (--backend onnx or auto); "
                        "serve the GPTQ artifact it was exported from for torch")  # fmt: skip
    return load_any(path, device, key=key, dtype=dtype, cache_dequantized=cache_dequantized)


def complete(model, tokenizer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """Token ids of one completion of `prompt`, by the serving engine on the calling thread:
    the server's forward (on CPU artifacts its decode step) and sampling, so greedy outputs are
    exactly what `compress serve` returns for the same prompt. Stops at end-of-sequence."""
    from compressor.serve.backends import backend_for
    from compressor.serve.sampling import SamplingParams

    total = len(prompt) + max_new_tokens
    context = getattr(backend_for(model).config, "max_position_embeddings", None)
    if context and total > context:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the prompt's {len(prompt)} tokens + {max_new_tokens} new ones "
                        f"exceed the model's context of {context} tokens")  # fmt: skip
    engine = Engine(model, tokenizer, EngineConfig(max_model_len=total, max_batch_size=1, max_queue=1))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    try:
        return engine.generate(prompt, params)[0]
    except RequestRejected as exc:  # e.g. --seed 2**70, --temperature inf: the option's error, not a traceback
        option = {"prompt": "PROMPT", "max_tokens": "--max-new-tokens"}.get(exc.param or "", f"--{(exc.param or '').replace('_', '-')}")
        raise UserError(f"{option}: {exc.message}") from None


def complete_text(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = False, temperature: float = 0.0,
                  seed: int = 0, where: str = "MODEL") -> str:  # fmt: skip
    """The completion of `prompt` as text (`complete` on its tokens); with `chat`, `prompt` is one
    user message rendered by the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where}: the tokenizer has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=not chat).input_ids
    return tokenizer.decode(complete(model, tokenizer, ids, max_new_tokens, temperature, seed), skip_special_tokens=True)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, so a busy port is a one-line error rather than a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def build(artifact: str, device: str = "auto", draft: str | None = None, served_model_name: str | None = None,
          shutdown_timeout: float | None = 60.0, backend: str = "auto", start_engine: bool = True, dtype: str = "auto",
          cache_dequantized: bool = False, max_request_bytes: int | None = None, **engine_options):  # fmt: skip
    """(app, engine): load the model (and draft), start the engine (unless told not to), wrap it in the FastAPI app.
    `dtype` and `cache_dequantized` apply to the model and the draft (models.load_any); request
    bodies over `max_request_bytes` (default: api.DEFAULT_MAX_REQUEST_BYTES) get 413."""
    from compressor.serve.api import DEFAULT_MAX_REQUEST_BYTES, create_app
    from compressor.serve.backends import backend_for

    model, tokenizer = load_for_serving(artifact, device, backend, dtype=dtype, cache_dequantized=cache_dequantized)
    draft_model = None
    if draft is not None:  # the draft runs on the served model's backend
        draft_backend = backend_for(model).kind
        from compressor.runtime import is_gptq_artifact

        draft_model, draft_tokenizer = load_for_serving(draft, device, draft_backend, key="--draft", dtype=dtype,
                                                        cache_dequantized=cache_dequantized and is_gptq_artifact(draft))  # fmt: skip
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--draft {draft}: its tokenizer differs from {artifact}'s; a draft must share the tokenizer")
    options = {k: v for k, v in engine_options.items() if v is not None}
    options.setdefault("max_model_len", default_max_model_len(model))
    metrics = ServeMetrics()
    engine = Engine(model, tokenizer, EngineConfig(**options), draft=draft_model, metrics=metrics)
    if start_engine:
        engine.start()
    name = served_model_name or Path(artifact.rstrip("/")).name or artifact
    limit = DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes
    app = create_app(engine, tokenizer, name, metrics, aliases=(artifact,), shutdown_timeout=shutdown_timeout, max_request_bytes=limit)
    return app, engine


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", draft: str | None = None,
          served_model_name: str | None = None, shutdown_timeout: float = 60.0, log_level: str = "info",
          backend: str = "auto", dtype: str = "auto", cache_dequantized: bool = False, max_request_bytes: int | None = None,
          **engine_options) -> None:  # fmt: skip
    """Serve until SIGINT/SIGTERM; SIGTERM stops admitting (503) and finishes in-flight requests first."""
    import uvicorn

    sock = _bind(host, port)  # before loading: a busy port fails in a second, not after the model loads
    app, engine = build(artifact, device, draft, served_model_name, shutdown_timeout, backend, start_engine=False, dtype=dtype,
                        cache_dequantized=cache_dequantized, max_request_bytes=max_request_bytes, **engine_options)  # fmt: skip

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain()  # requests on open connections now get 503; in-flight ones continue
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=shutdown_timeout)
    cfg = engine.config
    log.info(
        "serving %s on http://%s:%d (%s, batch %d, max-model-len %d%s)", artifact, host, sock.getsockname()[1],
        engine.backend, engine.slots, cfg.max_model_len, f", draft {draft} k={engine.k}" if draft else "",
    )  # fmt: skip
    # The engine runs on this (main) thread, the one that loaded the model (see Engine.run), and
    # uvicorn on a second thread. uvicorn installs no signal handlers off the main thread, so
    # SIGINT/SIGTERM land here: stop admitting, let uvicorn finish open requests (up to
    # --shutdown-timeout), after which the app's lifespan shuts the engine down and run() returns.
    server = DrainingServer(config)

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.shutdown(0)  # uvicorn is done (or failed to start): end the engine loop

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: server.handle_exit(signum, frame))
    web = threading.Thread(target=http, name="compressor-http", daemon=True)
    web.start()
    try:
        engine.run()
        web.join()
    finally:
        sock.close()
