"""What the server tests share: a tiny model saved to a folder, and three ways to serve it.

- `Server(model, *cli_flags)`: `aded serve` in a subprocess (the CLI as users run it);
- `Server(model, config={...})`: a subprocess built from `ServerConfig` fields (tests/serve_config.py),
  for settings the CLI may not expose yet, and for `kill -9`;
- `serve_in_thread(app)`: uvicorn in this process, for tests that reach into the model or tokenizer;
- `ForkedServer(model_dir, config)`: a child forked from this process (imports already done), so
  tests that kill and restart a server many times spend seconds, not minutes, on start-ups.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"


def save_tiny_model(folder: Path) -> None:
    """A character-level tokenizer with a chat template and a random 2-layer Llama on it."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for char in string.printable:
        if char not in "\x0b\x0c\r":
            vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked logits: no float32 near-ties between tree and sequential argmax
        model.lm_head.weight.mul_(30.0)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


#: a chat template that renders `tools` and `<tool_call>` as Hermes' (Qwen2.5's) does
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_byte_level_model(folder: Path, template: str | None) -> None:
    """A tiny random Llama over the default model's byte-level tokenizer (offline), which llguidance
    reads, with `template` as its chat template (None: the tokenizer's own)."""
    import torch
    from offline_tokenizers import default_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = default_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def scripted_lm(tokenizer, text: str, end: bool = True):
    """An `Aded` whose greedy answer to any prompt is `text` (then EOS, if `end`): a runner that
    follows a script (tests/scripted.py), so a test chooses what the "model" writes."""
    from scripted import ScriptedRunner

    from aded.api import Aded

    script = tokenizer(text, add_special_tokens=False)["input_ids"]
    script += [tokenizer.eos_token_id] if end else []
    return Aded(ScriptedRunner(script, len(tokenizer), max_positions=4096), tokenizer, "pld", budget="off")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model, saved once per test module that imports this fixture."""
    folder = tmp_path_factory.mktemp("server") / MODEL
    save_tiny_model(folder)
    return folder


def load_tiny(model_dir: Path):
    """An `Aded` over the tiny model with the suffix drafter (learns), no budget policy."""
    import aded

    return aded.load(str(model_dir), drafter="suffix", budget="off")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not come up in {timeout} s")


class Server:
    """A server in a subprocess on 127.0.0.1: `aded serve` with `cli_flags`, or `config` fields."""

    def __init__(self, model: str | Path, *cli_flags: str, drafter: str = "suffix", timeout: float = 90,
                 config: dict | None = None, env: dict | None = None, api_key: str = "unused") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "ADED_CACHE_DIR": os.environ.get("ADED_CACHE_DIR", str(ROOT / "tests" / ".cache-tests")),
               **(env or {})}
        if config is None:
            command = [sys.executable, "-m", "aded.cli", "serve", "--model", str(model), "--drafter", drafter,
                       "--port", str(self.port), "--budget", "typical", "--log-level", "warning", *cli_flags]
        else:
            command = [sys.executable, str(ROOT / "tests" / "serve_config.py"), str(model), drafter,
                       str(self.port), json.dumps(config)]
        self.log = tempfile.TemporaryFile("w+")  # the server's output, gone when the test is
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, timeout, alive=lambda: self.proc.poll() is None)
        except RuntimeError as exc:
            if self.proc.poll() is None:
                self.kill()
            raise RuntimeError(f"{exc} (code {self.proc.returncode}):\n{self.output()}") from None
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        self.api_key = api_key  # /health tells what the server did only to key holders, where keys are set

    def output(self) -> str:
        if self.log.closed:
            return self._output
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def _close_log(self) -> None:
        self._output = self.output()
        self.log.close()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10, headers={"Authorization": f"Bearer {self.api_key}"}).json()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._close_log()
        return code

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown hook runs
        self.proc.wait(30)
        self._close_log()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """uvicorn serving `app` on a free loopback port in this process; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def _serve_forked(model_dir: str, fields: dict, port: int) -> None:
    import aded
    from aded.server.app import ServerConfig, create_app
    from aded.server.run import serve

    lm = aded.load(model_dir, drafter="suffix", budget="typical")
    app = create_app(lm, ServerConfig(model_name=MODEL, **fields))
    serve(app, "127.0.0.1", port, "warning")


class ForkedServer:
    """The tiny model served by a forked child process with `ServerConfig` fields; `kill()` is SIGKILL."""

    def __init__(self, model_dir: Path, **fields) -> None:
        import multiprocessing

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve_forked, args=(str(model_dir), fields, self.port), daemon=True)
        self.proc.start()
        try:
            wait_healthy(self.url, 120, alive=self.proc.is_alive)
        except RuntimeError:
            self.kill()
            raise
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown hook runs
        self.proc.join(30)


def post(url: str, path: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    """A POST of `body` (JSON-encoded unless bytes) as application/json."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def chat(client, text: str, max_tokens: int = 24, stream: bool = False, **options) -> str:
    messages = [{"role": "user", "content": text}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                               temperature=0, **options)
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True, **options)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def state_arrays(path: Path, model_dir: Path, drafter: str = "suffix") -> dict:
    """The arrays of a learned-state file written by a server of the tiny model."""
    from transformers import AutoTokenizer

    from aded.server.state import StateFile
    from aded.store.datastore import tokenizer_identity

    identity = tokenizer_identity(AutoTokenizer.from_pretrained(str(model_dir)))
    return StateFile(path, drafter, identity).read()[1]


def learned_outputs(path: Path, model_dir: Path) -> list[str]:
    """The outputs the suffix drafter's global index holds, as text."""
    from transformers import AutoTokenizer

    arrays = state_arrays(path, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens, out, start = arrays["tokens"].tolist(), [], 0
    for length in arrays["lengths"].tolist():
        out.append(tokenizer.decode(tokens[start:start + length], skip_special_tokens=True))
        start += length
    return out


@pytest.fixture(scope="module")
def hermes():
    """The default tokenizer with a Hermes tool-call template: what tool tests script a model over."""
    from offline_tokenizers import default_tokenizer

    tokenizer = default_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer
