"""A bounded load test of `aded serve`: N clients for T seconds on loopback, one repeated workload.

    python benchmarks/load_test.py --clients 4 --duration 120 --drafter hybrid
    python benchmarks/load_test.py --clients 4 --duration 120 --big-clients 2

Starts the server in a subprocess on 127.0.0.1 (or uses `--url`, which must be a loopback
address), then every client streams greedy requests from the same small set until the time is up
(each client also stops after `--max-requests`). The report gives requests served, errors, time to
first token and latency (p50/p95/max), generated tokens per second of wall time, and the drafter's
mean accepted tokens (tokens per verification step, 1.0 = plain decoding) by how often the prompt
had been served before: as the drafter learns from earlier outputs, later passes draft more.

With `--big-clients M` the time is split in two phases: the clients alone, then the same clients
while M more send 1 MB bodies of `--big-messages` one-character messages (the body of issue 14,
refused after tokenization as longer than any context: pure parsing work). The check: no client's
time to first token grows by more than one request's service time (the p50 latency alone) because
of another's parsing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

WORKLOAD = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in three sentences what a hash table is.",
    "List five fruits and one fact about each.",
    "Write a haiku about the sea.",
    "Give step-by-step instructions to boil an egg.",
    "Summarise the plot of Romeo and Juliet in four sentences.",
    "Write a SQL query that counts orders per customer.",
    "What are the three states of matter? Answer briefly.",
]


@dataclass
class Result:
    prompt: int
    seen_before: int  # how many times this prompt had been sent before this request
    latency_s: float
    completion_tokens: int
    steps: int
    ttft_s: float | None = None  # time to the first generated text
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "aded.cli", "serve", "--model", args.model, "--drafter", args.drafter,
               "--port", str(port), "--log-level", "warning", "--budget", args.budget]
    if args.state:
        command += ["--state", args.state]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def stream_once(http: httpx.Client, body: dict) -> tuple[float | None, int, int]:
    """(time to first text, completion tokens, verification steps) of one streamed request."""
    start, ttft, tokens, steps = time.perf_counter(), None, 0, 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:120]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
            steps = chunk.get("aded", {}).get("steps", steps)
    return ttft, tokens, steps


def run_clients(url: str, model: str, args, duration: float, sent: list[int]) -> tuple[list[Result], float]:
    lock = threading.Lock()
    results: list[Result] = []
    counter = iter(range(1 << 30))
    stop_at = time.monotonic() + duration

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.request_timeout, headers=args.headers) as http:
            for _ in range(args.max_requests):
                if time.monotonic() >= stop_at:
                    return
                with lock:
                    index = next(counter) % len(WORKLOAD)
                    seen = sent[index]
                    sent[index] += 1
                body = {"model": model, "messages": [{"role": "user", "content": WORKLOAD[index]}],
                        "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                start = time.perf_counter()
                try:
                    ttft, tokens, steps = stream_once(http, body)
                    result = Result(index, seen, time.perf_counter() - start, tokens, steps, ttft)
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    result = Result(index, seen, time.perf_counter() - start, 0, 0, None, f"{type(exc).__name__}: {exc}")
                with lock:
                    results.append(result)

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - start


def send_big_bodies(url: str, model: str, args, stop: threading.Event) -> list[tuple[int, float]]:
    """(status, seconds) of each big body sent by `--big-clients` clients until `stop`."""
    body = json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]
                       * args.big_messages}, separators=(",", ":")).encode()
    out: list[tuple[int, float]] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.request_timeout,
                          headers={**args.headers, "Content-Type": "application/json"}) as http:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    status = http.post("/v1/chat/completions", content=body).status_code
                except httpx.HTTPError:
                    status = 0
                out.append((status, time.perf_counter() - start))

    threads = [threading.Thread(target=client) for _ in range(args.big_clients)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(results: list[Result], wall_s: float, args) -> dict:
    ok = [r for r in results if r.error is None]
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    by_pass: dict[int, list[Result]] = {}
    for r in ok:
        by_pass.setdefault(r.seen_before, []).append(r)
    mat = {}
    for seen, group in sorted(by_pass.items()):
        steps = sum(r.steps for r in group)
        # tokens per verification step; the prefill's first token is not a step
        mat[seen] = round(sum(max(0, r.completion_tokens - 1) for r in group) / steps, 3) if steps else None
    return {
        "clients": args.clients, "duration_s": round(wall_s, 1), "drafter": args.drafter, "model": args.model,
        "requests_served": len(ok), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "latency_p50_s": round(percentile(latencies, 0.50), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "ttft_p50_s": round(percentile(ttfts, 0.50), 3), "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "ttft_max_s": round(max(ttfts), 3) if ttfts else None,
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall_s, 2),
        "mean_accepted_tokens_by_pass": mat,
        "requests_by_pass": {seen: len(group) for seen, group in sorted(by_pass.items())},
    }


def run(url: str, args) -> dict:
    """The whole load test against a running server: one phase, or alone then with big bodies."""
    model = args.served_model_name or httpx.get(url + "/v1/models", headers=args.headers).json()["data"][0]["id"]
    sent = [0] * len(WORKLOAD)
    if not args.big_clients:
        results, wall = run_clients(url, model, args, args.duration, sent)
        return report(results, wall, args)
    alone = report(*run_clients(url, model, args, args.duration / 2, sent), args)
    stop = threading.Event()
    big: list[tuple[int, float]] = []
    sender = threading.Thread(target=lambda: big.extend(send_big_bodies(url, model, args, stop)))
    sender.start()
    try:
        loaded = report(*run_clients(url, model, args, args.duration / 2, sent), args)
    finally:
        stop.set()
        sender.join()
    service_s = alone["latency_p50_s"]
    growth = {q: round(loaded[f"ttft_{q}_s"] - alone[f"ttft_{q}_s"], 3) for q in ("p95", "max")}
    return {"alone": alone, "with_big_bodies": loaded,
            "big_bodies": {"sent": len(big), "statuses": sorted({status for status, _ in big}),
                           "seconds_p50": round(percentile([s for _, s in big], 0.5), 3)},
            "ttft_growth_s": growth, "one_service_time_s": service_s,
            "ttft_growth_within_one_service_time": growth["max"] <= service_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--drafter", default="hybrid")
    parser.add_argument("--budget", default="measured")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (at most 3600)")
    parser.add_argument("--max-requests", type=int, default=200, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--state", default=None, help="--state file for the server")
    parser.add_argument("--url", default=None, help="an already running server on a loopback address")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--big-clients", type=int, default=0, help="clients sending 1 MB bodies in a second phase")
    parser.add_argument("--big-messages", type=int, default=30_000, help="one-character messages per big body")
    parser.add_argument("--api-key", default=None, help="bearer token of a server started with one")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if not 0 < args.duration <= 3600 or not 1 <= args.clients <= 64 or not 0 <= args.big_clients <= 16:
        parser.error("--duration must be in (0, 3600], --clients in [1, 64] and --big-clients in [0, 16]")

    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error(f"--url must be a loopback address, got {args.url}")
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        summary = run(url, args)
        summary["server_mean_accepted_tokens"] = httpx.get(url + "/health").json().get("mean_accepted_tokens")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
