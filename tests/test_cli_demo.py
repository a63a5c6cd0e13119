"""`aded demo` decodes its baseline as the benchmark does: clean settings, identical tokens."""

from __future__ import annotations

from conftest import tiny_llama, tiny_tokenizer

from aded.api import Aded
from aded.cli.demo import DEMO_PROMPTS, print_demo, run_demo


def test_demo_baseline_ignores_the_models_generation_defaults_and_matches_aded():
    model = tiny_llama(vocab_size=99, seed=4)
    config = model.generation_config
    config.do_sample, config.top_k, config.repetition_penalty, config.no_repeat_ngram_size = True, 3, 5.0, 1
    lm = Aded(model, tiny_tokenizer(), drafter="pld", budget="off")
    session = [[{"role": "user", "content": "def add(a, b): return a + b"}],
               [{"role": "user", "content": "Add type hints."}], [{"role": "user", "content": "And a docstring."}]]
    rows, baseline = run_demo(lm, 10, [("session", session), ("story", [[{"role": "user", "content": "Once"}]])])
    assert baseline == "hf"
    assert [row["task"] for row in rows] == ["session 1", "session 2", "session 3", "story"]
    assert all(row["identical"] and 1 <= row["tokens"] <= 10 for row in rows)


def test_the_demo_runs_a_shipped_session_and_a_free_writing_prompt():
    from aded.cli.demo import _conversations

    (session, turns), *singles = _conversations()
    assert session == "edit loop" and len(turns) >= 3
    assert [task for task, _ in singles] == list(DEMO_PROMPTS)


def test_the_demo_says_why_where_aded_is_not_faster(capsys):
    rows = [{"task": "free writing", "tokens": 10, "baseline_s": 1.0, "aded_s": 1.1, "kept_tokens": 0,
             "mean_accepted_tokens": 1.0, "identical": True, "text": "..."}]
    print_demo(rows, "suffix", "llama.cpp", extra_cost=0.8)
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())  # the console wraps long lines
    assert "Not faster on free writing" in out and "80% of a step" in out

