"""aded's proposer inside vLLM on the CPU: greedy output unchanged, drafts accepted, TP 1 and 2."""

from __future__ import annotations

import pytest
from conftest import report, run_engine

# copy-heavy prompts (where model-free drafts pay) and one open question
PROMPTS = [
    "Repeat this list exactly, twice: apples, pears, plums, cherries, grapes, melons, lemons.",
    "Here is a Python function:\ndef add(a, b):\n    return a + b\n\nRewrite it with type hints, keeping the body the same.",
    "Write the numbers from 1 to 30 separated by commas.",
    "What is the capital of France? Answer in one sentence.",
]
K = 4


def summary(result: dict) -> dict:
    drafts = result["num_drafts"]
    return {
        "tokens_per_s": round(result["tokens_per_s"], 2),
        "num_generated": result["num_generated"],
        "num_drafts": drafts,
        "accepted_per_draft": round(result["num_accepted_tokens"] / drafts, 3) if drafts else 0.0,
        "acceptance_rate": round(result["num_accepted_tokens"] / result["num_draft_tokens"], 3) if result["num_draft_tokens"] else 0.0,
    }  # fmt: skip


@pytest.mark.parametrize("tp", [1, 2])
def test_tiny_random_model_greedy_identity(tiny_model_dir, tp):
    common = dict(model=tiny_model_dir, prompts=PROMPTS, max_tokens=48, k=K, ignore_eos=True)
    plain = run_engine(**common, tp=1, method=None)
    aded = run_engine(**common, tp=tp, method="aded", drafter="aded")
    assert aded["token_ids"] == plain["token_ids"]
    assert aded["num_accepted_tokens"] > 0
    report(f"vllm-tiny-tp{tp}", {"plain": summary(plain), "aded": summary(aded)})


def test_default_model_greedy_identity_and_speed_against_ngram(default_model_dir):
    common = dict(model=default_model_dir, prompts=PROMPTS, max_tokens=96, k=K)
    plain = run_engine(**common, method=None)
    results = {"plain": summary(plain)}
    for name, options in {"aded-pld": dict(method="aded", drafter="pld"), "aded-hybrid": dict(method="aded", drafter="hybrid"),
                          "vllm-ngram": dict(method="ngram")}.items():  # fmt: skip
        result = run_engine(**common, **options)
        assert result["token_ids"] == plain["token_ids"], name
        results[name] = summary(result)
    assert results["aded-pld"]["accepted_per_draft"] > 0 and results["aded-hybrid"]["accepted_per_draft"] > 0
    report("vllm-default-model", results)
