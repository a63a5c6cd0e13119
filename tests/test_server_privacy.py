"""With API keys, nothing a client can read tells it another client's prompts (issue 30, findings 1
and 9): /metrics and /health give a key its own counters (an admin key the whole server's), and of
those how its requests drafted only where its learned state is its own; `cached_tokens` does not
tell a tenant that another ran in between; a state file of another model is refused naming the
models."""

from __future__ import annotations

import re

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import MODEL, post, save_byte_level_model, serve_in_thread, tiny_dir  # noqa: E402, F401

CHAT = "/v1/chat/completions"
KA, KB, ADMIN = "key-a", "key-b", "key-admin"
SECRET = {"model": MODEL, "messages": [{"role": "user", "content": "A's secret plan, in full detail."}],
          "max_tokens": 40, "temperature": 0}


@pytest.fixture
def lm(tiny_dir):
    import aded

    return aded.load(str(tiny_dir), drafter="suffix", budget="off")


def _serve(lm, **fields):
    from aded.server.app import ServerConfig, create_app

    return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, **fields)))


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _accepted(metrics: str) -> tuple[float, int]:
    """(sum, count) of `aded_accepted_tokens_per_step` in a /metrics text."""
    total = float(re.search(r"^aded_accepted_tokens_per_step_sum (\S+)$", metrics, re.M).group(1))
    count = int(re.search(r"^aded_accepted_tokens_per_step_count (\S+)$", metrics, re.M).group(1))
    return total, count


def _metric(metrics: str, line: str) -> float:
    return float(re.search(rf"^{re.escape(line)} (\S+)$", metrics, re.M).group(1))


def test_the_audits_metrics_probe_tells_b_nothing_of_as_prompt(lm):
    """The audit: KB read `aded_accepted_tokens_per_step` around its own request, 1.0 accepted
    tokens a step for an unseen prompt and 3.69 for the prompt KA had just sent."""
    with _serve(lm, api_keys=(KA, KB), admin_keys=(ADMIN,)) as url:
        assert post(url, CHAT, SECRET, headers=_as(KA)).status_code == 200
        before = httpx.get(url + "/metrics", headers=_as(KB)).text
        answer = post(url, CHAT, SECRET, headers=_as(KB)).json()
        after = httpx.get(url + "/metrics", headers=_as(KB)).text
        assert _accepted(before) == _accepted(after) == (0.0, 0)  # drafted from shared state: not shown
        assert "aded" not in answer
        assert _metric(after, "aded_completion_tokens_total") == 40  # its own tokens, not A's too
        assert _metric(after, 'aded_generations_total{outcome="finished"}') == 1
        assert 'endpoint="/v1/chat/completions",status="200"} 1' in after  # its own request only
        health = httpx.get(url + "/health", headers=_as(KB)).json()
        assert health["completed"] == 1 and health["mean_accepted_tokens"] == 0
        assert "tenants" not in health and "state" not in health
        # the operator's key reads the whole server, the repeat drafted from what A taught included
        whole = httpx.get(url + "/metrics", headers=_as(ADMIN)).text
        total, count = _accepted(whole)
        assert _metric(whole, "aded_completion_tokens_total") == 80 and total / count > 1.0
        assert httpx.get(url + "/health", headers=_as(ADMIN)).json()["completed"] == 2


def test_a_key_with_state_of_its_own_sees_how_its_requests_drafted(lm, tmp_path):
    with _serve(lm, api_keys=(KA, KB), state_per="key", state_path=tmp_path / "s.npz") as url:
        first = post(url, CHAT, SECRET, headers=_as(KA)).json()["aded"]
        again = post(url, CHAT, SECRET, headers=_as(KA)).json()["aded"]
        assert again["mean_accepted_tokens"] > first["mean_accepted_tokens"]
        total, count = _accepted(httpx.get(url + "/metrics", headers=_as(KA)).text)
        assert count == first["steps"] + again["steps"]
        assert _accepted(httpx.get(url + "/metrics", headers=_as(KB)).text) == (0.0, 0)  # B ran nothing


def _keeping_prompts(lm) -> None:
    """Make the transformers runner (which computes every prompt whole) report the prompt tokens a
    runner that keeps the last prompt's cells (llama.cpp's) would reuse, until it is told to forget."""
    runner, prefill, kept = lm.runner, lm.runner.prefill, []

    def keeping_prefill(seq, ids):
        out = prefill(seq, ids)
        same = next((i for i, (a, b) in enumerate(zip(kept, ids)) if a != b), min(len(kept), len(ids)))
        kept[:] = list(ids)
        return type(out)(out[0], min(same, len(ids) - 1))

    runner.prefill = keeping_prefill
    runner.forget = lambda keep=(): kept.clear()


def test_cached_tokens_do_not_tell_a_tenant_that_another_ran_in_between(lm, tmp_path):
    """The audit: with `--state-per key`, A's cached_tokens dropped from 39 to 0 when B ran in between."""
    def cached(url: str, key: str) -> int:
        return post(url, CHAT, SECRET, headers=_as(key)).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    _keeping_prompts(lm)

    with _serve(lm, api_keys=(KA, KB), state_per="key", state_path=tmp_path / "s.npz") as url:
        alone = [cached(url, KA), cached(url, KA)]
        between = [cached(url, KB), cached(url, KA)]
        assert alone + between == [0, 0, 0, 0]  # the same whether B ran or not
        assert _metric(httpx.get(url + "/metrics", headers=_as(KA)).text, "aded_prompt_tokens_cached_total") == 0
    with _serve(lm, api_keys=(KA,)) as url:  # one client: nobody to tell apart, the count is real
        assert cached(url, KA) == 0 and cached(url, KA) > 0


def test_keys_that_send_the_same_salt_do_not_share_learned_state(lm, tmp_path):
    ask = {**SECRET, "cache_salt": "team"}
    with _serve(lm, api_keys=(KA, KB), state_per="salt", state_path=tmp_path / "s.npz") as url:
        first = post(url, CHAT, ask, headers=_as(KA)).json()["aded"]["mean_accepted_tokens"]
        again = post(url, CHAT, ask, headers=_as(KA)).json()["aded"]["mean_accepted_tokens"]
        other = post(url, CHAT, ask, headers=_as(KB)).json()["aded"]["mean_accepted_tokens"]
        assert again > first and other == first


def test_a_state_file_of_another_model_is_refused_naming_the_models(lm, tiny_dir, tmp_path):
    import aded
    from aded.server.app import ServerConfig, create_app
    from aded.server.state import StateError

    state = tmp_path / "learned.npz"
    with _serve(lm, state_path=state) as url:
        post(url, CHAT, SECRET)
    assert state.exists()
    save_byte_level_model(tmp_path / "other-model", None)
    other = aded.load(str(tmp_path / "other-model"), drafter="suffix", budget="off")
    with pytest.raises(StateError) as refused:
        create_app(other, ServerConfig(model_name="other", state_path=state))
    message = str(refused.value)
    assert lm.model_id in message and other.model_id in message and "vocab_hash" not in message
    assert not re.search(r"[0-9a-f]{40}", message)  # no tokenizer hashes
