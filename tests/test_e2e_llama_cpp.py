"""End to end on the real default model, llama.cpp backend: the tokenizer speaks llama.cpp's ids,
and every drafter's greedy output equals what llama-cpp-python's own `Llama.generate` gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_llama_cpp

pytestmark = pytest.mark.e2e
llama_cpp = import_llama_cpp()  # fails when missing; skips only under ADED_SKIP_LLAMA=1

ADED = Path(sys.executable).with_name("aded")
MAX_NEW = 48
PROMPTS = [
    "Repeat this list exactly, then add one more fruit: apple, banana, cherry, date, elderberry.",
    "Fix the bug and return the whole function:\ndef area(r):\n    return 3.14 * r * 2\n",
]


@pytest.fixture(scope="module")
def lm():
    import aded

    lm = aded.load(drafter="none", budget="typical", backend="llama.cpp")
    assert lm.backend == "llama.cpp"
    return lm


@pytest.fixture(scope="module")
def reference(lm):
    """llama-cpp-python as a user runs it, on the same file, context size and threads."""
    runner = lm.runner
    llm = llama_cpp.Llama(model_path=str(runner.path), n_ctx=runner.n_ctx, n_threads=runner.n_threads,
                          n_threads_batch=runner.n_threads, verbose=False)

    def greedy(ids: list[int]) -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if token in runner.eos_token_ids or len(out) >= MAX_NEW:
                break
        return out

    return greedy


def test_tokenizer_gives_llama_cpp_ids_on_the_shipped_prompts(lm):
    from aded.bench.questions import load_questions

    questions = load_questions()
    assert len(questions) >= 8
    for question in questions:
        messages = [{"role": "user", "content": question.turns[0]}]
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert lm.prompt_ids(messages) == lm.runner.tokenize(text), question.id
        plain = question.turns[0]
        assert lm.tokenizer(plain)["input_ids"] == lm.runner.tokenize(plain, parse_special=False)


@pytest.mark.parametrize("drafter", ["none", "pld", "suffix", "hybrid", "aded"])
def test_every_drafter_equals_llama_cpp_greedy(lm, reference, drafter):
    import aded

    speculative = aded.Aded(lm.runner, lm.tokenizer, drafter=drafter, budget="off")
    for prompt in PROMPTS:
        ids = speculative.prompt_ids(prompt)
        assert speculative.generate(ids, max_new_tokens=MAX_NEW).token_ids == reference(ids)


def test_cli_picks_llama_cpp_for_the_default_model_and_matches_it(lm, reference):
    proc = subprocess.run([str(ADED), "generate", "--json", "--drafter", "pld", "-n", str(MAX_NEW),
                           PROMPTS[0]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["token_ids"] == reference(data["prompt_token_ids"])


def test_a_conversation_runs_only_its_new_tokens_and_stays_llama_cpp_greedy(lm, reference):
    """On the default file llama.cpp's cells are exact whatever wrote them, so each turn keeps the
    conversation so far: its prefill runs the new message, not the whole history."""
    import aded

    assert lm.runner.reuse_prefix
    chat = aded.Aded(lm.runner, lm.tokenizer, drafter="suffix", budget="off")
    messages = []
    for turn, text in enumerate(["Name three colours.", "Now name three more.", "Which of them is warmest?"]):
        messages.append({"role": "user", "content": text})
        out = chat.generate(messages, max_new_tokens=MAX_NEW)
        assert out.token_ids == reference(out.prompt_token_ids)
        if turn:
            assert out.stats.cached_prompt_tokens > len(out.prompt_token_ids) // 2
        messages.append({"role": "assistant", "content": out.text})


def test_a_session_bench_keeps_prompts_and_every_exact_method_equals_llama_cpp(lm, tmp_path):
    """The shipped sessions, as `aded bench -q sessions` runs them: later turns keep the prompt
    the conversation shares on both engines, aded equals llama.cpp's plain decoding with its
    prompt cache on every turn, and the opt-in batched mode is run and judged beside it."""
    from aded.bench.questions import load_questions
    from aded.bench.report import render_report, turn_speedups
    from aded.bench.runner import BenchConfig, run_bench

    sessions = [q for q in load_questions(["sessions"]) if q.category in ("edit-loop", "agent-loop")][:2]
    results = run_bench(lm.runner, lm.tokenizer, sessions, ["llama.cpp", "suffix", "edit", "suffix+batched"],
                        BenchConfig(max_new_tokens=24, budget="typical", warmup=False), model_name="default")
    rows = {(r["id"], r["method"]): r for r in results["questions"]}
    for session in sessions:
        for method in ("llama.cpp", "suffix", "edit"):
            turns = rows[(session.id, method)]["turns"]
            assert len(turns) == len(session.turns)
            assert turns[0]["cached_tokens"] == 0
            assert all(t["cached_tokens"] > 0 for t in turns[1:]), (session.id, method)
        for method in ("suffix", "edit"):
            assert rows[(session.id, method)]["identical_to_baseline"] is True, (session.id, method)
        assert rows[(session.id, "suffix+batched")]["identical_to_baseline"] is not None
    assert len(turn_speedups(results["questions"], "suffix", "llama.cpp")) == max(len(s.turns) for s in sessions)
    assert "Whole turns, prefill included" in render_report(results)
