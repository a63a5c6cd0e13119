"""Shared fixtures of the integration tier: model folders and a runner for one vLLM engine per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
RESULTS = Path(os.environ.get("ADED_INTEGRATION_RESULTS", HERE.parent / "bench-results" / "integration"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's converted safetensors folder (converted once from its GGUF file)."""
    from aded.models import local_dir

    return Path(local_dir("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama with the default model's tokenizer: head_dim 64 (the CPU attention kernels need it), 2 KV heads (TP 2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, folder / name)
    return folder


_RUNS: dict[str, dict] = {}


def run_engine(**options) -> dict:
    """Run `run_vllm.py` with these options in a fresh process; its JSON result (same options: reused)."""
    key = json.dumps(options, default=str, sort_keys=True)
    if key not in _RUNS:
        _RUNS[key] = _run_engine(options)
    return _RUNS[key]


def _run_engine(options: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), json.dumps(options, default=str)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("ADED-RESULT "):
            return json.loads(line[len("ADED-RESULT ") :])
    causes = [line for line in proc.stderr.splitlines() if "Error:" in line][-5:]  # the root cause, not the echo
    raise AssertionError(f"vLLM run failed ({proc.returncode}):\n" + "\n".join(causes) + "\n" + proc.stderr[-2000:])


def report(name: str, payload: dict) -> None:
    """Keep the numbers (bench-results/ is ignored by git) and show them in pytest's output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(f"\n{name}: {json.dumps(payload)}")
