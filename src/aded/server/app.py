"""The FastAPI application: OpenAI-shaped endpoints in front of one `Engine`.

`create_app(lm_or_factory, ServerConfig(...))` takes an already loaded `aded.Aded` (tests inject a
tiny model) or a zero-argument factory called at startup. Handlers parse and validate on the event
loop (bodies, JSON, fields, model name, context length), tokenise with their own copy of the
tokenizer (the worker's copy is busy decoding), then hand the token ids to the engine.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aded.decoding import sampling_fields
from aded.server.engine import Engine, GenerationRequest, Job, RequestError
from aded.server.metrics import Metrics
from aded.server.schemas import (AdedStats, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                 CompletionRequest, ModelList, TextCompletion, Usage, error_payload)
from aded.server.state import StateFile, StateSaver, restore

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("aded.server")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients send as `model` and see in /v1/models
    state_path: Path | None = None
    save_interval: float = 60.0  # seconds between saves of the learned state
    max_queue: int = 64  # requests queued or running before 429
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_draft_nodes: int = 24


class _Server:
    """What the handlers share: the model, its engine, metrics and state keeping."""

    def __init__(self, lm, config: ServerConfig) -> None:
        self.lm = lm
        self.config = config
        self.created = int(time.time())
        self.encoder = copy.deepcopy(lm.tokenizer)  # for the event loop; never shared with the worker
        self.context = int(lm.runner.max_positions)
        self.vocab_size = int(lm.runner.vocab_size)
        self.metrics = Metrics(config.model_name, lm.drafter.name)
        self.engine = Engine(lm, config.max_queue, on_finish=self._finished)
        self.metrics.gauges["aded_queue_depth"] = lambda: self.engine.pending
        self.saver: StateSaver | None = None
        self.state_note = "no --state file: learned state lives in memory only"

    def start(self) -> None:
        if self.config.state_path is not None:
            from aded.store.datastore import tokenizer_identity

            state_file = StateFile(self.config.state_path, self.lm.drafter.name,
                                   tokenizer_identity(self.lm.tokenizer))
            self.state_note = restore(self.lm, state_file)
            log.info("%s", self.state_note)
            self.saver = StateSaver(self.lm, self.engine, state_file, self.config.save_interval, self.metrics)
        self.engine.start()
        if self.saver is not None:
            self.saver.start()

    def stop(self) -> None:
        self.engine.stop()
        if self.saver is not None:
            self.saver.stop()

    def _finished(self, job: Job, completion) -> None:
        if completion is not None:
            outcome = "finished"
        else:
            outcome = "cancelled" if job.cancelled.is_set() else "failed"
        stats = completion.stats if completion is not None else None
        self.metrics.record_generation(outcome, len(job.request.prompt_ids), stats)

    # ------------------------------------------------------------------ request -> token ids
    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise RequestError(f"the model {model!r} does not exist here; this server serves "
                               f"{self.config.model_name!r}", 404, param="model", code="model_not_found")

    def chat_ids(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.encoder, "chat_template", None):
            raise RequestError("this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            ids = self.encoder.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        except Exception as exc:  # the template is the model's Jinja code: any error is the input's
            raise RequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        return [int(t) for t in ids]

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            return list(self.encoder(request.prompt, add_special_tokens=True)["input_ids"])
        too_big = [t for t in request.prompt if t >= self.vocab_size]
        if too_big:
            raise RequestError(f"token id {too_big[0]} is outside the vocabulary (size {self.vocab_size})",
                               param="prompt")
        return list(request.prompt)

    def generation(self, request, prompt_ids: list[int], param: str) -> GenerationRequest:
        """Sampling parameters checked against the context, as `Aded.stream` keyword arguments."""
        if not prompt_ids:
            raise RequestError("the prompt is empty after tokenisation", param=param)
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context holds "
                               f"{self.context} (and at least one token must be generated)",
                               param=param, code="context_length_exceeded")
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestError(f"max_tokens is {request.max_tokens}, but the prompt's {len(prompt_ids)} tokens "
                               f"leave room for {room} in this model's context of {self.context}",
                               param="max_tokens", code="context_length_exceeded")
        max_tokens = request.max_tokens or min(self.config.default_max_tokens, room)
        temperature = 1.0 if request.temperature is None else request.temperature
        generation = {"max_new_tokens": max_tokens, **sampling_fields(temperature),
                      "top_p": request.top_p, "top_k": request.top_k,
                      "seed": request.seed, "max_draft_nodes": self.config.max_draft_nodes}
        try:
            self.lm.generation_config(**dict(generation))  # validates the combination
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return GenerationRequest(prompt_ids, generation, tuple(request.stop_list()), request.stream)

    def stats(self, completion) -> AdedStats:
        s = completion.stats
        return AdedStats(mean_accepted_tokens=round(s.mean_accepted_tokens, 4), steps=s.steps,
                         draft_nodes=s.draft_nodes, decode_tokens_per_s=round(s.decode_tokens_per_s, 3),
                         drafter=self.lm.drafter.name)


# ---------------------------------------------------------------------------- plumbing
async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes; the limit is {limit}", 413,
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body exceeds the limit of {limit} bytes", 413,
                               code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _validated(model: type, body: dict[str, Any]):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise RequestError(f"invalid request: {problems}", param=where,
                           code="missing_field" if first["type"] == "missing" else "invalid_value") from exc


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(error_payload(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


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
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


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
    holder: dict[str, _Server] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from aded.api import Aded

        lm = lm_or_factory if isinstance(lm_or_factory, Aded) else await asyncio.to_thread(lm_or_factory)
        server = _Server(lm, config)
        await asyncio.to_thread(server.start)
        holder["server"] = server
        log.info("serving %s on %s with the %s drafter", config.model_name, lm.backend, lm.drafter.name)
        try:
            yield
        finally:
            await asyncio.to_thread(server.stop)

    app = FastAPI(title="aded", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, get_metrics=lambda: holder["server"].metrics if holder else None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error_response(exc)

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
    async def health():
        server = holder["server"]
        return {"status": "ok", "model": config.model_name, "backend": server.lm.backend,
                "drafter": server.lm.drafter.name,
                "queue": server.engine.pending, "completed": server.engine.completed,
                "mean_accepted_tokens": round(server.metrics.mean_accepted_tokens(), 4),
                "state": server.state_note}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(holder["server"].metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        server = holder["server"]
        return ModelList(data=[{"id": config.model_name, "created": server.created}]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server = holder["server"]
        body = _validated(ChatCompletionRequest, await _json_body(request, config.max_body_bytes))
        server.check_model(body.model)
        job_request = server.generation(body, server.chat_ids(body), "messages")
        job = server.engine.submit(job_request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            completion = await _result(job, request)
            return ChatCompletion(id=rid, created=created, model=config.model_name, usage=_usage(completion),
                                  choices=[{"message": {"content": completion.text},
                                            "finish_reason": completion.finish_reason}],
                                  aded=server.stats(completion)).model_dump(exclude_none=True)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=config.model_name,
                                            choices=[{"delta": delta, "finish_reason": finish}],
                                            **extra).model_dump(exclude_none=True))

        def final(completion) -> list[str]:
            out = [chunk({}, completion.finish_reason, aded=server.stats(completion))]
            if body.include_usage():
                out.append(_sse(ChatCompletionChunk(id=rid, created=created, model=config.model_name, choices=[],
                                                    usage=_usage(completion)).model_dump(exclude_none=True)))
            return out

        return _streaming(job, [chunk({"role": "assistant", "content": ""})],
                          lambda piece: chunk({"content": piece}), final)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server = holder["server"]
        body = _validated(CompletionRequest, await _json_body(request, config.max_body_bytes))
        server.check_model(body.model)
        job_request = server.generation(body, server.completion_ids(body), "prompt")
        job = server.engine.submit(job_request)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def text(piece: str, finish: str | None = None, **extra) -> dict:
            return TextCompletion(id=rid, created=created, model=config.model_name,
                                  choices=[{"text": piece, "finish_reason": finish}],
                                  **extra).model_dump(exclude_none=True)

        if not body.stream:
            completion = await _result(job, request)
            return text(completion.text, completion.finish_reason, usage=_usage(completion),
                        aded=server.stats(completion))

        def final(completion) -> list[str]:
            extra = {"usage": _usage(completion)} if body.include_usage() else {}
            return [_sse(text("", completion.finish_reason, aded=server.stats(completion), **extra))]

        return _streaming(job, [], lambda piece: _sse(text(piece)), final)

    return app


def _streaming(job: Job, opening: list[str], piece_event: Callable[[str], str],
               final_events: Callable[[Any], list[str]]) -> StreamingResponse:
    """Server-sent events of one job; a client that goes away cancels it (frees the worker)."""

    async def events():
        try:
            for event in opening:
                yield event
            while True:
                kind, value = await job.next_event()
                if kind == "piece":
                    yield piece_event(value)
                elif kind == "done":
                    for event in final_events(value):
                        yield event
                    break
                else:
                    yield _sse(error_payload(value.message, value.type, value.param, value.code))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op when finished; stops generation when the client left

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
