"""Time limits on reading a request, and a SIGTERM that stops the server whatever its clients do
(issue 30, finding 2 / build item 2). The audit: with `--max-queue 2`, two connections that sent
headers and 5 bytes of body kept everyone else at 429 for the 150 s observed, and with them open
SIGTERM did not stop the server within 20 s. Served by `aded serve` in a subprocess, as users run it."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import MODEL, Server, learned_outputs, tiny_dir  # noqa: E402, F401

ASK = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}


def _stalled_upload(port: int, sent: bytes = b'{"mod') -> socket.socket:
    """Headers announcing a 100-byte body, then `sent` of it, and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" % port + sent)
    return sock


def _answer(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_a_stalled_upload_holds_no_queue_slot_and_times_out(tiny_dir):
    with Server(tiny_dir, "--max-queue", "1", "--body-timeout", "2") as running:
        stalled = [_stalled_upload(running.port) for _ in range(3)]
        start = time.monotonic()
        for _ in range(3):  # the one queue slot is free: uploads in progress are not in the queue
            assert httpx.post(running.url + "/v1/completions", json=ASK, timeout=30).status_code == 200
        answers = [_answer(sock) for sock in stalled]
        assert time.monotonic() - start < 10
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer[:300]
        assert "Traceback" not in running.output()


def test_headers_that_never_end_close_the_connection(tiny_dir):
    with Server(tiny_dir, "--header-timeout", "1") as running:
        silent = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        trickle = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        assert _answer(silent) == b"" and _answer(trickle) == b""  # closed by the server
        assert time.monotonic() - start < 8
        # a client that keeps its connection alive between requests is not cut off
        with httpx.Client(timeout=30) as client:
            for _ in range(2):
                assert client.post(running.url + "/v1/completions", json=ASK).status_code == 200
                time.sleep(0.3)


def test_sigterm_stops_the_server_within_seconds_whatever_its_clients_do(tiny_dir, tmp_path):
    state = tmp_path / "state.npz"
    running = Server(tiny_dir, "--state", str(state), "--max-queue", "4", "--body-timeout", "120")
    try:
        taught = httpx.post(running.url + "/v1/completions", json={**ASK, "max_tokens": 16}, timeout=60).json()
        stalled = [_stalled_upload(running.port) for _ in range(2)]
        half_headers = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        half_headers.sendall(b"GET /health HTTP/1.1\r\n")
        streamed: list = []

        def stream() -> None:  # a long answer, read slowly
            body = {**ASK, "max_tokens": 400, "stream": True}
            with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    streamed.append(line)
                    time.sleep(0.01)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        time.sleep(1.0)
        start = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        code = running.proc.wait(timeout=30)
        took = time.monotonic() - start
        reader.join(10)
        assert took < 8, f"SIGTERM took {took:.1f} s"
        assert code in (0, -signal.SIGTERM) and not reader.is_alive()  # uvicorn re-raises the signal it handled
        answers = [_answer(sock) for sock in stalled]
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in answers), answers
    finally:
        if running.proc.poll() is None:
            running.kill()
        else:
            running._close_log()
    assert "Traceback" not in running.output()
    assert taught["choices"][0]["text"] in learned_outputs(state, tiny_dir)  # what it learned was saved
