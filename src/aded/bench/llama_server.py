"""llama.cpp's own `llama-server` as a benchmark peer: the server a CPU user already has, with its
model-free speculation (`--spec-type ngram-*`).

Methods `llama-server` (plain) and `llama-server-<type>` run one server process each, started on the
runner's file with its context size, batch, threads and weight layout (`--no-repack` where the
runner runs without repacking), flash attention off as aded's runner has it, one slot. A turn is one
`/completion` request with the prompt's token ids, so every engine sees the same ids; the wall time
is the client's (request sent to answer read, loopback HTTP included), split into prefill and decode
by the server's own `timings.prompt_ms`. The server reports totals only (tokens drafted and
accepted), so its steps are spread evenly over the turn for the mean accepted tokens.

A session's turn keeps the server's prompt cache (`cache_prompt`), as its users run it; a session's
first turn sends `cache_prompt: false`, so no session starts from another's cells. The server's
maintainers say its speculative output is not bit-identical to its plain decoding: the report's
identity column says how often it is here.

The binary is built by `scripts/build-llama-server.sh` (optional, once per machine) from the same
llama.cpp source and kernel flags as the installed llama-cpp-python.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from aded.bench.methods import DecodeSettings, SettingsMethod, TurnResult

__all__ = ["SPEC_TYPES", "METHODS", "LlamaServerMethod", "server_binary", "BUILD_HINT"]

#: llama-server's model-free speculation types (the draft-model types need a second model)
SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
METHODS = ("llama-server", *(f"llama-server-{kind}" for kind in SPEC_TYPES))
BUILD_HINT = ("llama-server is not built here: `bash scripts/build-llama-server.sh` builds it from the "
              "llama.cpp source of the installed llama-cpp-python (about 10 minutes on 2 cores, once), "
              "or set ADED_LLAMA_SERVER to a llama-server binary")
#: seconds a server may take to load a model and answer /health
START_TIMEOUT_S = 180


def server_binary() -> Path | None:
    """$ADED_LLAMA_SERVER, else the one the build script links into this environment, else PATH's."""
    named = os.environ.get("ADED_LLAMA_SERVER")
    if named:
        return Path(named) if Path(named).is_file() else None
    beside = Path(sys.executable).with_name("llama-server")
    if beside.is_file():
        return beside
    found = shutil.which("llama-server")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServerMethod(SettingsMethod):
    """One llama-server process for one method name."""

    def __init__(self, name: str, runner, settings: DecodeSettings) -> None:
        import httpx

        if name not in METHODS:
            raise ValueError(f"unknown llama-server method {name!r}; choose from: {', '.join(METHODS)}")
        binary = server_binary()
        if binary is None:
            raise RuntimeError(BUILD_HINT)
        self.name = name
        self.settings = settings
        self.spec_type = name[len("llama-server-"):] if name != "llama-server" else None
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(binary), *runner.server_args(), "--host", "127.0.0.1", "--port", str(self.port),
                "--no-webui", "--seed", str(settings.seed)]
        if self.spec_type:
            args += ["--spec-type", self.spec_type]
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.close)
        self._client = httpx.Client(timeout=None)
        self._fresh = True
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self._proc.returncode}: {self._log_tail()}")
            try:
                if self._client.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"llama-server did not answer within {START_TIMEOUT_S} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-5:]) or "(no output)"

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def resume(self, held: Sequence[int]) -> None:
        self._fresh = not held  # a new session: the next request keeps nothing of the last one

    def run(self, prompt_ids: list[int], baseline_ids: list[int] | None) -> TurnResult:
        s = self.settings
        body = {"prompt": list(prompt_ids), "n_predict": s.max_new_tokens, "cache_prompt": not self._fresh,
                "return_tokens": True, "seed": s.seed, "repeat_penalty": 1.0, "stream": False,
                "temperature": s.temperature if not s.greedy else 0.0,
                "top_k": s.top_k if not s.greedy else 1, "top_p": s.top_p if not s.greedy else 1.0,
                "min_p": 0.0}
        start = time.perf_counter()
        reply = self._client.post(self.url + "/completion", json=body)
        wall = time.perf_counter() - start
        if reply.status_code != 200:
            raise RuntimeError(f"llama-server answered {reply.status_code}: {reply.text[:300]}")
        self._fresh = False
        data = reply.json()
        output = [int(t) for t in data.get("tokens", [])]
        timings = data.get("timings", {})
        prefill = min(float(timings.get("prompt_ms", 0.0)) / 1000.0, wall)
        decoded = max(len(output) - 1, 0)  # after the first token, which the prompt's pass gives
        accepted = min(int(timings.get("draft_n_accepted", 0)), decoded)
        steps = max(decoded - accepted, 1) if decoded else 0
        lengths = [decoded // steps + (i < decoded % steps) for i in range(steps)] if steps else []
        return TurnResult(output, prefill, wall - prefill, lengths, 1 if output else 0,
                          draft_nodes=int(timings.get("draft_n", 0)), cached_tokens=int(timings.get("cache_n", 0)))
