"""The FastAPI application: OpenAI-shaped endpoints in front of one `Service` (model + engine).

`create_app(lm_or_factory, ServerConfig(...))` takes an already loaded `aded.Aded` (tests inject a
tiny model) or a zero-argument factory called at startup. The routes are in routes.py, the answers'
shapes in replies.py, the HTTP plumbing in http.py. Around them, outermost first: `RequestIds`
(every answer has an `x-request-id`), `CountRequests` (metrics), and `Guard` (Host, Origin and
CORS, API key, content type) before any route runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aded.server.errors import RequestError, error_response
from aded.server.guard import Guard
from aded.server.http import CountRequests, RequestIds
from aded.server.routes import router
from aded.server.schemas import error_payload
from aded.server.service import Service
from aded.server.tenants import STATE_PER

__all__ = ["ServerConfig", "create_app", "API_KEY_ENV", "ADMIN_KEY_ENV"]

log = logging.getLogger("aded.server")

API_KEY_ENV = "ADED_API_KEY"  # API keys when the config gives none (several: comma-separated)
ADMIN_KEY_ENV = "ADED_ADMIN_KEY"  # admin keys likewise


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
    admin_keys: tuple[str, ...] = ()  # keys that also read the whole server's /metrics and /health
    allowed_origins: tuple[str, ...] = ()  # web origins whose requests are served ("*": any)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the bound address and loopback ("*": any)
    state_per: str = "shared"  # learned state shared, or kept per API "key" or per request "salt"
    max_tenants: int = 64  # tenants' drafters kept in memory (least recently used dropped)
    aded_stats: bool | None = None  # the `aded` field in responses; None: off iff keys set and state shared
    parse_threads: int = 2  # threads that parse, template and tokenize request bodies
    body_timeout: float = 30.0  # seconds a request's body may take to arrive after its headers (then 408)
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive (then the connection closes)
    shutdown_timeout: float = 3.0  # seconds open connections are given after SIGTERM

    def __post_init__(self) -> None:
        if self.state_per not in STATE_PER:
            raise ValueError(f"state_per must be one of {', '.join(STATE_PER)}, got {self.state_per!r}")
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {self.save_interval}")
        if self.parse_threads < 1 or self.max_tenants < 1:
            raise ValueError("parse_threads and max_tenants must be at least 1")
        for name in ("body_timeout", "header_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")

    def resolved(self) -> ServerConfig:
        """API keys from the environment when none are given; checks what needs them."""
        keys = self.api_keys or _keys_from(API_KEY_ENV)
        admins = self.admin_keys or _keys_from(ADMIN_KEY_ENV)
        if self.state_per == "key" and not (keys or admins):
            raise ValueError(f"state_per 'key' needs API keys (the api_keys setting or {API_KEY_ENV})")
        if self.aded_stats and (keys or admins) and self.state_per == "shared":
            log.warning("the aded statistics are on with API keys and a shared learned state: how well a "
                        "request drafts tells a client what the others' outputs taught the drafter")
        return replace(self, api_keys=keys, admin_keys=admins)


def _keys_from(variable: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in os.environ.get(variable, "").split(",") if k.strip())


# ---------------------------------------------------------------------------- the app
def create_app(lm_or_factory: Any | Callable[[], Any], config: ServerConfig) -> FastAPI:
    """The app; with a loaded model its learned state is read here, so a bad `--state` fails
    before the port is bound."""
    from aded.api import Aded

    config = config.resolved()
    app = FastAPI(title="aded", lifespan=_lifespan(lm_or_factory, config), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.config = config
    app.state.service = Service(lm_or_factory, config) if isinstance(lm_or_factory, Aded) else None
    app.add_middleware(Guard, api_keys=config.api_keys + config.admin_keys, allowed_origins=config.allowed_origins,
                       allowed_hosts=config.allowed_hosts)
    app.add_middleware(CountRequests, record=lambda scope, path, status, seconds: _record(app, scope, path,
                                                                                          status, seconds))
    app.add_middleware(RequestIds)
    app.exception_handler(RequestError)(_request_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(Exception)(_server_error)
    app.include_router(router)
    return app


def _lifespan(lm_or_factory, config: ServerConfig):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.service is None:
            lm = await asyncio.to_thread(lm_or_factory)
            app.state.service = await asyncio.to_thread(Service, lm, config)
        service = app.state.service
        service.attach(asyncio.get_running_loop())
        await asyncio.to_thread(service.start)
        log.info("serving %s on %s with the %s drafter", config.model_name, service.lm.backend,
                 service.lm.drafter.name)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    return lifespan


def _record(app: FastAPI, scope: dict, path: str, status: int, seconds: float) -> None:
    service = app.state.service
    if service is not None:
        service.record_http(scope.get("state", {}).get("api_key"), path, status, seconds)


async def _request_error(request: Request, exc: RequestError):
    return error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_payload(message, kind), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(error_payload(f"invalid request: {exc.errors()}"), status_code=400)


async def _server_error(request: Request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(error_payload(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                        status_code=500)
