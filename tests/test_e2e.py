"""End to end on the real default model, HF backend: the CLI's tokens equal transformers' greedy
generate (tests/test_e2e_llama_cpp.py does the same for the llama.cpp backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Repeat this list exactly, then add one more fruit: apple, banana, cherry, date, elderberry.",
    "Write two sentences about the moon.",
    "Fix the bug and return the whole function:\ndef area(r):\n    return 3.14 * r * 2\n",
]
MAX_NEW = 48
ADED = Path(sys.executable).with_name("aded")


@pytest.fixture(scope="module")
def default_lm():
    import aded

    return aded.load(drafter="none", budget="typical", backend="hf")


def hf_greedy(lm, ids):
    with torch.inference_mode():
        input_ids = torch.tensor([ids])
        out = lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cli_json_with_pld_equals_transformers_greedy(default_lm, prompt):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [str(ADED), "generate", "--json", "--backend", "hf", "--drafter", "pld", "--budget", "typical",
         "-n", str(MAX_NEW), prompt],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["prompt_token_ids"] == default_lm.prompt_ids(prompt)
    assert data["token_ids"] == hf_greedy(default_lm, data["prompt_token_ids"])
    assert data["finish_reason"] in ("stop", "length")
    assert data["stats"]["steps"] >= 1 and data["stats"]["mean_accepted_tokens"] >= 1.0


@pytest.mark.parametrize("drafter", ["suffix", "hybrid", "aded"])
def test_every_drafter_equals_greedy_on_the_default_model(default_lm, drafter):
    import aded

    lm = aded.Aded(default_lm.model, default_lm.tokenizer, drafter=drafter, budget="off")
    for prompt in PROMPTS[::2]:
        ids = lm.prompt_ids(prompt)
        assert lm.generate(ids, max_new_tokens=MAX_NEW).token_ids == hf_greedy(lm, ids)


def test_unknown_model_is_one_clear_line():
    proc = subprocess.run([str(ADED), "generate", "--model", "no/such/model", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'no/such/model'")
    assert "Traceback" not in proc.stderr
