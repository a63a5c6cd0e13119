"""The FastAPI application: OpenAI-shaped endpoints in front of one `Service` (model + engine).

`create_app(lm_or_factory, ServerConfig(...))` takes an already loaded `aded.Aded` (tests inject a
tiny model) or a zero-argument factory called at startup. Each /v1 handler takes a queue slot,
reads the body, has it parsed and tokenized on a parsing thread, and hands the token ids to the
engine; the event loop itself only relays bytes, so `/health` and streams never wait on a body.
`Guard` checks Host, Origin, API key and content type before any route runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from aded.server.engine import Job
from aded.server.errors import RequestError, error_response
from aded.server.guard import Guard
from aded.server.logprobs import chat_logprobs, text_logprobs
from aded.server.metrics import Metrics
from aded.server.schemas import (ChatCompletion, ChatCompletionChunk, ModelCard, ModelList, PromptTokensDetails,
                                 TextCompletion, Usage, error_payload)
from aded.server.service import Service
from aded.server.tenants import STATE_PER
from aded.tools import TOOL_CALL_OPEN

__all__ = ["ServerConfig", "create_app", "API_KEY_ENV"]

log = logging.getLogger("aded.server")

API_KEY_ENV = "ADED_API_KEY"  # API keys when the config gives none (several: comma-separated)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients send as `model` and see in /v1/models
    state_path: Path | None = None
    save_interval: float = 0.0  # least seconds between saves of the learned state (0: after each request)
    max_queue: int = 64  # requests being parsed, queued or running before 429
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_draft_nodes: int = 24
    api_keys: tuple[str, ...] = ()  # bearer tokens accepted on /v1 (none: no authentication)
    allowed_origins: tuple[str, ...] = ()  # web origins whose requests are served ("*": any)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the bound address and loopback ("*": any)
    state_per: str = "shared"  # learned state shared, or kept per API "key" or per request "salt"
    max_tenants: int = 64  # tenants' drafters kept in memory (least recently used dropped)
    aded_stats: bool | None = None  # the `aded` field in responses; None: off iff keys set and state shared
    parse_threads: int = 2  # threads that parse, template and tokenize request bodies

    def __post_init__(self) -> None:
        if self.state_per not in STATE_PER:
            raise ValueError(f"state_per must be one of {', '.join(STATE_PER)}, got {self.state_per!r}")
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {self.save_interval}")
        if self.parse_threads < 1 or self.max_tenants < 1:
            raise ValueError("parse_threads and max_tenants must be at least 1")

    def resolved(self) -> "ServerConfig":
        """API keys from the environment when none are given; checks what needs them."""
        keys = self.api_keys or tuple(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())
        if self.state_per == "key" and not keys:
            raise ValueError(f"state_per 'key' needs API keys (the api_keys setting or {API_KEY_ENV})")
        return replace(self, api_keys=keys)


# ---------------------------------------------------------------------------- plumbing
async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes; the limit is {limit}", 413,
                           code="request_too_large")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body exceeds the limit of {limit} bytes", 413,
                                   code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left mid-upload: nothing went wrong here
        raise RequestError("the client disconnected before sending the whole body", 499,
                           code="client_disconnected") from None
    return b"".join(chunks)


async def _submit(service: Service, request: Request, endpoint: str):
    """Admit (a queue slot), read, parse off the loop, queue: (request, generation, job)."""
    ticket = service.engine.admit()
    try:
        raw = await _read_body(request, service.config.max_body_bytes)
        body, generation = await service.prepare(raw, endpoint, getattr(request.state, "api_key", None))
        return body, generation, service.engine.submit(generation, ticket)
    finally:
        ticket.release()


async def _result(job: Job, request: Request):
    """Wait for a non-streaming job, cancelling it if the client disconnects meanwhile."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.next_event(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise RequestError("the client disconnected", 499) from None
            continue
        if kind == "done":
            return value
        if kind == "error":
            raise value


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(completion) -> Usage:
    prompt, generated = len(completion.prompt_token_ids), len(completion.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=completion.stats.cached_prompt_tokens))


class _CountRequests:
    """ASGI middleware counting requests by endpoint and status (pure ASGI: streaming and
    disconnect detection pass through untouched)."""

    def __init__(self, app, get_metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.get_metrics = get_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                metrics = self.get_metrics()
                if metrics is not None:
                    path = scope["path"] if scope["path"] in _ROUTES else "other"
                    metrics.record_http(path, status["code"], time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counting_send)


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


# ---------------------------------------------------------------------------- the app
def create_app(lm_or_factory: Union[Any, Callable[[], Any]], config: ServerConfig) -> FastAPI:
    """The app; with a loaded model its learned state is read here, so a bad `--state` fails
    before the port is bound."""
    from aded.api import Aded

    config = config.resolved()
    holder: dict[str, Service] = {}
    if isinstance(lm_or_factory, Aded):
        holder["service"] = Service(lm_or_factory, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if "service" not in holder:
            lm = await asyncio.to_thread(lm_or_factory)
            holder["service"] = await asyncio.to_thread(Service, lm, config)
        service = holder["service"]
        await asyncio.to_thread(service.start)
        log.info("serving %s on %s with the %s drafter", config.model_name, service.lm.backend,
                 service.lm.drafter.name)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="aded", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_keys=config.api_keys, allowed_origins=config.allowed_origins,
                       allowed_hosts=config.allowed_hosts)
    app.add_middleware(_CountRequests, get_metrics=lambda: holder["service"].metrics if holder else None)
    if config.allowed_origins:  # answers browsers' preflights for the origins allowed
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_payload(message, kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_payload(f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_payload(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health(request: Request):
        service = holder["service"]
        if config.api_keys and getattr(request.state, "api_key", None) is None:
            return {"status": "ok"}  # liveness for probes; what the server did is for key holders
        return {"status": "ok", "model": config.model_name, "backend": service.lm.backend,
                "drafter": service.lm.drafter.name,
                "queue": service.engine.pending, "completed": service.engine.completed,
                "mean_accepted_tokens": round(service.metrics.mean_accepted_tokens(), 4),
                "state": service.state_note, "state_per": config.state_per, "tenants": service.tenants.count}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(holder["service"].metrics.render(), media_type="text/plain; version=0.0.4")

    def card() -> ModelCard:
        return ModelCard(id=config.model_name, created=holder["service"].created)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise RequestError(f"the model {model_id!r} does not exist here; this server serves "
                               f"{config.model_name!r}", 404, param="model", code="model_not_found")
        return card().model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service = holder["service"]
        body, generation, job = await _submit(service, request, "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        def logprobs(entries) -> dict:
            return {} if entries is None else {"logprobs": chat_logprobs(service.token_texts, entries)}

        if not body.stream:
            completion = await _result(job, request)
            calls = completion.tool_calls or None
            out = ChatCompletion(id=rid, created=created, model=config.model_name, usage=_usage(completion),
                                 choices=[{"message": {"content": completion.content, "tool_calls": calls},
                                           "finish_reason": completion.finish_reason,
                                           **logprobs(completion.logprobs)}],
                                 aded=service.stats(completion, generation.tenant)).model_dump(exclude_none=True)
            out["choices"][0]["message"]["content"] = completion.content  # null stays null, as OpenAI's
            return out

        def chunk(delta: dict, finish: str | None = None, entries=None, **extra) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=config.model_name,
                                            choices=[{"delta": delta, "finish_reason": finish, **logprobs(entries)}],
                                            **extra).model_dump(exclude_none=True))

        calls = _CallHolder() if generation.generation.get("tools") and \
            generation.generation.get("tool_choice") != "none" else None

        def piece_event(piece: str, entries) -> str | None:
            if calls is None:
                return chunk({"content": piece}, None, entries)
            shown = calls.take(piece, entries)
            return chunk({"content": shown}, None, entries) if shown else None

        def final(completion, entries) -> list[str]:
            out = []
            if calls is not None:
                entries = calls.held_entries(entries)
                delta = calls.finish(completion)
                if delta:
                    out.append(chunk(delta))
            out.append(chunk({}, completion.finish_reason, entries,
                             aded=service.stats(completion, generation.tenant)))
            if body.include_usage():
                out.append(_sse(ChatCompletionChunk(id=rid, created=created, model=config.model_name, choices=[],
                                                    usage=_usage(completion)).model_dump(exclude_none=True)))
            return out

        return _streaming(job, [chunk({"role": "assistant", "content": ""})], piece_event, final)

    @app.post("/v1/completions")
    async def completions(request: Request):
        service = holder["service"]
        body, generation, job = await _submit(service, request, "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        offset = [0]  # where the next token's text starts, for `text_offset`

        def text(piece: str, finish: str | None = None, entries=None, **extra) -> dict:
            choice = {"text": piece, "finish_reason": finish}
            if entries is not None:
                choice["logprobs"] = text_logprobs(service.token_texts, entries, offset[0])
                offset[0] += sum(len(token) for token in choice["logprobs"].tokens)
            return TextCompletion(id=rid, created=created, model=config.model_name, choices=[choice],
                                  **extra).model_dump(exclude_none=True)

        if not body.stream:
            completion = await _result(job, request)
            return text(completion.text, completion.finish_reason, completion.logprobs, usage=_usage(completion),
                        aded=service.stats(completion, generation.tenant))

        def final(completion, entries) -> list[str]:
            extra = {"usage": _usage(completion)} if body.include_usage() else {}
            return [_sse(text("", completion.finish_reason, entries,
                              aded=service.stats(completion, generation.tenant), **extra))]

        return _streaming(job, [], lambda piece, entries: _sse(text(piece, None, entries)), final)

    return app


class _CallHolder:
    """Streamed chat text with tools rendered: text is relayed until a tool call may have begun
    (`<tool_call>`, or an answer that opens with "{", which small models write as a bare call),
    then held; at the end the calls come in one delta (`tool_calls`, each with its index), or, when
    there were none, the held text as content. Text after a call is in the non-streamed content only."""

    def __init__(self) -> None:
        self.sent = ""  # text relayed
        self.held = ""  # text not relayed (a call may have begun)
        self.entries: list = []  # logprobs of the held text's tokens
        self.holding = False

    def take(self, piece: str, entries) -> str:
        """What of `piece` to relay now."""
        if self.holding:
            self.held += piece
            self.entries += entries or []
            return ""
        text = self.held + piece
        start = text.find(TOOL_CALL_OPEN)
        if start < 0 and not (self.sent + text).strip().startswith("{"):
            start = next((i for i in range(max(0, len(text) - len(TOOL_CALL_OPEN) + 1), len(text))
                          if TOOL_CALL_OPEN.startswith(text[i:])), len(text))  # a partial marker waits
            shown, self.held = text[:start], text[start:]
        else:
            self.holding = True
            start = 0 if start < 0 else start
            shown, self.held = text[:start], text[start:]
        self.sent += shown
        if not shown:  # a piece not relayed: its tokens' logprobs come with the final chunk
            self.entries += entries or []
        return shown

    def held_entries(self, rest):
        """The logprobs for the final chunk: those of the pieces held back, and `rest`."""
        return (self.entries + list(rest or [])) or None

    def finish(self, completion) -> dict[str, Any]:
        """The last delta: the calls, or the text still held when there were none."""
        if completion.tool_calls:
            return {"tool_calls": [{"index": i, **call} for i, call in enumerate(completion.tool_calls)]}
        return {"content": self.held} if self.held else {}


def _streaming(job: Job, opening: list[str], piece_event: Callable[[str, Any], str | None],
               final_events: Callable[[Any, Any], list[str]]) -> StreamingResponse:
    """Server-sent events of one job; a client that goes away cancels it (frees the worker).

    Each piece's event carries the logprobs of the ids committed since the previous piece (None
    when not asked for); the final events carry those of the ids committed after the last piece."""

    async def events():
        num_sent = 0  # logprobs relayed so far
        try:
            for event in opening:
                yield event
            while True:
                kind, value = await job.next_event()
                if kind == "piece":
                    piece, entries = value
                    num_sent += len(entries or ())
                    event = piece_event(piece, entries)
                    if event is not None:  # None: the piece is held back
                        yield event
                elif kind == "done":
                    rest = value.logprobs[num_sent:] if value.logprobs else None
                    rest = rest or None  # none left: the final chunk has logprobs null, as OpenAI's
                    for event in final_events(value, rest):
                        yield event
                    break
                else:
                    yield _sse(value.payload())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op when finished; stops generation when the client left

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
