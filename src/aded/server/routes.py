"""The routes: one handler each, reading what it needs of the `Service` (a FastAPI dependency).

Each generating handler reads the body first (a time limit, `read_body`), then takes a queue slot
(`Engine.admit`: a request counts against the queue only once its body is in), has the body parsed
and tokenized on a parsing thread, and hands the token ids to the engine; the event loop itself
only relays bytes, so `/health` and streams never wait on a body. GET routes answer HEAD too (the
same status and headers, no body).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from aded.server.http import charset_of, read_body, results
from aded.server.replies import ChatReply, TextReply
from aded.server.service import Service

__all__ = ["router"]

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]


def _key(request: Request) -> str | None:
    """The API key the guard matched (None when keys are not in use)."""
    return getattr(request.state, "api_key", None)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request, service: ServiceDep) -> dict[str, Any]:
    """Liveness for anyone; what the server did, for key holders (their own share of it)."""
    return service.health(_key(request), authenticated="authorization" in request.headers)


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(request: Request, service: ServiceDep) -> PlainTextResponse:
    return PlainTextResponse(service.metrics_text(_key(request)), media_type="text/plain; version=0.0.4")


@router.api_route("/v1/models", methods=["GET", "HEAD"])
async def models(service: ServiceDep) -> dict[str, Any]:
    return {"object": "list", "data": [service.model_card()]}


@router.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
async def model(model_id: str, service: ServiceDep) -> dict[str, Any]:
    service.check_model(model_id)
    return service.model_card()


async def _submit(service: Service, request: Request, endpoint: str):
    """Read the body, then take a queue slot, parse off the loop, queue: (body, generation, job)."""
    raw = await read_body(request, service.config.max_body_bytes, service.config.body_timeout, service.stopping)
    ticket = service.engine.admit()
    try:
        body, generation = await service.prepare(raw, endpoint, _key(request), charset_of(request))
        return body, generation, service.engine.submit(generation, ticket)
    finally:
        ticket.release()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: ServiceDep):
    return await _answer(service, request, "chat", ChatReply)


@router.post("/v1/completions")
async def completions(request: Request, service: ServiceDep):
    return await _answer(service, request, "completions", TextReply)


async def _answer(service: Service, request: Request, endpoint: str, reply_kind):
    """Queue the request, then answer in `reply_kind`'s shape: streamed, or whole once done."""
    body, generation, job = await _submit(service, request, endpoint)
    reply = reply_kind(service, body, generation, request.state.request_id)
    if body.stream:
        return reply.stream(job)
    return reply.whole(await results(job, request, generation.n))


async def _parsed(service: Service, request: Request, parse) -> dict[str, Any]:
    """A body answered by `parse` on a parsing thread, holding a queue slot meanwhile."""
    raw = await read_body(request, service.config.max_body_bytes, service.config.body_timeout, service.stopping)
    ticket = service.engine.admit()
    try:
        return await parse(raw, charset_of(request))
    finally:
        ticket.release()


@router.post("/tokenize")
async def tokenize(request: Request, service: ServiceDep) -> dict[str, Any]:
    """vLLM's: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}."""
    return await _parsed(service, request, service.tokenize)


@router.post("/detokenize")
async def detokenize(request: Request, service: ServiceDep) -> dict[str, Any]:
    """vLLM's: {"tokens"} -> {"prompt"}."""
    return await _parsed(service, request, service.detokenize)

