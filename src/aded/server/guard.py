"""Who may talk to the server: checks made before any route runs (pure ASGI middleware).

A server on loopback is still reachable by every web page the user opens: a page can POST a
`text/plain` body (no CORS preflight) or rebind its own DNS name to 127.0.0.1. So, by default:

- `Host` must name this server: the address the connection came in on, `localhost`, `127.0.0.1`
  or `[::1]`, with the bound port; more names (a reverse proxy's) through `allowed_hosts`
  ("name" for any port, "name:port", or "*"). Otherwise 403: DNS rebinding.
- A request with an `Origin` header (browsers send one on cross-site requests) is refused (403)
  unless that origin is in `allowed_origins` ("*" allows any). Origins are compared as browsers
  mean them: case aside, without a trailing slash, a default port (:80, :443) the same as none.
- CORS for the allowed origins is answered here too, so that it agrees with that check: a
  preflight (OPTIONS with `Access-Control-Request-Method`) from an allowed origin is answered 200
  when it asks for GET, HEAD or POST and only headers in `CORS_HEADERS` or starting with
  `x-stainless-` (the official OpenAI SDKs send `x-stainless-os`, `-lang`, `-arch`, `-runtime`,
  `-runtime-version`, `-package-version`, `-retry-count`, `-timeout`, `-helper-method`, ...); any
  answer to an allowed origin carries `Access-Control-Allow-Origin` and exposes `x-request-id`.
- With API keys set, every `/v1` route and `/metrics` (whose counters follow every client's
  requests) need `Authorization: Bearer <key>` (compared in constant time); otherwise 401.
  `/health` answers without a key, but only that the server is alive (probes carry no key); a
  key, if sent, must be right. The matching key is left in `scope["state"]["api_key"]`.
- A POST body must be `application/json` (415 otherwise): `text/plain` is how a page would sneak in.

Every refusal, a CORS one included, is in OpenAI's error shape.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response

from aded.server.errors import RequestError, error_response

__all__ = ["Guard", "CORS_HEADERS", "CORS_HEADER_PREFIXES", "CORS_METHODS", "same_origin"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
KEYED_PATHS = ("/metrics", "/tokenize", "/detokenize")  # besides every /v1 route
CORS_METHODS = ("GET", "HEAD", "POST")
#: request headers a preflight may ask for (besides `CORS_HEADER_PREFIXES`): what OpenAI's SDKs send
CORS_HEADERS = frozenset({"authorization", "content-type", "accept", "accept-language", "content-language",
                          "openai-organization", "openai-project", "openai-beta", "x-request-id",
                          "idempotency-key"})
CORS_HEADER_PREFIXES = ("x-stainless-",)
PREFLIGHT_MAX_AGE = 600  # seconds a browser may keep a preflight's answer


class Guard:
    def __init__(self, app, api_keys: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.any_origin = "*" in allowed_origins
        self.origins = {same_origin(origin) for origin in allowed_origins if origin != "*"}
        self.any_host = "*" in allowed_hosts
        self.hosts = {_split_host(host, None) for host in allowed_hosts if host != "*"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allowed = origin is not None and self._origin_allowed(origin)
        if origin is not None and allowed:
            send = _with_cors(send, origin)
        try:
            self._check_host_and_origin(scope, headers, origin, allowed)
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers and allowed:
                return await _preflight(headers)(scope, receive, send)
            self._check(scope, headers)
        except RequestError as exc:
            return await error_response(exc)(scope, receive, send)
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str) -> bool:
        return self.any_origin or same_origin(origin) in self.origins

    def _check_host_and_origin(self, scope: dict[str, Any], headers: Headers, origin: str | None,
                               allowed: bool) -> None:
        host = headers.get("host")
        if host is not None and not self._host_allowed(host, scope):
            raise RequestError(f"the Host header {host!r} does not name this server (a DNS rebinding guard); "
                               "start the server with the name among its allowed hosts", 403,
                               code="host_not_allowed", type_="permission_error")
        if origin is not None and not allowed:
            raise RequestError(f"requests from the web origin {origin!r} are not allowed; start the server "
                               "with that origin among its allowed origins", 403,
                               code="origin_not_allowed", type_="permission_error")

    def _check(self, scope: dict[str, Any], headers: Headers) -> None:
        path = scope["path"]
        if self.api_keys and (path.startswith("/v1") or path in KEYED_PATHS
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


def same_origin(origin: str) -> str:
    """An origin as browsers compare it: lower case, no trailing slash, no default port."""
    text = origin.strip().rstrip("/").lower()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text
    if not parts.scheme or not parts.hostname:
        return text
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def _preflight(headers: Headers) -> Response:
    """The answer to a CORS preflight from an allowed origin (the checks above passed)."""
    method = headers["access-control-request-method"].strip().upper()
    if method not in CORS_METHODS:
        raise RequestError(f"a browser may not send {method} requests here; allowed: {', '.join(CORS_METHODS)}",
                           400, code="cors_method_not_allowed")
    asked = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
    refused = [h for h in asked if h not in CORS_HEADERS and not h.startswith(CORS_HEADER_PREFIXES)]
    if refused:
        raise RequestError(f"a browser may not send the header(s) {', '.join(refused)} here; allowed: "
                           f"{', '.join(sorted(CORS_HEADERS))} and {', '.join(p + '*' for p in CORS_HEADER_PREFIXES)}",
                           400, code="cors_headers_not_allowed")
    cors = {"Access-Control-Allow-Methods": ", ".join(CORS_METHODS), "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE)}
    if asked:
        cors["Access-Control-Allow-Headers"] = ", ".join(asked)
    return Response(status_code=200, headers=cors)


def _with_cors(send, origin: str):
    """`send` with the CORS headers of an allowed origin on the response."""
    async def cors_send(message):
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = "x-request-id"
            headers.append("Vary", "Origin")
        await send(message)

    return cors_send


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
