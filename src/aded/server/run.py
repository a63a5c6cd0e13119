"""Serving an app with uvicorn, with the time limits a server facing untrusted clients needs.

uvicorn limits how long an idle keep-alive connection stays open, but not how long a request's
headers may take: a client that connects and sends a byte now and then would hold its connection
(and, before, a queue slot) for ever. `serve` runs uvicorn's h11 protocol with a header timer
(`ServerConfig.header_timeout`: the headers of a request must all arrive within it, or the
connection is closed); the body has its own limit (`body_timeout`, a 408, in http.py).

On SIGTERM (or Ctrl-C) the server stops within a few seconds whatever its clients do: the service
is told at once (`Service.begin_shutdown`: the running request and the queued ones end with a 503,
bodies still arriving are answered 503), uvicorn gives open connections `shutdown_timeout`
seconds, then the worker is stopped and what the drafters learned is saved.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["serve"]

log = logging.getLogger("aded.server")


def serve(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Run `app` (from `create_app`) on host:port until SIGTERM or Ctrl-C."""
    import uvicorn

    config = app.state.config
    server_config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   http=timed_h11(config.header_timeout),
                                   timeout_graceful_shutdown=config.shutdown_timeout)
    _server(server_config, lambda: _begin_shutdown(app)).run()


def _begin_shutdown(app: Any) -> None:
    """From the signal handler: schedule the service's shutdown on its event loop."""
    service = app.state.service
    loop = getattr(service, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(service.begin_shutdown)


def _server(config, on_exit):
    """A uvicorn server that calls `on_exit()` as soon as a signal asks it to exit."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            on_exit()

    return Server(config)


def timed_h11(header_timeout: float):
    """uvicorn's h11 protocol class, closing a connection whose request headers take longer than
    `header_timeout` seconds to arrive (from the connection, or from the first byte of a next
    request on a kept-alive one)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are in
                self._disarm()
            elif self.cycle is None or self.cycle.response_complete:  # a next request's headers are arriving
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                log.info("closing a connection whose request headers took over %g s", header_timeout)
                self.transport.close()

    return TimedH11Protocol
