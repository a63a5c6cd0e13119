"""HTTP plumbing under the routes: request ids, counting, reading bodies, waiting for results.

- `RequestIds` (pure ASGI, outermost): every answer carries an `x-request-id` header, the
  client's own when it sent a usable one (visible ASCII, at most 128 characters), else a new one;
  the handlers use it as the suffix of the response id (`chatcmpl-<id>`), as vLLM does.
- `CountRequests` (pure ASGI): requests by endpoint and status into the metrics of the key that
  made them (streaming and disconnect detection pass through untouched).
- `read_body`: the body, within a size limit and a time limit (413, 408), a client that leaves
  mid-upload a quiet 499.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect, Request

from aded.server.engine import Job
from aded.server.errors import RequestError

__all__ = ["RequestIds", "CountRequests", "ROUTES", "read_body", "charset_of", "results"]

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
          "/detokenize"}
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")


class RequestIds:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given is not None and _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class CountRequests:
    def __init__(self, app, record: Callable[[dict, str, int, float], None]) -> None:
        self.app = app
        self.record = record  # (scope, endpoint, status, seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def counting_send(message):
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in ROUTES else "other"
                self.record(scope, path, message["status"], time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counting_send)


async def read_body(request: Request, limit: int, timeout: float, stopping: asyncio.Event | None = None) -> bytes:
    """The whole body: 413 past `limit` bytes, 408 when it has not all arrived `timeout` seconds
    after the headers (a stalled upload holds nothing longer), 499 when the client left, 503 as
    soon as `stopping` is set (the server shuts down whatever its clients do)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes; the limit is {limit}", 413,
                           code="request_too_large")
    reading = asyncio.ensure_future(_collect(request, limit))
    waiting: set[asyncio.Future[Any]] = {reading}
    if stopping is not None:
        waiting.add(asyncio.ensure_future(stopping.wait()))
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            if not task.done():
                task.cancel()
    if reading.done() and not reading.cancelled():
        return reading.result()  # the body, or its RequestError
    if stopping is not None and stopping.is_set():
        raise RequestError("the server is shutting down", 503, type_="server_error", headers={"Connection": "close"})
    raise RequestError(f"the request body did not arrive within {timeout:g} s", 408, code="request_timeout",
                       headers={"Connection": "close"})


async def _collect(request: Request, limit: int) -> bytes:
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


def charset_of(request: Request) -> str | None:
    """The `charset` parameter of the request's Content-Type, if any."""
    _, _, params = request.headers.get("content-type", "").partition(";")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


async def results(job: Job, request: Request, n: int) -> list[Any]:
    """The completions of a non-streaming job, cancelling it if the client disconnects meanwhile."""
    completions: list[Any] = [None] * n
    finished = 0
    while finished < n:
        try:
            kind, value = await asyncio.wait_for(job.next_event(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise RequestError("the client disconnected", 499) from None
            continue
        if kind == "done":
            index, completion = value
            completions[index] = completion
            finished += 1
        elif kind == "error":
            raise value
    return completions
