"""The OpenAI-compatible HTTP API (FastAPI) in front of the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Errors are OpenAI-shaped: {"error": {"message", "type",
"param", "code"}} with 400 for bad input (malformed JSON, wrong types, numbers out of range,
text that is not valid UTF-8), 404 for an unknown model, 413 for a body over
`max_request_bytes`, 429/503 with Retry-After when the server is full or shutting down.

One request must never hold up or fail others: every field is checked to the range the engine
and torch accept before the request reaches the engine, and tokenizing (seconds for a
megabyte-sized prompt) runs in a worker thread, not on the event loop that answers everyone.

Streaming uses server-sent events as OpenAI clients expect: `data: {chunk}\\n\\n` per piece of
text, an optional usage chunk (stream_options.include_usage), then `data: [DONE]\\n\\n`. A client
that disconnects cancels its sequence, which frees its batch slot before the next forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from compressor.serve.engine import INT64_MAX, INT64_MIN, Draining, Engine, EngineError, Output, Overloaded, RequestRejected
from compressor.serve.metrics import ServeMetrics
from compressor.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
DEFAULT_MAX_REQUEST_BYTES = 2 * 2**20  # room for a 128k-token prompt as text or as token ids


# ---------------------------------------------------------------------------------------- schemas
def _utf8(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer (or response) can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("string_unicode", f"not valid UTF-8 text (lone surrogate \\u{ord(text[exc.start]):04x} "
                                  f"at character {exc.start})") from None  # fmt: skip
    return text


Text = Annotated[StrictStr, AfterValidator(_utf8)]
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]  # what torch takes without overflowing


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored (clients send e.g. `user`)."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT64_MAX)] = -1  # not OpenAI's; vLLM's extension (-1 or 0: off)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Int64 | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1  # one choice per request
    presence_penalty: Annotated[StrictFloat, Field(ge=0.0, le=0.0, allow_inf_nan=False)] = 0.0  # penalties are not implemented
    frequency_penalty: Annotated[StrictFloat, Field(ge=0.0, le=0.0, allow_inf_nan=False)] = 0.0
    logprobs: Literal[False] | None = None  # not implemented
    ignore_eos: StrictBool = False  # vLLM's extension, for load tests with exact lengths


class CompletionRequest(_SamplingFields):
    prompt: Text | Annotated[list[Int64], Field(min_length=1)] | Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: Int64 | None = 16  # OpenAI's default for completions
    echo: Literal[False] = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None


class ChatRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int64 | None = None  # default: whatever the context leaves
    max_completion_tokens: Int64 | None = None
    logprobs: StrictBool | None = None
    top_logprobs: None = None


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON ({errors[0].get('ctx', {}).get('error', 'parse error')})", None
    # for a union (e.g. stop: str | list[str]) name the member that fits the input's type: prefer
    # a constraint error (too long, too large) over "should be a valid string"
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not ("[" in p or "-" in p or p in _UNION_TAGS)]  # union member tags
    param = ".".join(loc) or None
    got = first.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None), list, dict)) else repr(got)[:80]
    return f"{param or 'body'}: {first.get('msg', 'invalid value')} (got {shown})", param


def _engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, RequestRejected):
        return APIError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, Overloaded):
        return APIError(429, exc.message, "server_overloaded", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, Draining):
        return APIError(503, exc.message, "service_unavailable", code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
    raise exc


# ---------------------------------------------------------------------------------------- streaming
def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _CancelOnCloseResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` (finished, failed or client gone) and notices
    a disconnect while waiting for the next token, not only at the next write."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                streaming.result()  # re-raise what it raised; OSError means the client left
        except OSError:
            pass
        finally:
            for task in (streaming, watching):
                task.cancel()
            self.on_close()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            if hasattr(self.body_iterator, "aclose"):
                await self.body_iterator.aclose()


_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: requests by endpoint and status (plain ASGI, so streaming is untouched)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _LimitBody:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app parses it, at once
    when Content-Length says so, else as soon as the bytes received pass the limit (a chunked
    body). The body is read here and handed to the app whole (FastAPI reads it whole anyway). The
    server discards the rest of a refused body, so the client still reads the 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, f"the request body ({int(length)} bytes)")
        chunks, size, more = [], 0, True
        while more:  # counted even with a Content-Length: chunked framing would override it
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send, "the request body")
            more = message.get("more_body", False)
        pending: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal pending
            if pending is None:
                return await receive()  # after the body: disconnect notices for streaming responses
            message, pending = pending, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, what: str) -> None:
        message = f"{what} is over this server's limit of {self.limit} bytes"
        await JSONResponse(error_body(message, "invalid_request_error", None, "request_too_large"), status_code=413)(scope, receive, send)


async def _outputs(queue: asyncio.Queue) -> AsyncIterator[Output]:
    while True:
        out: Output = await queue.get()
        yield out
        if out.finish_reason:
            return


# ---------------------------------------------------------------------------------------- app
def create_app(engine: Engine, tokenizer, model_name: str, metrics: ServeMetrics, aliases: tuple[str, ...] = (),
               shutdown_timeout: float | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `engine` as model `model_name` (requests may also name an alias);
    request bodies over `max_request_bytes` get 413."""
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive number of bytes, got {max_request_bytes!r}")
    names = {model_name, *aliases}
    created = int(time.time())
    vocab = len(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="compressor", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    app.add_middleware(_LimitBody, limit=max_request_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)  # added last: outermost, so it counts the 413s too

    async def encode(text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`, tokenized in a worker thread (the tokenizer releases the GIL)."""
        return await asyncio.to_thread(lambda: tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "not_found_error",
                           "model", "model_not_found")  # fmt: skip

    def sampling(req: _SamplingFields, max_tokens: int) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            stop=stop, seed=req.seed, ignore_eos=req.ignore_eos,
        )  # fmt: skip

    def submit(prompt_ids: list[int], params: SamplingParams):
        """(sequence, queue of its outputs), or the OpenAI error for why not."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            seq = engine.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except EngineError as exc:
            raise _engine_error(exc) from None
        return seq, queue

    async def collect(request: Request, seq, queue: asyncio.Queue) -> tuple[str, str, int, int]:
        """(text, finish reason, prompt tokens, completion tokens); cancels `seq` if the client leaves."""
        async def gather():
            parts, last = [], None
            async for out in _outputs(queue):
                parts.append(out.text)
                last = out
            return "".join(parts), last

        task = asyncio.ensure_future(gather())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                engine.cancel(seq)
                task.cancel()
                raise APIError(499, "client closed the request")
        text, last = task.result()
        if last.finish_reason == "error":
            raise APIError(500, f"generation failed: {last.error}", "server_error")
        if last.finish_reason == "abort":
            raise APIError(503, "the request was aborted (server shutting down)", "service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        return text, last.finish_reason, last.prompt_tokens, last.completion_tokens

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def stream(seq, queue: asyncio.Queue, chunk: Callable[[str, str | None], dict], first: dict | None,
               include_usage: bool, envelope: dict) -> StreamingResponse:  # fmt: skip
        async def events() -> AsyncIterator[str]:
            if first is not None:
                yield sse(first)
            async for out in _outputs(queue):
                if out.finish_reason in ("error", "abort"):
                    message = f"generation failed: {out.error}" if out.error else "the request was aborted (server shutting down)"
                    yield sse(error_body(message, "server_error"))
                    break
                if out.text or out.finish_reason:
                    yield sse(chunk(out.text, out.finish_reason))
                if out.finish_reason and include_usage:
                    yield sse({**envelope, "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)})
            yield sse("[DONE]")

        return _CancelOnCloseResponse(events(), on_close=lambda: engine.cancel(seq), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    def resolve_max_tokens(asked: int | None, prompt_tokens: int) -> int:
        if asked is None:
            return max(1, min(engine.max_tokens, engine.config.max_model_len - prompt_tokens))
        return asked

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            prompt_ids = await encode(text, add_special_tokens=True)
        else:
            prompt_ids = req.prompt
            if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab - 1}]", param="prompt")
        seq, queue = submit(prompt_ids, sampling(req, resolve_max_tokens(req.max_tokens, len(prompt_ids))))
        envelope = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": req.model}
        if req.stream:
            def chunk(text: str, finish: str | None) -> dict:
                return {**envelope, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(seq, queue, chunk, None, include_usage, envelope)
        text, finish, p, c = await collect(request, seq, queue)
        return {**envelope, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage(p, c)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model {model_name!r} has no chat template; use /v1/completions", param="messages")
        messages = [
            {"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)}
            for m in req.messages
        ]
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template rejects the conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template rejected them ({exc})", param="messages") from None
        prompt_ids = await encode(text, add_special_tokens=False)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        seq, queue = submit(prompt_ids, sampling(req, resolve_max_tokens(asked, len(prompt_ids))))
        envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": req.model}
        if req.stream:
            chunk_envelope = {**envelope, "object": "chat.completion.chunk"}

            def chunk(text: str, finish: str | None) -> dict:
                delta = {"content": text} if text else {}
                return {**chunk_envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            first = {**chunk_envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(seq, queue, chunk, first, include_usage, chunk_envelope)
        text, finish, p, c = await collect(request, seq, queue)
        message = {"role": "assistant", "content": text}
        return {**envelope, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}], "usage": usage(p, c)}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "compressor", "max_model_len": engine.config.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        body: dict[str, Any] = {"status": "ok" if engine.accepting else "draining", "running": engine.running, "waiting": engine.waiting}
        return JSONResponse(body, status_code=200 if engine.accepting else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
