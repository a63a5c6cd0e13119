"""Prometheus metrics in the text exposition format, written by hand (no extra dependency).

What is counted: HTTP requests by endpoint and status, prompt and completion tokens, verification
steps and draft nodes, a histogram of tokens emitted per verification step (the accepted-tokens
distribution; its mean is the mean accepted tokens, 1.0 = plain decoding), request latency,
decode time, and tokens/s both of the last request and over the last minute.

A server with API keys keeps one `Metrics` per key besides the whole server's: how well a request
was drafted tells what the drafter learned from other clients' outputs when the learned state is
shared, so a key reads only its own counters, and of those the speculation figures (steps, draft
nodes, accepted tokens, decode time and speed) only of requests drafted from learned state of its
own (`record_generation(..., private=False)` leaves them out). Admin keys read the whole server's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Metrics", "ACCEPTED_BUCKETS", "LATENCY_BUCKETS"]

ACCEPTED_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WINDOW_S = 60.0


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += times
        self.total += times
        self.sum += value * times

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {_num(self.sum)}", f"{name}_count{suffix} {self.total}"]
        return out


class Metrics:
    """Thread-safe: HTTP counts come from the event loop, generation counts from the worker."""

    def __init__(self, model: str, drafter: str) -> None:
        self._lock = threading.Lock()
        self.model = model
        self.drafter = drafter
        self.http: dict[tuple[str, int], int] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.accepted = _Histogram(ACCEPTED_BUCKETS)
        self.generations = {"finished": 0, "cancelled": 0, "failed": 0}
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.draft_nodes = 0
        self.decode_seconds = 0.0
        self.last_tokens_per_s = 0.0
        self.state_saves = 0
        self.state_save_errors = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, completion tokens)
        self.gauges: dict[str, Callable[[], float]] = {}

    def record_http(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, status)
            self.http[key] = self.http.get(key, 0) + 1
            if endpoint.startswith("/v1/"):
                self.latency.observe(seconds)

    def record_generation(self, outcome: str, prompt_tokens: int, stats, private: bool = True,
                          cached_tokens: int | None = None) -> None:
        """`stats`: the request's `GenerationStats` (None when it never ran); `private`: whether its
        speculation figures may be counted here (see the module's docstring); `cached_tokens`: the
        cached prompt tokens to count (default: the stats')."""
        with self._lock:
            self.generations[outcome] = self.generations.get(outcome, 0) + 1
            if stats is None:
                return
            self.prompt_tokens += prompt_tokens
            self.cached_prompt_tokens += stats.cached_prompt_tokens if cached_tokens is None else cached_tokens
            self.completion_tokens += stats.generated_tokens
            now = time.monotonic()
            self._recent.append((now, stats.generated_tokens))
            self._trim(now)
            if not private:
                return
            self.steps += stats.steps
            self.draft_nodes += stats.draft_nodes
            self.decode_seconds += stats.decode_s
            for length in stats.accepted_lengths:
                self.accepted.observe(length)
            if stats.decode_s > 0:
                self.last_tokens_per_s = stats.decode_tokens_per_s

    def record_save(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.state_saves += 1
            else:
                self.state_save_errors += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _WINDOW_S:
            self._recent.popleft()

    def mean_accepted_tokens(self) -> float:
        with self._lock:
            return self.accepted.sum / self.accepted.total if self.accepted.total else 0.0

    @property
    def finished(self) -> int:
        return self.generations.get("finished", 0)

    def render(self) -> str:
        with self._lock:
            self._trim(time.monotonic())
            window_tokens = sum(n for _, n in self._recent)
            lines = [
                "# HELP aded_info The served model and drafter.",
                "# TYPE aded_info gauge",
                f'aded_info{{model="{_esc(self.model)}",drafter="{_esc(self.drafter)}"}} 1',
                "# HELP aded_http_requests_total HTTP requests by endpoint and status code.",
                "# TYPE aded_http_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.http.items()):
                lines.append(f'aded_http_requests_total{{endpoint="{_esc(endpoint)}",status="{status}"}} {count}')
            lines += ["# HELP aded_request_latency_seconds Time to answer /v1 requests (to the first byte when streaming).",
                      "# TYPE aded_request_latency_seconds histogram", *self.latency.lines("aded_request_latency_seconds"),
                      "# HELP aded_generations_total Generation jobs by outcome.",
                      "# TYPE aded_generations_total counter"]
            lines += [f'aded_generations_total{{outcome="{k}"}} {v}' for k, v in sorted(self.generations.items())]
            lines += _counter("aded_prompt_tokens_total", "Prompt tokens of generations that ran.", self.prompt_tokens)
            lines += _counter("aded_prompt_tokens_cached_total",
                              "Prompt tokens kept from the previous request instead of computed again.",
                              self.cached_prompt_tokens)
            lines += _counter("aded_completion_tokens_total", "Tokens generated.", self.completion_tokens)
            lines += _counter("aded_verification_steps_total", "Target-model verification steps.", self.steps)
            lines += _counter("aded_draft_nodes_total", "Draft tree nodes verified.", self.draft_nodes)
            lines += _counter("aded_decode_seconds_total", "Time spent decoding after prefill.", self.decode_seconds)
            lines += ["# HELP aded_accepted_tokens_per_step Tokens emitted per verification step (bonus included).",
                      "# TYPE aded_accepted_tokens_per_step histogram", *self.accepted.lines("aded_accepted_tokens_per_step")]
            lines += _gauge("aded_last_decode_tokens_per_second", "Decode tokens/s of the last request.", self.last_tokens_per_s)
            lines += _gauge("aded_tokens_per_second", f"Tokens generated per second over the last {_WINDOW_S:.0f} s.",
                            window_tokens / _WINDOW_S)
            lines += _counter("aded_state_saves_total", "Learned drafter state saved.", self.state_saves)
            lines += _counter("aded_state_save_errors_total", "Failed saves of the learned state.", self.state_save_errors)
            gauges = dict(self.gauges)
        for name, read in sorted(gauges.items()):
            lines += _gauge(name, name.replace("_", " "), read())
        return "\n".join(lines) + "\n"


def _counter(name: str, help_: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {_num(value)}"]


def _gauge(name: str, help_: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
