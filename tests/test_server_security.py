"""Keeping others out and apart (issue 14, defects 4 and 6): API keys, web origins, the Host header
(DNS rebinding), the content type, learned state kept per API key or per cache salt, and the
`aded` statistics that can tell one client about another's requests."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from server_support import (  # noqa: E402, F401
    MODEL,
    Server,
    learned_outputs,
    load_tiny,
    post,
    serve_in_thread,
    tiny_dir,
)

CHAT = "/v1/chat/completions"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
KEYS = ("key-alice", "key-bob")


@pytest.fixture
def lm(tiny_dir):
    return load_tiny(tiny_dir)


def _serve(lm, **fields):
    from aded.server.app import ServerConfig, create_app

    return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, **fields)))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_every_v1_route(lm):
    with _serve(lm, api_keys=KEYS) as url:
        for key in ("wrong", KEYS[0][:-1], KEYS[0] + "x"):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model=MODEL, messages=ASK["messages"], max_tokens=2)
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        for headers in ({}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}):
            response = post(url, CHAT, ASK, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        for key in KEYS:
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert client.models.retrieve(MODEL).id == MODEL
            assert client.chat.completions.create(model=MODEL, messages=ASK["messages"], max_tokens=2).choices
        # liveness for probes without a key; what the server did, and its metrics, only with one
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/health", headers=_bearer(KEYS[1])).json()["completed"] == 1  # its own
        assert httpx.get(url + "/health", headers=_bearer("wrong")).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers=_bearer("wrong")).status_code == 401
        assert "aded_accepted_tokens_per_step" in httpx.get(url + "/metrics", headers=_bearer(KEYS[0])).text


def test_the_api_key_can_come_from_the_environment(lm, monkeypatch):
    monkeypatch.setenv("ADED_API_KEY", "from-env")
    with _serve(lm) as url:
        assert post(url, CHAT, ASK).status_code == 401
        assert post(url, CHAT, ASK, headers=_bearer("from-env")).status_code == 200


def test_a_web_page_cannot_use_the_server(lm):
    """The issue's attack: a page POSTs text/plain (no CORS preflight) from its own origin."""
    with _serve(lm) as url:
        attack = httpx.post(url + CHAT, content=b'{"model": "tiny", "messages": []}', timeout=30,
                            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert attack.status_code == 403 and attack.json()["error"]["code"] == "origin_not_allowed"
        as_text = httpx.post(url + CHAT, content=b"{}", headers={"Content-Type": "text/plain"}, timeout=30)
        assert as_text.status_code == 415
        port = url.rsplit(":", 1)[1]
        rebound = post(url, CHAT, ASK, headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(url + "/metrics", headers={"Host": f"evil.example:{port}"}).status_code == 403
        assert post(url, CHAT, ASK, headers={"Host": "localhost:1"}).status_code == 403  # another port
        for name in ("localhost", "127.0.0.1", "[::1]"):
            assert post(url, CHAT, ASK, headers={"Host": f"{name}:{port}"}).status_code == 200


def test_origins_and_hosts_can_be_allowed(lm):
    origin = "http://app.example:3000"
    with _serve(lm, allowed_origins=(origin,), allowed_hosts=("api.example",)) as url:
        response = post(url, CHAT, ASK, headers={"Origin": origin, "Host": "api.example"})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
        preflight = httpx.options(url + CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert post(url, CHAT, ASK, headers={"Origin": "http://evil.example"}).status_code == 403


def test_learned_state_is_kept_per_api_key(lm, tiny_dir):
    state = tiny_dir.parent / "per-key.npz"
    alice = {"model": MODEL, "messages": [{"role": "user", "content": "alice's secret plan"}],
             "max_tokens": 30, "temperature": 0}
    with _serve(lm, api_keys=KEYS, admin_keys=("key-admin",), state_per="key", state_path=state) as url:
        first = post(url, CHAT, alice, headers=_bearer(KEYS[0])).json()
        again = post(url, CHAT, alice, headers=_bearer(KEYS[0])).json()
        bob = post(url, CHAT, alice, headers=_bearer(KEYS[1])).json()  # the same question, from Bob
        assert first["choices"][0]["message"] == again["choices"][0]["message"] == bob["choices"][0]["message"]
        # each sees only its own history: Bob's first time is drafted like Alice's first time
        assert again["aded"]["mean_accepted_tokens"] > first["aded"]["mean_accepted_tokens"]
        assert bob["aded"]["mean_accepted_tokens"] == first["aded"]["mean_accepted_tokens"]
        assert httpx.get(url + "/health", headers=_bearer("key-admin")).json()["tenants"] == 2
    files = sorted(tiny_dir.parent.glob("per-key.tenant-*.npz"))
    assert len(files) == 2 and not state.exists()  # nobody used the shared state
    assert not any(key in file.name for file in files for key in KEYS)
    answer = first["choices"][0]["message"]["content"]
    assert sorted(len(learned_outputs(file, tiny_dir)) for file in files) == [1, 2]
    assert all(answer in learned_outputs(file, tiny_dir) for file in files)


def test_learned_state_is_kept_per_cache_salt(lm, tiny_dir):
    state = tiny_dir.parent / "per-salt.npz"
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "salted"}], "max_tokens": 30, "temperature": 0}
    with _serve(lm, state_per="salt", state_path=state, max_tenants=1) as url:
        first = post(url, CHAT, {**ask, "cache_salt": "a"}).json()["aded"]["mean_accepted_tokens"]
        again = post(url, CHAT, {**ask, "cache_salt": "a"}).json()["aded"]["mean_accepted_tokens"]
        other = post(url, CHAT, {**ask, "cache_salt": "b"}).json()["aded"]["mean_accepted_tokens"]  # evicts "a"
        shared = post(url, CHAT, ask).json()["aded"]["mean_accepted_tokens"]
        back = post(url, CHAT, {**ask, "cache_salt": "a"}).json()["aded"]["mean_accepted_tokens"]  # from its file
        assert again > first and other == first and shared == first and back == again
    assert len(learned_outputs(state, tiny_dir)) == 1


def test_aded_stats_are_off_with_api_keys_and_shared_state_unless_asked_for(lm):
    with _serve(lm, api_keys=KEYS) as url:
        assert "aded" not in post(url, CHAT, ASK, headers=_bearer(KEYS[0])).json()
    with _serve(lm, api_keys=KEYS, aded_stats=True) as url:
        assert "aded" in post(url, CHAT, ASK, headers=_bearer(KEYS[0])).json()
    with _serve(lm, aded_stats=False) as url:
        streamed = httpx.post(url + CHAT, json={**ASK, "stream": True}, timeout=30).text
        assert '"aded"' not in streamed and "[DONE]" in streamed


def test_the_cli_flags_reach_the_server(tiny_dir):
    """`aded serve --api-key ... --allowed-origin ...` as users run it: the key guards /v1, the
    origin is served, a bad --state-per is one error line before anything loads."""
    with Server(tiny_dir, "--api-key", "secret", "--allowed-origin", "http://app.example") as running:
        anonymous = httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert anonymous.status_code == 401
        keyed = httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                           headers={"Authorization": "Bearer secret", "Origin": "http://app.example"})
        assert keyed.status_code == 200
    failed = subprocess.run([sys.executable, "-m", "aded.cli", "serve", "--model", str(tiny_dir), "--state-per", "key"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "ADED_API_KEY": ""})
    assert failed.returncode != 0 and "state_per 'key' needs API keys" in failed.stderr
    assert "Traceback" not in failed.stderr
