"""CORS under `allowed_origins` lets the official OpenAI JavaScript SDK through from an allowed
origin (issue 30, finding 6): its preflight lists `x-stainless-*` headers; origins are compared the
same way by the origin check and the preflight; every refusal is in OpenAI's error shape."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import MODEL, post, serve_in_thread, tiny_dir  # noqa: E402, F401

CHAT = "/v1/chat/completions"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
GOOD = "http://good.example"
# what openai-node 4.x/5.x lists in a browser (its `x-stainless-*` headers, then the usual ones)
SDK_HEADERS = ("x-stainless-os,x-stainless-lang,x-stainless-package-version,x-stainless-runtime,"
               "x-stainless-runtime-version,x-stainless-arch,x-stainless-retry-count,x-stainless-timeout,"
               "x-stainless-helper-method,authorization,content-type,openai-organization,openai-project,"
               "x-request-id")


@pytest.fixture(scope="module")
def url(tiny_dir):
    import aded
    from aded.server.app import ServerConfig, create_app

    lm = aded.load(str(tiny_dir), drafter="pld", budget="off")
    config = ServerConfig(model_name=MODEL, allowed_origins=(GOOD + "/",), api_keys=("sk-1",))
    with serve_in_thread(create_app(lm, config)) as base:
        yield base


def _preflight(url: str, origin: str, headers: str = SDK_HEADERS, method: str = "POST") -> httpx.Response:
    return httpx.options(url + CHAT, timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


def _openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_the_sdk_preflight_from_an_allowed_origin_passes(url):
    preflight = _preflight(url, GOOD)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == GOOD
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert allowed == set(SDK_HEADERS.split(","))
    assert "POST" in preflight.headers["access-control-allow-methods"]
    # then the request itself, as the browser sends it
    answer = post(url, CHAT, ASK, headers={"Origin": GOOD, "Authorization": "Bearer sk-1",
                                           "x-stainless-lang": "js", "x-stainless-retry-count": "0"})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == GOOD
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    # an error answer is readable by the page too
    assert post(url, CHAT, ASK, headers={"Origin": GOOD}).headers["access-control-allow-origin"] == GOOD


@pytest.mark.parametrize("origin", ["HTTP://GOOD.EXAMPLE/", "http://Good.Example", "http://good.example:80"])
def test_an_origin_is_allowed_alike_by_the_check_and_the_preflight(url, origin):
    """The audit: `HTTP://GOOD.EXAMPLE/` passed the origin check but its preflight was refused."""
    assert _preflight(url, origin).status_code == 200
    answer = post(url, CHAT, ASK, headers={"Origin": origin, "Authorization": "Bearer sk-1"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin


def test_cors_refusals_are_in_the_openai_error_shape(url):
    error = _openai_error(_preflight(url, GOOD, headers="x-stainless-os,x-evil"), 400)
    assert error["code"] == "cors_headers_not_allowed" and "x-evil" in error["message"]
    error = _openai_error(_preflight(url, GOOD, method="DELETE"), 400)
    assert error["code"] == "cors_method_not_allowed"
    error = _openai_error(_preflight(url, "http://evil.example"), 403)
    assert error["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in _preflight(url, "http://evil.example").headers
    error = _openai_error(_preflight(url, "http://good.example:8080"), 403)  # another port: another origin
    assert error["code"] == "origin_not_allowed"
