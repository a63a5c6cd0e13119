"""One big request must not stall everyone (issue 14, defect 3): bodies are parsed, templated and
tokenized off the event loop, holding a queue slot meanwhile.

The tests hold a request inside its chat templating on purpose (a message "HOLD" waits on a gate)
and check what happens meanwhile by order of events, not by timing; one sends the issue's 1 MB body
of 30,000 one-character messages.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from server_support import MODEL, load_tiny, post, serve_in_thread, tiny_dir  # noqa: E402, F401

CHAT = "/v1/chat/completions"
HOLD = {"model": MODEL, "messages": [{"role": "user", "content": "HOLD"}], "max_tokens": 2, "temperature": 0}
SMALL = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}


class GatedTokenizer:
    """A tokenizer whose chat templating of a "HOLD" message waits until `gate` opens; its copies
    (one per parsing thread) share the gate and count the requests held."""

    def __init__(self, tokenizer, gate: threading.Event, held: threading.Semaphore) -> None:
        self.tokenizer, self.gate, self.held = tokenizer, gate, held

    def __deepcopy__(self, memo) -> GatedTokenizer:
        return GatedTokenizer(copy.deepcopy(self.tokenizer, memo), self.gate, self.held)

    def apply_chat_template(self, messages, **kwargs):
        if any(m.get("content") == "HOLD" for m in messages):
            self.held.release()
            assert self.gate.wait(60), "the test never opened the gate"
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def gated(tiny_dir):
    """(url maker, gate, held): `url(**config)` serves the tiny model with a gated tokenizer."""
    from aded.server.app import ServerConfig, create_app

    gate, held = threading.Event(), threading.Semaphore(0)
    lm = load_tiny(tiny_dir)
    lm.tokenizer = GatedTokenizer(lm.tokenizer, gate, held)

    def serve(**fields):
        return serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, **fields)))

    yield serve, gate, held
    gate.set()


def _wait_held(held: threading.Semaphore, count: int = 1) -> None:
    for _ in range(count):
        assert held.acquire(timeout=60), "the request never reached its chat template"


def test_a_body_being_templated_holds_neither_health_nor_other_clients(gated):
    serve, gate, held = gated
    with serve(parse_threads=2) as url, ThreadPoolExecutor(2) as pool:
        holding = pool.submit(post, url, CHAT, HOLD)
        _wait_held(held)
        health = httpx.get(url + "/health", timeout=30).json()
        assert health["queue"] == 1  # the request being parsed holds its slot
        small = post(url, CHAT, SMALL)  # parsed by the other thread, generated, answered
        assert small.status_code == 200 and not holding.done()
        gate.set()
        assert holding.result(60).status_code == 200


def test_a_stream_keeps_flowing_while_every_parsing_thread_is_held(gated):
    serve, gate, held = gated
    with serve(parse_threads=2) as url, ThreadPoolExecutor(2) as pool:
        with httpx.stream("POST", url + CHAT, timeout=60, headers={"Content-Type": "application/json"},
                          content=json.dumps({**SMALL, "max_tokens": 120, "stream": True}).encode()) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            holding = [pool.submit(post, url, CHAT, HOLD) for _ in range(2)]
            _wait_held(held, 2)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and not any(h.done() for h in holding)
        gate.set()
        assert [h.result(60).status_code for h in holding] == [200, 200]


def test_parsing_counts_against_the_queue_and_429_says_when_to_retry(gated):
    serve, gate, held = gated
    with serve(max_queue=1) as url, ThreadPoolExecutor(1) as pool:
        holding = pool.submit(post, url, CHAT, HOLD)
        _wait_held(held)
        busy = post(url, CHAT, SMALL)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert int(busy.headers["Retry-After"]) >= 1
        gate.set()
        assert holding.result(60).status_code == 200
        assert post(url, CHAT, SMALL).status_code == 200  # the slot came back


def test_a_megabyte_of_one_character_messages_does_not_hold_health(tiny_dir):
    """The issue's body: 30,000 one-character messages. It is refused after tokenization (far beyond
    the context), so all its time is parsing; /health keeps answering meanwhile."""
    from aded.server.app import ServerConfig, create_app

    big = json.dumps({"model": MODEL, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "x"} for _ in range(30_000)]}).encode()
    assert len(big) > 900_000
    lm = load_tiny(tiny_dir)
    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL, max_body_bytes=2 << 20))) as url:
        with ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            parsing = pool.submit(post, url, CHAT, big)
            answers = []  # (sent, answered) of each /health while the big body is in
            while not parsing.done():
                asked = time.monotonic()
                assert httpx.get(url + "/health", timeout=30).status_code == 200
                answers.append((asked, time.monotonic()))
            done = time.monotonic()
        error = parsing.result().json()["error"]
        assert error["code"] == "context_length_exceeded"
    during = [(a, b) for a, b in answers if b < done]
    assert len(during) >= 2, "no /health answer came back while the body was parsed"
    assert max(b - a for a, b in during) < (done - sent) / 2  # no answer waited for the parsing


def test_the_load_test_mixes_big_bodies_into_streaming_clients(tiny_dir):
    """benchmarks/load_test.py, bounded and small: both phases run, every client request succeeds,
    every big body is refused as too long (never a 5xx); the timing verdict is the benchmark's."""
    import argparse
    import importlib.util
    import sys

    from aded.server.app import ServerConfig, create_app

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[1] / "benchmarks" / "load_test.py")
    load_test = sys.modules["load_test"] = importlib.util.module_from_spec(spec)  # dataclasses need it there
    spec.loader.exec_module(load_test)
    args = argparse.Namespace(clients=2, duration=4.0, max_requests=20, max_tokens=8, big_clients=1,
                              big_messages=3_000, request_timeout=60.0, headers={}, served_model_name=None,
                              drafter="suffix", model=MODEL)
    lm = load_tiny(tiny_dir)
    with serve_in_thread(create_app(lm, ServerConfig(model_name=MODEL))) as url:
        summary = load_test.run(url, args)
    for phase in ("alone", "with_big_bodies"):
        assert summary[phase]["requests_served"] >= 2 and summary[phase]["errors"] == 0, summary[phase]
        assert summary[phase]["ttft_max_s"] is not None
    assert summary["big_bodies"]["sent"] >= 1 and summary["big_bodies"]["statuses"] == [400]
    assert isinstance(summary["ttft_growth_within_one_service_time"], bool)
