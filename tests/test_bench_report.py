"""Summary arithmetic, the report, the plots and the comparison, on synthetic rows."""

from __future__ import annotations

import json

import pytest

from aded.bench.report import compare, load_results, render_compare, render_report, summarize, write_outputs


def row(qid, category, method, decode_tokens, decode_s, steps, identical=True, prefill_s=0.1):
    return {"id": qid, "source": "s", "category": category, "method": method,
            "tokens": decode_tokens + 1, "decode_tokens": decode_tokens, "steps": steps,
            "mean_accepted_tokens": decode_tokens / steps, "decode_s": decode_s, "prefill_s": prefill_s,
            "identical_to_baseline": identical, "token_match_rate": 1.0 if identical else 0.5,
            "accepted_lengths": {"1": steps} if decode_tokens == steps else {"2": steps}, "turns": []}


ROWS = [
    row("1", "math", "hf", 100, 10.0, 100),
    row("2", "math", "hf", 50, 10.0, 50),
    row("3", "qa", "hf", 40, 4.0, 40),
    row("1", "math", "pld", 100, 5.0, 50),
    row("2", "math", "pld", 50, 5.0, 25, identical=False),
    row("3", "qa", "pld", 40, 2.0, 20),
]


def cell(summary, method, category):
    return next(s for s in summary if s["method"] == method and s["category"] == category)


def test_rates_are_ratios_of_totals_and_speedups_share_questions():
    summary = summarize(ROWS)
    assert [(s["method"], s["category"]) for s in summary] == [
        ("hf", "all"), ("hf", "math"), ("hf", "qa"), ("pld", "all"), ("pld", "math"), ("pld", "qa")]
    hf_math = cell(summary, "hf", "math")
    assert hf_math["tokens_per_s"] == 7.5 and hf_math["mean_accepted_tokens"] == 1.0
    assert hf_math["speedup"] == 1.0 and hf_math["questions"] == 2
    pld_math = cell(summary, "pld", "math")
    assert pld_math["tokens_per_s"] == 15.0 and pld_math["mean_accepted_tokens"] == 2.0
    assert pld_math["speedup"] == 2.0 and pld_math["identical"] == 0.5
    pld_all = cell(summary, "pld", "all")
    assert pld_all["tokens_per_s"] == pytest.approx(190 / 12, abs=1e-3)
    assert pld_all["speedup"] == pytest.approx((190 / 12) / (190 / 24), abs=1e-4)
    assert pld_all["identical"] == pytest.approx(2 / 3, abs=1e-4)
    # a method that ran fewer questions is compared with the baseline on those questions only
    partial = summarize(ROWS[:3] + [row("3", "qa", "suffix", 40, 1.0, 10)])
    assert cell(partial, "suffix", "all")["speedup"] == 4.0


def test_sampling_has_no_identity_and_missing_baseline_no_speedup():
    summary = summarize([row("1", "chat", "pld", 10, 1.0, 5, identical=None)])
    only = cell(summary, "pld", "all")
    assert only["identical"] is None and only["speedup"] is None and only["tokens_per_s"] == 10.0


def results_for(rows, model="m"):
    return {"model": model, "machine": {"cpu": "cpu", "cores": 2, "threads": 2, "torch": "t",
                                        "dtype": "float32", "device": "cpu"},
            "config": {"questions": 3, "max_new_tokens": 8, "temperature": 0.0, "max_draft_nodes": 24,
                       "budget": "typical", "timing": "timed after prefill"},
            "skipped": [{"method": "aded-reference", "reason": "draftretriever is not installed"}],
            "questions": rows, "summary": summarize(rows)}


def test_report_table_plots_and_files(tmp_path):
    paths = write_outputs(results_for(ROWS), tmp_path)
    names = {p.name for p in paths}
    assert {"results.json", "report.md", "speedup.png", "accepted_lengths.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| Method | math | qa | MAT | tokens/s | Overall | Identical |" in report
    assert "| pld | 2.00x | 2.00x | 2.00 | 15.8 | 2.00x | 67% |" in report
    assert "aded-reference`: draftretriever is not installed" in report
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summarize(ROWS)
    assert "![speedup](speedup.png)" in render_report(results_for(ROWS), ["speedup.png"])


def test_compare_two_runs(tmp_path):
    faster = [dict(r, decode_s=r["decode_s"] / 2) if r["method"] == "pld" else r for r in ROWS]
    write_outputs(results_for(ROWS), tmp_path / "a")
    write_outputs(results_for(faster), tmp_path / "b")
    rows = compare(load_results(tmp_path / "a"), load_results(tmp_path / "b" / "results.json"))
    pld = next(r for r in rows if r["method"] == "pld" and r["category"] == "all")
    assert pld["tokens_per_s_change"] == pytest.approx(1.0, abs=1e-3)
    assert pld["speedup_a"] == pytest.approx(2.0) and pld["speedup_b"] == pytest.approx(4.0)
    text = render_compare(rows, "a", "b")
    assert "| pld | all | 15.8 | 31.7 | +100.0% | 2.00x | 4.00x |" in text
    assert "| pld | math |" not in text and "| pld | math |" in render_compare(rows, "a", "b", None)


def test_load_results_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read benchmark results"):
        load_results(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not an `aded bench` results file"):
        load_results(tmp_path / "other.json")
