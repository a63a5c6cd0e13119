"""A bounded chaos test of `aded serve` on loopback: a seeded mix of good and hostile requests.

    python benchmarks/chaos_test.py                      # 200 requests, 8 clients, a few minutes
    python benchmarks/chaos_test.py --requests 60 --clients 4 --json /tmp/chaos.json

Starts `aded serve` (the default model, the `suffix` drafter, a fresh `--state` file, a small
`--max-queue` and short header and body time limits) in a subprocess on 127.0.0.1, then sends a
fixed, seeded mix of requests from `--clients` threads:

- `normal`: greedy chat completions, each prompt unseen before, non-streaming;
- `stream`: streamed chat completions read to `data: [DONE]`;
- `disconnect`: streams dropped after the first chunk (the opening one, or the first with text);
- `malformed`: bad JSON, wrong types, an unknown model, huge `max_tokens`, a negative or NaN
  temperature, a wrong content type, invalid UTF-8, ... (each must be a 4xx in OpenAI's error shape);
- `stalled`: raw sockets that send the headers (with a Content-Length) and a few bytes of body, then
  wait past `--body-timeout` (a 408 is expected), or send half the headers and wait past
  `--header-timeout` (the connection is expected to close);
- `aborted`: headers and a few bytes of body, then the socket closes;
- `repeat`: two prompts sent again and again, so that the drafter learns them.

A 429 (the queue is full; the mix keeps `--max-queue` below the client count on purpose) is retried
after its Retry-After, and counted. Meanwhile a monitor thread polls `/health` every 0.5 s.

Checks (exit status 1 if any fails): no 5xx (nor an error event inside a stream), no body holding
"Traceback", every malformed body answered 4xx in OpenAI's error shape, every stalled upload 408
(or its connection closed, for stalled headers), `/health` answered within 2 s throughout, no slot
lost (the queue drains to 0, a final request is served promptly, then a burst of `--max-queue`
concurrent requests all succeed without a 429), and learned state intact: after the state file is
written the server is killed with SIGKILL, restarted on the same file, and a repeated prompt must
still draft (mean accepted tokens > 1.5, against about 1.0 for an unseen prompt). Last, SIGTERM with a
stalled upload and a stream open must stop the restarted server within seconds (a 503 is intended
there). A table is printed and the whole report written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty, Queue

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "llama-smollm2-chaos" / "results.json"

REPEATED = [  # sent again and again during the mix: the drafter learns their answers
    "Give step-by-step instructions to boil an egg.",
    "List five fruits and one fact about each.",
]
FRESH = "Describe how a bicycle gear works to a ten-year-old, in two sentences."  # never sent in the mix
TOPICS = ["the moon", "volcanoes", "bees", "the printing press", "glaciers", "chess", "coffee", "rainbows",
          "the internet", "penguins", "bridges", "tea", "the Roman empire", "electricity", "deserts",
          "octopuses", "jazz", "compilers", "tides", "bread", "lighthouses", "maps", "clocks", "owls"]
ASKS = ["Write one sentence about {t}.", "Give one surprising fact about {t}.", "Explain {t} to a child in one sentence.",
        "Write a two-line poem about {t}.", "Name two things people often get wrong about {t}."]

MIX = {"normal": 56, "stream": 36, "disconnect": 24, "malformed": 44, "stalled": 12, "aborted": 6, "repeat": 22}
SLOW_HEALTH_S = 2.0


@dataclass
class Record:
    index: int
    kind: str
    variant: str = ""
    status: int | None = None  # final HTTP status (None: no answer, e.g. a closed connection)
    latency_s: float = 0.0  # of the final attempt
    total_s: float = 0.0  # with the 429 retries
    retries_429: int = 0
    ok: bool = True
    problem: str = ""
    mean_accepted_tokens: float | None = None
    text: str = ""


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`aded serve` in a subprocess, its output in a log file."""

    def __init__(self, args, state: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "aded.cli", "serve", "--drafter", args.drafter, "--port", str(self.port),
                   "--state", str(state), "--max-queue", str(args.max_queue),
                   "--body-timeout", str(args.body_timeout), "--header-timeout", str(args.header_timeout),
                   "--shutdown-timeout", str(args.shutdown_timeout), "--log-level", "info"]
        if args.model:
            command += ["--model", args.model]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise SystemExit(f"the server did not answer /health within {timeout} s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


# ----------------------------------------------------------------------------- checks of answers
def error_shaped(body: bytes | str) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    try:
        obj = json.loads(body)
    except (ValueError, TypeError):
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return (isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
            and "param" in err and "code" in err)


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    if stream:
        body["stream"] = True
    return body


def malformed_variants(model: str) -> list[tuple[str, bytes, str | None]]:
    """(name, raw body, content type) of each malformed request."""
    def dump(obj) -> bytes:
        return json.dumps(obj).encode()

    good = chat_body(model, "Say hi.", 8)
    return [
        ("bad_json_truncated", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}' % model.encode(),
         "application/json"),
        ("bad_json_trailing_comma", dump(good)[:-1] + b',}', "application/json"),
        ("empty_body", b"", "application/json"),
        ("not_an_object", b"[1, 2, 3]", "application/json"),
        ("messages_is_string", dump({**good, "messages": "hello"}), "application/json"),
        ("max_tokens_is_string", dump({**good, "max_tokens": "ten"}), "application/json"),
        ("role_is_number", dump({**good, "messages": [{"role": 5, "content": "hi"}]}), "application/json"),
        ("content_is_object", dump({**good, "messages": [{"role": "user", "content": {"a": 1}}]}), "application/json"),
        ("unknown_model", dump({**good, "model": "no-such-model"}), "application/json"),
        ("huge_max_tokens", dump({**good, "max_tokens": 1_000_000_000}), "application/json"),
        ("huge_max_tokens_1e40", dump({**good, "max_tokens": 10**40}), "application/json"),
        ("negative_temperature", dump({**good, "temperature": -1.0}), "application/json"),
        ("nan_temperature", dump({k: v for k, v in good.items() if k != "temperature"})[:-1] + b', "temperature": NaN}',
         "application/json"),
        ("wrong_content_type", dump(good), "text/plain"),
        ("no_content_type", dump(good), None),
        ("invalid_utf8", b'{"model": "\xff\xfe", "messages": []}', "application/json"),
    ]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- the clients
class Chaos:
    def __init__(self, args, server: Server, model: str) -> None:
        self.args = args
        self.server = server
        self.model = model
        self.malformed = malformed_variants(model)

    # one request of each kind ---------------------------------------------------------------
    def send(self, http: httpx.Client, rec: Record) -> None:
        """Send `rec`'s request (retrying on 429) and fill in its outcome."""
        start = time.perf_counter()
        while True:
            attempt = time.perf_counter()
            retry_after = getattr(self, f"_{rec.kind}")(http, rec)
            rec.latency_s = round(time.perf_counter() - attempt, 4)
            if rec.status != 429 or rec.retries_429 >= self.args.max_retries:
                break
            rec.retries_429 += 1
            time.sleep(min(3.0, retry_after) + random.random() * 0.5)
        rec.total_s = round(time.perf_counter() - start, 4)
        if rec.status is not None and rec.status >= 500:
            rec.ok, rec.problem = False, rec.problem or f"HTTP {rec.status}"
        if rec.status == 429:
            rec.ok, rec.problem = False, f"still 429 after {rec.retries_429} retries"

    def _answer(self, rec: Record, response: httpx.Response, body: bytes) -> float:
        """Common checks of an answer read whole; returns the Retry-After of a 429."""
        rec.status = response.status_code
        if b"Traceback" in body:
            rec.ok, rec.problem = False, f"Traceback in the body: {body[:300]!r}"
        if response.status_code >= 400 and not error_shaped(body):
            rec.ok, rec.problem = False, f"error not in OpenAI's shape: {body[:300]!r}"
        try:
            return float(response.headers.get("retry-after", "1"))
        except ValueError:
            return 1.0

    def _whole(self, http: httpx.Client, rec: Record, prompt: str, max_tokens: int) -> float:
        response = http.post("/v1/chat/completions", json=chat_body(self.model, prompt, max_tokens))
        retry = self._answer(rec, response, response.content)
        if response.status_code == 200:
            try:
                obj = response.json()
                rec.text = obj["choices"][0]["message"]["content"] or ""
                rec.mean_accepted_tokens = (obj.get("aded") or {}).get("mean_accepted_tokens")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                rec.ok, rec.problem = False, f"unreadable 200: {type(exc).__name__}: {response.content[:200]!r}"
        elif response.status_code != 429 and rec.ok:
            rec.ok, rec.problem = False, f"HTTP {response.status_code}: {response.content[:300]!r}"
        return retry

    def _normal(self, http: httpx.Client, rec: Record) -> float:
        return self._whole(http, rec, rec.variant, self.args.max_tokens)

    def _repeat(self, http: httpx.Client, rec: Record) -> float:
        return self._whole(http, rec, REPEATED[int(rec.variant)], self.args.repeat_max_tokens)

    def _stream(self, http: httpx.Client, rec: Record) -> float:
        body = chat_body(self.model, rec.variant, self.args.max_tokens, stream=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return self._failed_stream(rec, response)
            rec.status = 200
            seen = []
            done = finished = False
            for line in response.iter_lines():
                seen.append(line)
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec.ok, rec.problem = False, f"error event in the stream: {line[:300]}"
                    for choice in chunk.get("choices", []):
                        rec.text += choice.get("delta", {}).get("content") or ""
                        finished = finished or choice.get("finish_reason") is not None
                    if chunk.get("aded"):
                        rec.mean_accepted_tokens = chunk["aded"].get("mean_accepted_tokens")
            joined = "\n".join(seen)
            if "Traceback" in joined:
                rec.ok, rec.problem = False, "Traceback in the stream"
            elif rec.ok and not (done and finished):
                rec.ok, rec.problem = False, f"stream ended without finish_reason/[DONE]: {joined[-300:]!r}"
        return 1.0

    def _failed_stream(self, rec: Record, response: httpx.Response) -> float:
        body = response.read()
        retry = self._answer(rec, response, body)
        if response.status_code != 429 and rec.ok:
            rec.ok, rec.problem = False, f"HTTP {response.status_code}: {body[:300]!r}"
        return retry

    def _disconnect(self, http: httpx.Client, rec: Record) -> float:
        prompt = f"Tell a long story about {TOPICS[rec.index % len(TOPICS)]}."
        body = chat_body(self.model, prompt, 128, stream=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return self._failed_stream(rec, response)
            rec.status = 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if "Traceback" in line or '"error"' in line:
                    rec.ok, rec.problem = False, f"unexpected first chunk: {line[:300]}"
                    break
                if rec.variant == "after_open" or '"content":"' in line.replace('"content":""', ""):
                    break  # drop the connection here
        # leaving the block closes the connection with the body unread
        return 1.0

    def _malformed(self, http: httpx.Client, rec: Record) -> float:
        name, raw, content_type = next(v for v in self.malformed if v[0] == rec.variant)
        headers = {"Content-Type": content_type} if content_type else {}
        request = http.build_request("POST", "/v1/chat/completions", content=raw, headers=headers)
        if content_type is None:
            request.headers.pop("Content-Type", None)
        response = http.send(request)
        retry = self._answer(rec, response, response.content)
        if response.status_code != 429 and not 400 <= response.status_code < 500:
            rec.ok, rec.problem = False, f"{name} answered {response.status_code}: {response.content[:300]!r}"
        return retry

    def _raw(self, payload: bytes, wait: float) -> tuple[int | None, bytes, float]:
        """Send `payload` on a fresh socket, then read until the server closes: (status, bytes, seconds)."""
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
            sock.sendall(payload)
            sock.settimeout(wait)
            data = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    head, sep, rest = data.partition(b"\r\n\r\n")
                    length = re.search(rb"content-length:\s*(\d+)", head, re.I)
                    if sep and length and len(rest) >= int(length.group(1)):
                        break
            except TimeoutError:
                data += b"<still open>"
        match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return (int(match.group(1)) if match else None), data, time.perf_counter() - start

    def _stalled(self, http: httpx.Client, rec: Record) -> float:
        host = f"127.0.0.1:{self.server.port}".encode()
        if rec.variant == "body":
            payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json"
                       b"\r\nContent-Length: 200\r\n\r\n{\"model\"")
            limit = self.args.body_timeout
        else:  # half the headers
            payload = b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Ty"
            limit = self.args.header_timeout
        status, data, seconds = self._raw(payload, limit + 10)
        rec.status = status
        body = data.partition(b"\r\n\r\n")[2]
        if b"Traceback" in data:
            rec.ok, rec.problem = False, f"Traceback in the answer: {data[:300]!r}"
        elif data.endswith(b"<still open>"):
            rec.ok, rec.problem = False, f"still open {seconds:.1f} s after a {limit} s limit: {data[:200]!r}"
        elif rec.variant == "body" and (status != 408 or not error_shaped(body)):
            rec.ok, rec.problem = False, f"stalled body answered {data[:300]!r}"
        elif rec.variant == "headers" and data:
            rec.ok, rec.problem = False, f"stalled headers answered {data[:300]!r}"
        elif seconds > limit + 3:
            rec.ok, rec.problem = False, f"answered after {seconds:.1f} s (limit {limit} s)"
        return 1.0

    def _aborted(self, http: httpx.Client, rec: Record) -> float:
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:" + str(self.server.port).encode()
                   + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
        rec.status = None  # nobody is left to answer
        return 1.0

    # the mix --------------------------------------------------------------------------------
    def plan(self) -> list[Record]:
        rng = random.Random(self.args.seed)
        counts = {kind: round(n * self.args.requests / 200) for kind, n in MIX.items()}
        counts["normal"] += self.args.requests - sum(counts.values())
        records: list[Record] = []
        prompts = [ask.format(t=topic) for topic in TOPICS for ask in ASKS]
        rng.shuffle(prompts)
        for kind, n in counts.items():
            for i in range(n):
                if kind in ("normal", "stream"):
                    variant = prompts.pop()
                elif kind == "disconnect":
                    variant = ("after_open", "after_content")[i % 2]
                elif kind == "malformed":
                    variant = self.malformed[i % len(self.malformed)][0]
                elif kind == "stalled":
                    variant = "headers" if i % 6 == 5 else "body"
                elif kind == "repeat":
                    variant = str(i % len(REPEATED))
                else:
                    variant = ""
                records.append(Record(0, kind, variant))
        rng.shuffle(records)
        for i, rec in enumerate(records):
            rec.index = i
        return records

    def run_mix(self, records: list[Record], deadline: float) -> list[Record]:
        todo: Queue[Record] = Queue()
        for rec in records:
            todo.put(rec)
        skipped: list[Record] = []

        def client() -> None:
            with httpx.Client(base_url=self.server.url, timeout=self.args.request_timeout) as http:
                while True:
                    try:
                        rec = todo.get_nowait()
                    except Empty:
                        return
                    if time.monotonic() > deadline:
                        rec.ok, rec.problem = False, "not sent: the time limit was reached"
                        skipped.append(rec)
                        continue
                    try:
                        self.send(http, rec)
                    except (httpx.HTTPError, OSError, ValueError) as exc:
                        rec.ok, rec.problem = False, f"{type(exc).__name__}: {exc}"

        threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(self.args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records

    def burst(self, n: int) -> list[Record]:
        """`n` normal requests at once, no retry: with n = max-queue every one must be admitted."""
        barrier = threading.Barrier(n)
        out = [Record(i, "burst", f"Write one sentence about burst number {i}.") for i in range(n)]

        def one(rec: Record) -> None:
            with httpx.Client(base_url=self.server.url, timeout=self.args.request_timeout) as http:
                barrier.wait()
                start = time.perf_counter()
                try:
                    self._whole(http, rec, rec.variant, 16)
                except (httpx.HTTPError, OSError) as exc:
                    rec.ok, rec.problem = False, f"{type(exc).__name__}: {exc}"
                rec.latency_s = rec.total_s = round(time.perf_counter() - start, 4)
                if rec.status != 200:
                    rec.ok, rec.problem = False, rec.problem or f"HTTP {rec.status}"

        threads = [threading.Thread(target=one, args=(rec,)) for rec in out]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return out


class HealthMonitor(threading.Thread):
    """GET /health every 0.5 s; every failure or answer slower than 2 s is recorded."""

    def __init__(self, url: str) -> None:
        super().__init__(name="health", daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.polls = 0
        self.latencies: list[float] = []
        self.failures: list[dict] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                start = time.perf_counter()
                problem = None
                try:
                    response = http.get(self.url + "/health")
                    if response.status_code != 200 or response.json().get("status") != "ok":
                        problem = f"HTTP {response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - start
                self.polls += 1
                self.latencies.append(seconds)
                if problem is None and seconds > SLOW_HEALTH_S:
                    problem = f"slow: {seconds:.2f} s"
                if problem is not None:
                    self.failures.append({"t_s": round(start - self.t0, 2), "seconds": round(seconds, 3),
                                          "problem": problem})
                self.stop.wait(max(0.0, 0.5 - seconds))

    def summary(self) -> dict:
        return {"polls": self.polls, "failures": len(self.failures), "failure_examples": self.failures[:10],
                "latency_p50_s": round(percentile(self.latencies, 0.5) or 0, 4),
                "latency_max_s": round(max(self.latencies, default=0), 4)}


# ----------------------------------------------------------------------------- steps after the mix
def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def wait_queue_empty(url: str, timeout: float) -> tuple[bool, float, int | None]:
    start = time.monotonic()
    queue_depth = None
    while time.monotonic() - start < timeout:
        queue_depth = health(url).get("queue")
        if queue_depth == 0:
            return True, time.monotonic() - start, 0
        time.sleep(0.2)
    return False, time.monotonic() - start, queue_depth


def wait_state_written(path: Path, since: float, timeout: float, quiet: float = 2.0) -> dict:
    """Wait until the state file was written after `since` (wall clock) and has not changed for
    `quiet` seconds (or, if no write after `since` shows up, `timeout` passes). The server saves
    after every request, off the request path, so a save may land just before or after the reply."""
    start = time.monotonic()
    last, stable_since = None, time.monotonic()
    while time.monotonic() - start < timeout:
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime != last:
            last, stable_since = mtime, time.monotonic()
        quiet_enough = time.monotonic() - stable_since >= quiet
        if mtime is not None and quiet_enough and mtime >= since:
            break
        time.sleep(0.2)
    return {"written": last is not None, "written_after_since": last is not None and last >= since,
            "mtime_lag_s": None if last is None else round(last - since, 3),
            "waited_s": round(time.monotonic() - start, 2),
            "size_bytes": path.stat().st_size if path.exists() else 0}


def shutdown_probe(server: Server, args, model: str) -> dict:
    """SIGTERM with a stalled upload and a stream open: the server must exit within a few seconds
    (the 503s it answers here are the intended ones)."""
    out: dict = {}
    host = f"127.0.0.1:{server.port}".encode()
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json"
                    b"\r\nContent-Length: 200\r\n\r\n{\"model\"")
    stream_result: dict = {}

    def streamer() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http, \
                    http.stream("POST", "/v1/chat/completions",
                                json=chat_body(model, "Tell a very long story about a dragon.", 400, True)) as response:
                stream_result["status"] = response.status_code
                lines = list(response.iter_lines())
                stream_result["last"] = next((line for line in reversed(lines) if line), "")[:300]
                stream_result["error_event"] = next((line for line in lines if '"error"' in line), "")[:300]
                stream_result["finish_reasons"] = re.findall(r'"finish_reason":"(\w+)"', "\n".join(lines))
                stream_result["traceback"] = any("Traceback" in line for line in lines)
        except (httpx.HTTPError, OSError) as exc:
            stream_result["error"] = f"{type(exc).__name__}: {exc}"[:300]

    thread = threading.Thread(target=streamer)
    thread.start()
    time.sleep(min(0.5, args.body_timeout / 3))
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    stalled.settimeout(args.shutdown_timeout + 15)
    data = b""
    try:
        while chunk := stalled.recv(65536):
            data += chunk
    except (TimeoutError, OSError):
        pass
    stalled.close()
    try:
        server.proc.wait(args.shutdown_timeout + 20)
        out["exit_s"] = round(time.monotonic() - start, 2)
        out["returncode"] = server.proc.returncode
    except subprocess.TimeoutExpired:
        out["exit_s"] = None
        server.proc.kill()
        server.proc.wait(30)
    thread.join(30)
    status = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    out["stalled_upload_answer"] = data[:400].decode("utf-8", "replace")
    out["stalled_upload_status"] = int(status.group(1)) if status else None
    out["stream"] = stream_result
    return out


# ----------------------------------------------------------------------------- report
def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log_stats(paths: list[Path]) -> dict:
    text = "\n".join(p.read_text(errors="replace") for p in paths if p.exists())
    errors = [line for line in text.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    return {"lines": text.count("\n"), "tracebacks": text.count("Traceback (most recent call last)"),
            "error_lines": len(errors), "error_examples": errors[:5],
            "warnings": sum(" WARNING " in line for line in text.splitlines())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the server's --model (default: its own default)")
    parser.add_argument("--drafter", default="suffix", help="a drafter that learns (suffix, aded, hybrid)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=30)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--body-timeout", type=float, default=2.0)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--shutdown-timeout", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's --threads (1: llama.cpp does not spin on a busy shared CPU; 0: its default)")
    parser.add_argument("--max-tokens", type=int, default=24, help="of normal and streamed requests")
    parser.add_argument("--repeat-max-tokens", type=int, default=48)
    parser.add_argument("--max-retries", type=int, default=60, help="429 retries per request")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--max-wall", type=float, default=900.0, help="seconds for the mix; later requests are not sent")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", dest="json_out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    if not 1 <= args.clients <= 32 or not 20 <= args.requests <= 2000 or not 1 <= args.max_queue <= 64:
        parser.error("--clients must be in [1, 32], --requests in [20, 2000], --max-queue in [1, 64]")

    wall0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="aded-chaos-"))
    state = workdir / "learned.npz"
    logs = [workdir / "server-1.log", workdir / "server-2.log"]
    checks: dict[str, dict] = {}

    def check(name: str, ok: bool, detail) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}

    server = Server(args, state, logs[0])
    startup_s = server.wait_ready(args.startup_timeout)
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    chaos = Chaos(args, server, model)
    print(f"server up in {startup_s:.1f} s on {server.url} ({model}, drafter {args.drafter}, state {state})",
          flush=True)

    monitor = HealthMonitor(server.url)
    monitor.start()
    records = chaos.plan()
    mix_start = time.monotonic()
    chaos.run_mix(records, mix_start + args.max_wall)
    mix_s = time.monotonic() - mix_start
    print(f"mix of {len(records)} requests done in {mix_s:.1f} s", flush=True)
    check("server_alive_after_mix", server.alive(), server.proc.returncode)

    # no slot lost: the queue drains, a final request is prompt, a burst of max-queue fits
    drained, drain_s, depth = wait_queue_empty(server.url, 30)
    check("queue_drained", drained, {"seconds": round(drain_s, 2), "queue": depth})
    final = Record(-1, "final", "Write one sentence about a quiet harbour.")
    with httpx.Client(base_url=server.url, timeout=args.request_timeout) as http:
        t = time.perf_counter()
        chaos._whole(http, final, final.variant, 16)
        final.latency_s = final.total_s = round(time.perf_counter() - t, 3)
    check("final_request_prompt", final.status == 200 and final.latency_s < 30,
          {"status": final.status, "seconds": final.latency_s, "problem": final.problem})
    wait_queue_empty(server.url, 30)
    burst_began = time.time()  # the last save follows the burst's last job, which ends after this
    burst = chaos.burst(args.max_queue)
    check("burst_of_max_queue_all_served", all(r.status == 200 for r in burst),
          {"statuses": [r.status for r in burst], "seconds": [r.latency_s for r in burst]})
    monitor.stop.set()
    monitor.join()
    health_summary = monitor.summary()
    before_kill = health(server.url)

    # learned state intact after kill -9
    saved = wait_state_written(state, burst_began, timeout=30)
    server.kill9()
    server2 = Server(args, state, logs[1])
    restart_s = server2.wait_ready(args.startup_timeout)
    after = health(server2.url)
    restart: dict = {"saved": saved, "restart_s": round(restart_s, 1), "state_note": after.get("state"),
                     "killed_with": "SIGKILL", "returncode": server.proc.returncode}
    with httpx.Client(base_url=server2.url, timeout=args.request_timeout) as http:
        repeated = Record(-2, "restart_repeat", "0")
        chaos._whole(http, repeated, REPEATED[0], args.repeat_max_tokens)
        fresh = Record(-3, "restart_fresh", FRESH)
        chaos._whole(http, fresh, FRESH, args.repeat_max_tokens)
    mix_repeats = [r for r in records if r.kind == "repeat" and r.variant == "0" and r.status == 200]
    restart.update({
        "repeated_prompt": REPEATED[0], "repeated_status": repeated.status,
        "repeated_mean_accepted_tokens": repeated.mean_accepted_tokens,
        "fresh_prompt": FRESH, "fresh_status": fresh.status, "fresh_mean_accepted_tokens": fresh.mean_accepted_tokens,
        "repeated_in_mix": len(mix_repeats),
        "mix_last_repeat_mean_accepted_tokens": mix_repeats[-1].mean_accepted_tokens if mix_repeats else None,
        "same_text_as_in_mix": bool(mix_repeats) and repeated.text == mix_repeats[-1].text,
    })
    check("state_written_before_kill", saved["written"], saved)
    check("learned_state_intact", repeated.status == 200 and (repeated.mean_accepted_tokens or 0) > 1.5,
          {"repeated": repeated.mean_accepted_tokens, "fresh": fresh.mean_accepted_tokens})
    shutdown = shutdown_probe(server2, args, model)
    restart["sigterm"] = shutdown
    check("sigterm_exits_promptly", shutdown.get("exit_s") is not None
          and shutdown["exit_s"] <= args.shutdown_timeout + 10, shutdown.get("exit_s"))
    stalled_status = shutdown.get("stalled_upload_status")
    stream_status = shutdown["stream"].get("status")
    check("no_unintended_5xx_at_shutdown",
          stalled_status in (None, 408, 503) and (stream_status is None or stream_status in (200, 503))
          and not shutdown["stream"].get("traceback") and "Traceback" not in shutdown["stalled_upload_answer"],
          {"stalled_upload": stalled_status, "stream": shutdown["stream"]})
    server2.close()

    # checks of the mix
    every = records + [final] + burst + [repeated, fresh]
    fives = [r for r in every if r.status is not None and r.status >= 500]
    check("no_5xx", not fives, [asdict(r) for r in fives][:5])
    tracebacks = [r for r in every if "Traceback" in r.problem]
    check("no_traceback_in_bodies", not tracebacks, [asdict(r) for r in tracebacks][:5])
    bad_malformed = [r for r in records if r.kind == "malformed" and not r.ok]
    check("malformed_answered_4xx_in_openai_shape", not bad_malformed, [asdict(r) for r in bad_malformed][:5])
    bad_stalled = [r for r in records if r.kind == "stalled" and not r.ok]
    check("stalled_uploads_timed_out", not bad_stalled, [asdict(r) for r in bad_stalled][:5])
    failed = [r for r in records if not r.ok]
    check("every_mix_request_as_expected", not failed, [asdict(r) for r in failed][:10])
    check("health_answered_throughout", health_summary["failures"] == 0 and health_summary["polls"] > 0,
          health_summary["failure_examples"][:5])

    # report
    by_kind: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_kind[rec.kind].append(rec)
    rows = []
    for kind in MIX:
        group = by_kind.get(kind, [])
        statuses = Counter("closed" if r.status is None else r.status for r in group)
        rows.append([kind, len(group), ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)),
                     sum(r.retries_429 for r in group), sum(not r.ok for r in group)])
    malformed_rows = []
    for name, _, _ in chaos.malformed:
        group = [r for r in records if r.kind == "malformed" and r.variant == name]
        statuses = Counter(r.status for r in group)
        malformed_rows.append([name, len(group), ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)),
                               sum(not r.ok for r in group)])
    normal = [r.latency_s for r in records if r.kind == "normal" and r.status == 200]
    normal_total = [r.total_s for r in records if r.kind == "normal" and r.status == 200]
    stream = [r.latency_s for r in records if r.kind == "stream" and r.status == 200]
    repeat_mat = defaultdict(list)
    for r in sorted(by_kind["repeat"], key=lambda r: r.index):
        if r.mean_accepted_tokens is not None:
            repeat_mat[REPEATED[int(r.variant)]].append(r.mean_accepted_tokens)
    latency = {"normal_p50_s": percentile(normal, 0.5), "normal_p95_s": percentile(normal, 0.95),
               "normal_max_s": max(normal, default=None),
               "normal_with_429_waits_p50_s": percentile(normal_total, 0.5),
               "normal_with_429_waits_p95_s": percentile(normal_total, 0.95),
               "stream_p50_s": percentile(stream, 0.5), "stream_p95_s": percentile(stream, 0.95)}
    server_logs = log_stats(logs)
    all_ok = all(c["ok"] for c in checks.values())
    report = {
        "what": "benchmarks/chaos_test.py: a bounded loopback chaos test of aded serve (issue 30)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {k: v for k, v in vars(args).items() if k != "json_out"}, "model": model,
        "server_command": server.command[1:], "cpus": os.cpu_count(),
        "startup_s": round(startup_s, 1), "mix_s": round(mix_s, 1),
        "wall_s": round(time.monotonic() - wall0, 1),
        "counts": {row[0]: {"n": row[1], "statuses": row[2], "retries_429": row[3], "not_ok": row[4]} for row in rows},
        "malformed": {row[0]: {"n": row[1], "statuses": row[2], "not_ok": row[3]} for row in malformed_rows},
        "latency": latency, "health": health_summary, "health_before_kill": before_kill,
        "repeat_mean_accepted_tokens_in_mix": dict(repeat_mat),
        "final_request": asdict(final), "burst": [asdict(r) for r in burst], "restart": restart,
        "server_logs": server_logs, "checks": checks, "passed": all_ok,
        "records": [{k: v for k, v in asdict(r).items() if k != "text"} for r in records],
    }

    print()
    print(table(rows, ["kind", "n", "statuses", "429 retries", "not ok"]))
    print()
    print(table(malformed_rows, ["malformed variant", "n", "statuses", "not ok"]))
    print()

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    print(f"normal requests (200, {len(normal)}): p50 {fmt(latency['normal_p50_s'])} s, p95 "
          f"{fmt(latency['normal_p95_s'])} s (with 429 waits: p50 {fmt(latency['normal_with_429_waits_p50_s'])} s, "
          f"p95 {fmt(latency['normal_with_429_waits_p95_s'])} s); streams p50 {fmt(latency['stream_p50_s'])} s")
    print(f"/health: {health_summary['polls']} polls, {health_summary['failures']} failures or > {SLOW_HEALTH_S:g} s, "
          f"p50 {health_summary['latency_p50_s']} s, max {health_summary['latency_max_s']} s")
    for prompt, values in repeat_mat.items():
        print(f"repeat {prompt[:40]!r}: mean accepted tokens in order sent: {values}")
    print(f"final request: {final.status} in {final.latency_s} s; burst of {args.max_queue}: "
          f"{[r.status for r in burst]}")
    print(f"restart after kill -9: state {saved}; note {after.get('state')!r}")
    print(f"  repeated prompt: mean accepted tokens {restart['repeated_mean_accepted_tokens']} "
          f"(last in mix {restart['mix_last_repeat_mean_accepted_tokens']}), fresh prompt "
          f"{restart['fresh_mean_accepted_tokens']}; same text as in the mix: {restart['same_text_as_in_mix']}")
    print(f"SIGTERM: exit in {shutdown.get('exit_s')} s, stalled upload answered {stalled_status}, "
          f"stream {shutdown['stream']}")
    print(f"server logs: {server_logs['tracebacks']} tracebacks, {server_logs['error_lines']} ERROR lines "
          f"({workdir})")
    print()
    print(table([[name, "ok" if c["ok"] else "FAILED",
                  "" if c["ok"] else json.dumps(c["detail"], default=str)[:300]] for name, c in checks.items()],
                ["check", "result", "detail"]))
    print(f"\n{'PASSED' if all_ok else 'FAILED'} in {report['wall_s']} s")
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
