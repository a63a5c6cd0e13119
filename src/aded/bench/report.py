"""What a benchmark run leaves behind, and how two runs compare.

`results.json`:

    {"model", "machine": {cpu, cores, threads, torch, dtype, ...}, "config": {...},
     "skipped": [{"method", "reason"}],
     "questions": [{"id", "source", "category", "method", "tokens", "steps",
                    "mean_accepted_tokens", "decode_s", "prefill_s", "identical_to_baseline", ...,
                    "turns": [...], ("prompt_token_ids", "output_token_ids": one list per turn, hf only)}],
     "summary": [{"method", "category", "questions", "mean_accepted_tokens", "tokens_per_s",
                  "speedup", "identical", ...}]}

Summary arithmetic: rates are ratios of totals (all decoded tokens over all decode seconds of the
rows in a cell), not means of per-question rates, so long answers weigh as much as they cost.
`speedup` divides by the baseline's rate over the *same* questions; `identical` is the fraction of
questions whose every turn equals the baseline token for token (None when sampling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "write_outputs", "render_report", "plot", "load_results", "compare",
           "render_compare", "baseline_name"]



def _key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("source", "")), str(row["id"])


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cell(rows: Sequence[dict[str, Any]], baseline: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    decoded = sum(r["decode_tokens"] for r in rows)
    seconds = sum(r["decode_s"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    rate = _ratio(decoded, seconds)
    matched = [baseline[_key(r)] for r in rows if _key(r) in baseline]
    base_rate = _ratio(sum(r["decode_tokens"] for r in matched), sum(r["decode_s"] for r in matched))
    judged = [r["identical_to_baseline"] for r in rows if r.get("identical_to_baseline") is not None]
    wall = _wall(rows)
    base_wall = _wall(matched)
    return {
        "questions": len(rows),
        "mean_accepted_tokens": _round(_ratio(decoded, steps), 4),
        "tokens_per_s": _round(rate, 3),
        "speedup": _round(rate / base_rate, 4) if rate is not None and base_rate else None,
        "identical": _round(sum(judged) / len(judged), 4) if judged else None,
        "decode_tokens": decoded,
        "steps": steps,
        "decode_s": _round(seconds, 4),
        "prefill_s": _round(sum(r["prefill_s"] for r in rows), 4),
        # a session's user waits for the prompt too: tokens over prefill + decode seconds
        "wall_tokens_per_s": _round(wall, 3),
        "wall_speedup": _round(wall / base_wall, 4) if wall is not None and base_wall else None,
    }


def _wall(rows: Sequence[dict[str, Any]], turn: int | None = None) -> float | None:
    """Tokens a second over whole turns (prefill included), of turn `turn` only when given."""
    turns = [t for r in rows for t in r.get("turns", ()) if turn is None or t.get("turn", 0) == turn]
    return _ratio(sum(t["tokens"] for t in turns), sum(t["prefill_s"] + t["decode_s"] for t in turns))


def turn_speedups(rows: Sequence[dict[str, Any]], method: str, baseline_method: str) -> list[float | None]:
    """Per turn index of the sessions, the method's whole-turn rate over the baseline's."""
    base = [r for r in rows if r["method"] == baseline_method]
    mine = [r for r in rows if r["method"] == method]
    count = max((t.get("turn", 0) + 1 for r in base for t in r.get("turns", ())), default=0)
    out = []
    for turn in range(count):
        rate, base_rate = _wall(mine, turn), _wall(base, turn)
        out.append(_round(rate / base_rate, 4) if rate is not None and base_rate else None)
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def baseline_name(results: dict[str, Any]) -> str:
    """The method every other is compared with: the backend's plain decoding (runs recorded before
    there were backends used transformers)."""
    return str(results.get("config", {}).get("baseline") or "hf")


def summarize(rows: Sequence[dict[str, Any]], baseline_method: str = "hf") -> list[dict[str, Any]]:
    """One entry per method and category ("all" first, then categories in order of appearance)."""
    baseline = {_key(r): r for r in rows if r["method"] == baseline_method}
    categories = _ordered(r["category"] for r in rows)
    summary = []
    for method in _ordered(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for category in ["all", *categories]:
            cell = mine if category == "all" else [r for r in mine if r["category"] == category]
            if cell:
                summary.append({"method": method, "category": category, **_cell(cell, baseline)})
    return summary


# ---------------------------------------------------------------------------- files
def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """results.json, report.md and the plots (when matplotlib is installed); returns the paths."""
    from aded.fileio import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "report.md"]
    write_atomic(written[0], json.dumps(results, indent=1))
    plots = plot(results, out)
    write_atomic(written[1], render_report(results, [p.name for p in plots]))
    return written + plots


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def render_report(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    summary = results["summary"]
    machine, config = results["machine"], results["config"]
    categories = _ordered(s["category"] for s in summary if s["category"] != "all")
    cells = {(s["method"], s["category"]): s for s in summary}
    methods = _ordered(s["method"] for s in summary)
    base = baseline_name(results)
    if machine.get("backend") == "llama.cpp":
        build = f", {machine['cpu_features']} kernels" if machine.get("cpu_features") else ""
        engine = (f"llama.cpp (llama-cpp-python {machine.get('llama_cpp_python')}{build}), "
                  f"{machine.get('file_type')}, n_ctx {machine.get('n_ctx')}")
    else:
        engine = f"transformers, torch {machine.get('torch')}, {machine.get('dtype')} on {machine.get('device')}"
    lines = [
        f"# aded bench: {results['model']}",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('threads')} threads; {engine}.",
        f"Run: {config.get('questions')} questions{_skipped_note(results)}, max_new_tokens {config.get('max_new_tokens')}, "
        f"temperature {config.get('temperature')}, max_draft_nodes {config.get('max_draft_nodes')}, "
        f"budget {config.get('budget')}"
        + (f", every turn run {config['repeats']} times per method." if config.get("repeats", 1) > 1 else "."),
        "",
        f"## Speedup over {base} (decode tokens/s after prefill)",
        "",
        "| Method | " + " | ".join(categories) + " | MAT | tokens/s | Overall | Identical |",
        "|---|" + "---:|" * (len(categories) + 4),
    ]
    for method in methods:
        overall = cells.get((method, "all"), {})
        per_cat = [_fmt(cells.get((method, c), {}).get("speedup"), "{:.2f}x") for c in categories]
        identical = overall.get("identical")
        lines.append(
            f"| {method} | " + " | ".join(per_cat)
            + f" | {_fmt(overall.get('mean_accepted_tokens'))} | {_fmt(overall.get('tokens_per_s'), '{:.1f}')}"
            + f" | {_fmt(overall.get('speedup'), '{:.2f}x')} | {_fmt(identical, '{:.0%}')} |"
        )
    lines += ["", "## Mean accepted tokens per step", "",
              "| Method | " + " | ".join(categories) + " | all |", "|---|" + "---:|" * (len(categories) + 1)]
    for method in methods:
        values = [_fmt(cells.get((method, c), {}).get("mean_accepted_tokens")) for c in [*categories, "all"]]
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    rows = results["questions"]
    turns = max((t.get("turn", 0) + 1 for r in rows for t in r.get("turns", ())), default=1)
    lines += ["", "## Whole turns, prefill included (what a user waits for)", "",
              "| Method | tokens/s | Overall | " + " | ".join(f"turn {i + 1}" for i in range(turns))
              + " | time to first token s | prompt kept | token match |",
              "|---|" + "---:|" * (turns + 5)]
    for method in methods:
        overall = cells.get((method, "all"), {})
        mine = [r for r in rows if r["method"] == method]
        done = [t for r in mine for t in r.get("turns", ())]
        ttft = sum(t["prefill_s"] for t in done) / len(done) if done else None
        prompt = sum(t.get("prompt_tokens", 0) for t in done)
        kept = _ratio(sum(t.get("cached_tokens", 0) for t in done), prompt)
        rates = [r["token_match_rate"] for r in mine if r.get("token_match_rate") is not None]
        per_turn = [_fmt(v, "{:.2f}x") for v in turn_speedups(rows, method, base)] or ["-"] * turns
        lines.append(f"| {method} | {_fmt(overall.get('wall_tokens_per_s'), '{:.1f}')} | "
                     f"{_fmt(overall.get('wall_speedup'), '{:.2f}x')} | " + " | ".join(per_turn)
                     + f" | {_fmt(ttft, '{:.3f}')} | {_fmt(kept, '{:.0%}')} | "
                     f"{_fmt(sum(rates) / len(rates) if rates else None, '{:.1%}')} |")
    if results.get("skipped"):
        lines += ["", "## Skipped methods", ""]
        lines += [f"- `{s['method']}`: {s['reason']}" for s in results["skipped"]]
    if results.get("skipped_questions"):
        lines += ["", "## Skipped questions", ""]
        lines += [f"- `{s['source']}:{s['id']}`: {s['reason']}" for s in results["skipped_questions"]]
    lines += [
        "", "## How this was measured", "",
        "One process and one loaded model for all methods; the same prompt token ids, threads and dtype; "
        "a warm-up first; methods interleaved per turn (the baseline first, the others rotated per question); "
        "multi-turn questions are sessions: the baseline's answer is fed back through the chat template, and "
        "every method's turn starts from the prompt cache plain decoding left after the previous turn "
        "(each question from an empty one). "
        + str(config.get("timing", "")),
        "MAT = tokens emitted per decoding step, bonus included (1.00 = plain decoding); Overall = "
        f"tokens/s over {base}'s on the same questions; Identical = share of questions whose output equals "
        f"{base}'s token for token; token match = common prefix over the longer output.",
    ]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _skipped_note(results: dict[str, Any]) -> str:
    skipped = len(results.get("skipped_questions") or [])
    interrupted = " (interrupted)" if results["config"].get("interrupted") else ""
    return (f" ({skipped} skipped: too long for the model)" if skipped else "") + interrupted


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """speedup.png (per category per method) and accepted_lengths.png; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary = results["summary"]
    base = baseline_name(results)
    categories = ["all", *_ordered(s["category"] for s in summary if s["category"] != "all")]
    methods = [m for m in _ordered(s["method"] for s in summary) if m != base]
    cells = {(s["method"], s["category"]): s for s in summary}
    paths = [out_dir / "speedup.png", out_dir / "accepted_lengths.png"]

    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(categories) + 3.5), 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [cells.get((method, c), {}).get("speedup") or 0.0 for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))], categories,
                  rotation=20)
    ax.set_ylabel(f"speedup over {base}")
    ax.set_title(f"{results['model']}: decode speedup per category")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for method in methods:
        counts: dict[int, int] = {}
        for row in results["questions"]:
            if row["method"] == method:
                for length, n in row.get("accepted_lengths", {}).items():
                    counts[int(length)] = counts.get(int(length), 0) + n
        total = sum(counts.values())
        if total:  # share of steps emitting at least n tokens: readable even for sparse lengths
            xs = list(range(1, max(counts) + 1))
            shares = [sum(v for k, v in counts.items() if k >= x) / total for x in xs]
            ax.step(xs, shares, where="post", marker=".", label=method)
    ax.set_xlabel("n: tokens emitted per step (accepted + bonus)")
    ax.set_ylabel("share of steps emitting at least n")
    ax.set_yscale("log")
    ax.set_title("Accepted length distribution")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- comparing runs
def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json, given as the file or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read benchmark results {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("summary"), list):
        raise ValueError(f"{path} is not an `aded bench` results file (no summary list)")
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (method, category) in both runs: the metrics of A and B and B's tokens/s over A's."""
    cells_a = {(s["method"], s["category"]): s for s in a["summary"]}
    cells_b = {(s["method"], s["category"]): s for s in b["summary"]}
    rows = []
    for key in _ordered([*cells_a, *cells_b]):
        sa, sb = cells_a.get(key), cells_b.get(key)
        row: dict[str, Any] = {"method": key[0], "category": key[1]}
        for name in ("tokens_per_s", "speedup", "mean_accepted_tokens", "identical"):
            row[f"{name}_a"] = sa.get(name) if sa else None
            row[f"{name}_b"] = sb.get(name) if sb else None
        ta, tb = row["tokens_per_s_a"], row["tokens_per_s_b"]
        row["tokens_per_s_change"] = _round(tb / ta - 1.0, 4) if ta and tb is not None else None
        rows.append(row)
    return rows


def render_compare(rows: Sequence[dict[str, Any]], name_a: str, name_b: str,
                   category: str | None = "all") -> str:
    """A markdown table of `compare` rows (only `category` unless it is None)."""
    lines = [f"A = {name_a}", f"B = {name_b}", "",
             "| Method | Category | tok/s A | tok/s B | change | speedup A | speedup B | MAT A | MAT B |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if category is not None and r["category"] != category:
            continue
        lines.append(
            f"| {r['method']} | {r['category']} | {_fmt(r['tokens_per_s_a'], '{:.1f}')} | "
            f"{_fmt(r['tokens_per_s_b'], '{:.1f}')} | {_fmt(r['tokens_per_s_change'], '{:+.1%}')} | "
            f"{_fmt(r['speedup_a'], '{:.2f}x')} | {_fmt(r['speedup_b'], '{:.2f}x')} | "
            f"{_fmt(r['mean_accepted_tokens_a'])} | {_fmt(r['mean_accepted_tokens_b'])} |"
        )
    return "\n".join(lines) + "\n"
