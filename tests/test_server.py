"""The OpenAI-compatible server, end to end: a real `aded serve` subprocess on a loopback port,
spoken to with the official `openai` client (and raw httpx for malformed requests).

The subprocess serves a tiny random Llama saved by the test with a character-level tokenizer
beside it, so each server starts in seconds; one test (marked e2e) serves the real default model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import MODEL, ROOT, Server, chat, state_arrays, tiny_dir  # noqa: E402, F401


@pytest.fixture(scope="module")
def server(tiny_dir):
    with Server(tiny_dir) as running:
        yield running


# ---------------------------------------------------------------------------- shapes and identity
def test_endpoints_answer_in_openai_shapes(server):
    client = server.client
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stats = reply.model_extra["aded"]
    assert stats["steps"] >= 1 and stats["mean_accepted_tokens"] >= 1.0 and stats["drafter"] == "suffix"

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    text = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=20, temperature=0)
    assert text.object == "text_completion" and text.usage.prompt_tokens == len("def f(x):")  # one token per character
    streamed = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text

    metrics = httpx.get(server.url + "/metrics").text
    for name in ("aded_http_requests_total", "aded_completion_tokens_total", "aded_verification_steps_total",
                 "aded_accepted_tokens_per_step_bucket", "aded_tokens_per_second"):
        assert name in metrics


def test_greedy_output_equals_solo_generation(server, tiny_dir):
    import aded

    lm = aded.load(str(tiny_dir), drafter="none", budget="off")
    for prompt in ("abc abc abc", "The quick brown fox"):
        expected = lm.generate([{"role": "user", "content": prompt}], max_new_tokens=40).text
        assert chat(server.client, prompt, max_tokens=40) == expected
        assert chat(server.client, prompt, max_tokens=40, stream=True) == expected
        raw = lm.generate(prompt, chat=False, max_new_tokens=30).text
        reply = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
        assert reply.choices[0].text == raw


def test_stop_strings_and_seeded_sampling(server):
    full = chat(server.client, "stop here", max_tokens=40)
    cut = full[5:7] if len(full) > 8 else None
    if cut and cut.strip():
        stopped = chat(server.client, "stop here", max_tokens=40, stop=[cut])
        assert full.startswith(stopped) and cut not in stopped
    reply = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert reply.usage.completion_tokens >= 1


def test_concurrent_clients_each_get_their_solo_output(server):
    prompts = [f"client {i}: " + "ab" * i for i in range(8)]
    solo = [chat(server.client, p, max_tokens=32) for p in prompts]
    barrier = threading.Barrier(8)

    def ask(i: int) -> str:
        barrier.wait()
        return chat(server.client, prompts[i], max_tokens=32, stream=i % 2 == 1)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == solo


def test_client_disconnect_frees_the_slot(server):
    before = _metric(server, 'aded_generations_total{outcome="cancelled"}')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "long", "max_tokens": 480, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    start = time.monotonic()
    assert chat(server.client, "next please", max_tokens=8)  # served promptly, not after 480 tokens
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while _metric(server, 'aded_generations_total{outcome="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the abandoned stream was not cancelled"
        time.sleep(0.2)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------------------- bad input
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("missing model", "/v1/chat/completions", {k: v for k, v in GOOD.items() if k != "model"}, 400, "model"),
    ("messages wrongly typed", "/v1/chat/completions", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("max_tokens a string", "/v1/chat/completions", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("temperature a string", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("unknown role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("max_tokens beyond context", "/v1/chat/completions", {**GOOD, "max_tokens": 100_000}, 400, "max_tokens"),
    ("prompt longer than context", "/v1/completions", {"model": MODEL, "prompt": "x" * 600}, 400, "prompt"),
    ("negative max_tokens", "/v1/chat/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("absurd temperature", "/v1/chat/completions", {**GOOD, "temperature": 1e300}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 3}, 400, "top_p"),
    ("negative seed", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": -1}, 400, "seed"),
    ("absurd seed", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": 10**30}, 400, "seed"),
    ("n above the limit", "/v1/chat/completions", {**GOOD, "n": 17}, 400, "n"),
    ("too many stops", "/v1/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("token id outside vocab", "/v1/completions", {"model": MODEL, "prompt": [5, 10**6]}, 400, "prompt"),
    ("oversized body", "/v1/completions", {"model": MODEL, "prompt": "x" * (2 << 20)}, 413, None),
    ("unknown route", "/v1/engines", {}, 404, None),
]


@pytest.mark.parametrize("label,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error_and_the_server_stays_up(server, label, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == param, error
    assert server.health()["status"] == "ok"


def test_openai_client_raises_the_matching_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model=MODEL, prompt="y" * 700)
    assert chat(server.client, "still here", max_tokens=4)


# ---------------------------------------------------------------------------- learned state
def _state_arrays(path: Path) -> dict:
    return state_arrays(path, path.parent / MODEL)


def test_learned_state_round_trips_for_every_learning_drafter(tmp_path):
    """hybrid (with an aded source), suffix and aded: state_dict, write, read, load into a fresh
    drafter, state_dict again: the same arrays; pld learns nothing and refuses foreign arrays."""
    import numpy as np

    from aded.drafters import LearningDrafter, make_drafter
    from aded.drafters.aded import AdedDrafter
    from aded.drafters.base import load_state
    from aded.server.state import StateFile
    from aded.store.datastore import TokenizerIdentity

    def build(name):
        if name == "hybrid":
            return make_drafter("hybrid", sources=["pld", "suffix", AdedDrafter()])
        return AdedDrafter() if name == "aded" else make_drafter(name)

    identity = TokenizerIdentity("toy", 16, "f" * 64)
    for name in ("hybrid", "suffix", "aded"):
        drafter = build(name)
        assert isinstance(drafter, LearningDrafter)
        for seq in ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], [7, 8, 9, 7, 8, 9, 7, 8]):
            drafter.begin(seq[:3])
            drafter.propose(seq, 8)
            drafter.end()
        arrays = drafter.state_dict()
        file = StateFile(tmp_path / f"{name}.npz", name, identity)
        file.save(arrays)
        fresh = build(name)
        fresh.load_state_dict(file.read()[1])
        again = fresh.state_dict()
        assert sorted(again) == sorted(arrays)
        assert all(np.array_equal(arrays[k], again[k]) for k in arrays), name
    pld = make_drafter("pld")
    assert not isinstance(pld, LearningDrafter)
    load_state(pld, {})
    with pytest.raises(ValueError, match="learns nothing"):
        load_state(pld, {"tokens": np.zeros(3)})


def test_server_state_loads_into_the_vllm_proposer_and_back(tiny_dir):
    """What the server learned drafts in the vLLM proposer, and what the proposer saves loads
    back into the server: one learned-state format for both."""
    import numpy as np
    from transformers import AutoTokenizer

    from aded.integrations.vllm import AdedProposer

    state = tiny_dir.parent / "to-vllm.npz"
    state.unlink(missing_ok=True)
    with Server(tiny_dir, "--state", str(state)) as running:  # the suffix drafter
        running.client.completions.create(model=MODEL, prompt="teach me", max_tokens=40, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    output = _state_arrays(state)["tokens"].tolist()  # what the server generated
    proposer = AdedProposer(drafter="suffix", k=4, tokenizer=tokenizer, state=str(state))
    assert np.array_equal(proposer.template.state_dict()["tokens"], _state_arrays(state)["tokens"])
    context = [3, 4, *output[:12]]  # an unseen prompt, then the start of what the server produced
    ids = np.zeros((1, 64), dtype=np.int64)
    ids[0, : len(context)] = context
    draft = proposer.propose([[context[-1]]], [len(context)], ids)[0]
    assert draft and draft == output[12 : 12 + len(draft)]  # drafted from the server's learning
    longer = context + draft + [7]  # vLLM accepted the draft and sampled token 7 after it
    ids[0, : len(longer)] = longer
    proposer.propose([[7]], [len(longer)], ids)
    back = tiny_dir.parent / "from-vllm.npz"
    proposer.finish_all()  # the row's request ends: its output is learned
    proposer.save_state(back)
    with Server(tiny_dir, "--state", str(back)) as running:
        assert "loaded learned state" in running.health()["state"]
    assert _state_arrays(back)["lengths"].size == _state_arrays(state)["lengths"].size + 1


def test_state_is_saved_at_shutdown_and_reloaded(tiny_dir, tmp_path):
    state = tiny_dir.parent / "state.npz"
    state.unlink(missing_ok=True)
    with Server(tiny_dir, "--state", str(state)) as running:
        assert "starting fresh" in running.health()["state"]
        for prompt in ("repeat after me", "another one"):
            chat(running.client, prompt, max_tokens=40)
    arrays = _state_arrays(state)
    assert arrays["tokens"].size > 0 and arrays["lengths"].size == 2
    with Server(tiny_dir, "--state", str(state)) as running:
        assert "loaded learned state" in running.health()["state"]
        chat(running.client, "third", max_tokens=20)
    assert _state_arrays(state)["lengths"].size == 3


def test_corrupt_state_is_set_aside_and_the_server_starts_fresh(tiny_dir):
    state = tiny_dir.parent / "corrupt.npz"
    state.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    with Server(tiny_dir, "--state", str(state)) as running:
        assert "corrupt state set aside" in running.health()["state"]
        assert chat(running.client, "fresh", max_tokens=4)
    assert list(tiny_dir.parent.glob("corrupt.npz.corrupt-*"))


# ---------------------------------------------------------------------------- the real model
@pytest.mark.e2e
def test_real_model_matches_aded_generate():
    prompt = "Name three colours of the rainbow."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    generated = subprocess.run([sys.executable, "-m", "aded.cli", "generate", prompt, "--json", "-n", "40",
                                "--budget", "typical"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600, check=True)
    expected = json.loads(generated.stdout)
    with Server("smollm2-135m-instruct", timeout=300) as running:
        model = "smollm2-135m-instruct"
        reply = running.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0)
        assert reply.choices[0].message.content == expected["text"]
        assert reply.usage.completion_tokens == len(expected["token_ids"])
        assert reply.usage.prompt_tokens == len(expected["prompt_token_ids"])


def test_an_aborted_upload_is_no_internal_error_and_frees_its_slot(server):
    """A client that sends headers and part of its body, then goes: the server logs no error and
    no traceback for it, and keeps answering."""
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"" % server.port)
    time.sleep(1.0)
    reply = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0)
    assert reply.choices
    log = server.output()
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]
