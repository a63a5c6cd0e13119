"""The whole `aded bench` command on a tiny random model: files, results.json schema, simulate,
compare; and, in float64, every greedy method equals the baseline token for token."""

from __future__ import annotations

import json
import string

import pytest
from conftest import tiny_llama
from typer.testing import CliRunner

from aded.bench.questions import Question
from aded.bench.report import render_report
from aded.bench.runner import BenchConfig, run_bench
from aded.cli import app
from aded.replay import recorded_from_results

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_char_tokenizer(chat: bool = True):
    """One token per printable character (vocabulary 101), so a tiny model can read real questions."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<pad>", "</s>", "\n", *string.printable[:95]]
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


QUESTIONS = [
    {"id": 1, "category": "chat", "turns": ["Say hello to the user.", "Now say it again, louder."]},
    {"id": 2, "category": "code", "turns": ["def add(a, b):\n    return a + b\nRename add to plus."]},
    {"id": 3, "category": "math", "turns": ["What is 12 + 30? Show the steps."]},
]

ROW_KEYS = {"id", "category", "method", "tokens", "steps", "mean_accepted_tokens", "decode_s", "prefill_s",
            "identical_to_baseline"}
SUMMARY_KEYS = {"method", "category", "questions", "mean_accepted_tokens", "tokens_per_s", "speedup",
                "identical"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=160, seed=3, logit_scale=4.0)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "tiny.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_bench_command_writes_files_and_schema(model_dir, questions_file, tmp_path):
    out = tmp_path / "run"
    cli = CliRunner()
    result = cli.invoke(app, ["bench", "--model", str(model_dir), "-q", str(questions_file),
                              "--methods", "hf,pld", "-n", "12", "--threads", "1", "--budget", "typical",
                              "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.json", "report.md", "speedup.png", "accepted_lengths.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert {"model", "machine", "config", "questions", "summary"} <= set(results)
    assert {"cpu", "cores", "threads", "torch", "dtype"} <= set(results["machine"])
    assert results["machine"]["threads"] == 1 and results["machine"]["dtype"] == "float32"
    assert len(results["questions"]) == 2 * len(QUESTIONS)
    for row in results["questions"]:
        assert ROW_KEYS <= set(row)
        assert row["tokens"] >= 1 and row["decode_s"] >= 0 and row["prefill_s"] > 0
    hf_rows = [r for r in results["questions"] if r["method"] == "hf"]
    assert [len(r["output_token_ids"]) for r in hf_rows] == [2, 1, 1]  # one list per turn
    assert all(len(p) > 0 for r in hf_rows for p in r["prompt_token_ids"])
    categories = {(s["method"], s["category"]) for s in results["summary"]}
    assert categories == {(m, c) for m in ("hf", "pld") for c in ("all", "chat", "code", "math")}
    for entry in results["summary"]:
        assert SUMMARY_KEYS <= set(entry)
    assert "| Method | chat | code | math |" in (out / "report.md").read_text()

    sim = cli.invoke(app, ["simulate", "--recorded", str(out), "--drafters", "pld,suffix", "--json"])
    assert sim.exit_code == 0, sim.output
    summary = json.loads(sim.stdout)["summary"]
    assert {(s["drafter"], s["category"]) for s in summary} >= {("pld", "all"), ("suffix", "math")}
    assert {"drafter", "category", "mean_accepted_tokens", "nodes_per_step", "accepted_per_node"} <= set(summary[0])
    twice = cli.invoke(app, ["simulate", "--recorded", str(out), "--drafters", "pld", "--repeats", "2"])
    assert twice.exit_code == 0, twice.output
    assert "| pld | all |" in twice.stdout and "x (" in twice.stdout  # speedup with its range

    diff = cli.invoke(app, ["bench", "compare", str(out), str(out / "results.json")])
    assert diff.exit_code == 0 and "| pld | all |" in diff.stdout and "+0.0%" in diff.stdout


def test_unknown_method_is_an_error_and_unavailable_is_skipped(model_dir, questions_file, tmp_path,
                                                               monkeypatch):
    cli = CliRunner()
    bad = cli.invoke(app, ["bench", "--model", str(model_dir), "-q", str(questions_file),
                           "--methods", "hf,turbo", "--threads", "1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method(s) 'turbo'" in bad.output

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "draftretriever" else real(name, *a))
    from aded.models import load_model

    model, tokenizer = load_model(model_dir)
    results = run_bench(model, tokenizer, [Question("1", "chat", ("Hi",))], ["aded-reference", "none"],
                        BenchConfig(max_new_tokens=4, budget="off", warmup=False))
    assert results["skipped"][0]["method"] == "aded-reference"
    assert "draftretriever is not installed" in results["skipped"][0]["reason"]
    assert {r["method"] for r in results["questions"]} == {"hf", "none"}


def test_greedy_methods_equal_baseline_in_float64():
    model = tiny_llama(vocab_size=160, seed=5, logit_scale=4.0)
    questions = [Question(str(q["id"]), q["category"], tuple(q["turns"])) for q in QUESTIONS]
    results = run_bench(model, tiny_char_tokenizer(), questions, ["hf-pld", "pld", "suffix", "oracle"],
                        BenchConfig(max_new_tokens=16, budget="typical"))
    assert results["skipped"] == []
    for entry in results["summary"]:
        assert entry["identical"] == 1.0, entry
    oracle = next(s for s in results["summary"] if s["method"] == "oracle" and s["category"] == "all")
    pld = next(s for s in results["summary"] if s["method"] == "pld" and s["category"] == "all")
    assert oracle["mean_accepted_tokens"] >= pld["mean_accepted_tokens"] and oracle["mean_accepted_tokens"] > 2


def test_sampling_run_reports_no_identity():
    model = tiny_llama(vocab_size=160, seed=5, logit_scale=4.0)
    results = run_bench(model, tiny_char_tokenizer(chat=False), [Question("1", "chat", ("Hi", "More"))],
                        ["pld"], BenchConfig(max_new_tokens=6, temperature=0.8, top_k=20, budget="off",
                                             warmup=False))
    assert results["config"]["chat_template"] is False and results["config"]["interrupted"] is False
    for entry in results["summary"]:
        assert entry["identical"] is None and entry["tokens_per_s"] is not None
    pld = next(r for r in results["questions"] if r["method"] == "pld")
    assert pld["identical_to_baseline"] is None and len(pld["turns"]) == 2


def test_repeats_run_every_turn_again_and_keep_one_recording_per_turn():
    model = tiny_llama(vocab_size=160, seed=5, logit_scale=4.0)
    questions = [Question(str(q["id"]), q["category"], tuple(q["turns"])) for q in QUESTIONS]
    config = BenchConfig(max_new_tokens=12, budget="off", warmup=False)
    # suffix learns every output: a repeat drafting from its own earlier answer would take fewer steps
    once = run_bench(model, tiny_char_tokenizer(), questions, ["pld", "suffix", "oracle"], config)
    thrice = run_bench(model, tiny_char_tokenizer(), questions, ["pld", "suffix", "oracle"],
                       BenchConfig(max_new_tokens=12, budget="off", warmup=False, repeats=3))
    rows = {(r["id"], r["method"]): r for r in once["questions"]}
    for row in thrice["questions"]:
        single = rows[(row["id"], row["method"])]
        assert [t["repeat"] for t in row["turns"]] == [r for _ in single["turns"] for r in range(3)]
        assert row["tokens"] == 3 * single["tokens"] and row["steps"] == 3 * single["steps"]
        assert row["identical_to_baseline"] is True
        assert row.get("output_token_ids") == single.get("output_token_ids")  # one per turn
    assert recorded_from_results(thrice) == recorded_from_results(once)
    assert "every turn run 3 times per method" in render_report(thrice)
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(repeats=0)
