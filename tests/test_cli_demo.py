"""`aded demo` decodes its baseline as the benchmark does: clean settings, identical tokens."""

from __future__ import annotations

from aded.api import Aded
from aded.cli.demo import DEMO_PROMPTS, run_demo
from conftest import tiny_llama, tiny_tokenizer


def test_demo_baseline_ignores_the_models_generation_defaults_and_matches_aded():
    model = tiny_llama(vocab_size=99, seed=4)
    config = model.generation_config
    config.do_sample, config.top_k, config.repetition_penalty, config.no_repeat_ngram_size = True, 3, 5.0, 1
    lm = Aded(model, tiny_tokenizer(), drafter="pld", budget="off")
    rows, baseline = run_demo(lm, 10)
    assert baseline == "hf"
    assert [row["task"] for row in rows] == list(DEMO_PROMPTS)
    assert all(row["identical"] and row["tokens"] == 10 for row in rows)

