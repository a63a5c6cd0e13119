"""Who may talk to the server: checks made before any route runs (pure ASGI middleware).

A server on loopback is still reachable by every web page the user opens: a page can POST a
`text/plain` body (no CORS preflight) or rebind its own DNS name to 127.0.0.1. So, by default:

- `Host` must name this server: the address the connection came in on, `localhost`, `127.0.0.1`
  or `[::1]`, with the bound port; more names (a reverse proxy's) through `allowed_hosts`
  ("name" for any port, "name:port", or "*"). Otherwise 403: DNS rebinding.
- A request with an `Origin` header (browsers send one on cross-site requests) is refused (403)
  unless that origin is in `allowed_origins` ("*" allows any).
- With API keys set, every `/v1` route and `/metrics` (whose counters follow every client's
  requests) need `Authorization: Bearer <key>` (compared in constant time); otherwise 401.
  `/health` answers without a key, but only that the server is alive (probes carry no key); a
  key, if sent, must be right. The matching key is left in `scope["state"]["api_key"]`.
- A POST body must be `application/json` (415 otherwise): `text/plain` is how a page would sneak in.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.datastructures import Headers

from aded.server.errors import RequestError, error_response

__all__ = ["Guard"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Guard:
    def __init__(self, app, api_keys: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.any_origin = "*" in allowed_origins
        self.origins = {origin.rstrip("/").lower() for origin in allowed_origins}
        self.any_host = "*" in allowed_hosts
        self.hosts = {_split_host(host, None) for host in allowed_hosts if host != "*"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
        except RequestError as exc:
            return await error_response(exc)(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, scope: dict[str, Any]) -> None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self._host_allowed(host, scope):
            raise RequestError(f"the Host header {host!r} does not name this server (a DNS rebinding guard); "
                               "start the server with the name among its allowed hosts", 403,
                               code="host_not_allowed", type_="permission_error")
        origin = headers.get("origin")
        if origin is not None and not (self.any_origin or origin.rstrip("/").lower() in self.origins):
            raise RequestError(f"requests from the web origin {origin!r} are not allowed; start the server "
                               "with that origin among its allowed origins", 403,
                               code="origin_not_allowed", type_="permission_error")
        path = scope["path"]
        if self.api_keys and (path.startswith("/v1") or path == "/metrics"
                              or (path == "/health" and "authorization" in headers)):
            scope.setdefault("state", {})["api_key"] = self._api_key(headers.get("authorization", ""))
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                raise RequestError(f"the request body must be application/json, not {media_type or 'untyped'!r}",
                                   415, code="unsupported_media_type")

    def _host_allowed(self, host: str, scope: dict[str, Any]) -> bool:
        if self.any_host:
            return True
        bound_address, bound_port = scope.get("server") or (None, None)
        default_port = 443 if scope.get("scheme") == "https" else 80
        name, port = _split_host(host, default_port)
        if (name, port) in self.hosts or (name, None) in self.hosts:
            return True
        return port == bound_port and (name in LOOPBACK_NAMES or name == bound_address)

    def _api_key(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        matched = None
        for key in self.api_keys:  # every key compared, in constant time each
            if hmac.compare_digest(given, key):
                matched = key
        if scheme.lower() != "bearer" or matched is None:
            raise RequestError("missing or incorrect API key: send Authorization: Bearer <key>", 401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return matched.decode()


def _split_host(host: str, default_port: int | None) -> tuple[str, int | None]:
    """("name", port) of a Host header or an allowed-hosts entry; IPv6 without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = host.partition(":")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = -1  # matches nothing
    return name, port
