"""`aded demo`: one command that shows what aded does on this machine.

Runs a short session (three turns of an edit loop: each turn's prompt holds the conversation so
far, and the model answers with the whole file again) and one free-writing prompt, through the
backend's own plain greedy decoding (transformers' `generate`, or llama.cpp's for a GGUF file) and
through aded with the chosen drafter, on the same prompt ids in the same process. Both keep the
prompt cache a conversation's turns share, as their front ends do. It prints each turn's wall time
(prefill included) side by side, whether the tokens are identical, and, where aded is not faster,
why. The baseline is the benchmark's baseline method with the benchmark's settings
(`DecodeSettings.for_model`), so the two agree.
"""

from __future__ import annotations

import typer

from aded.cli.common import BackendOpt, DrafterOpt, DtypeOpt, ModelOpt, friendly

__all__ = ["demo", "run_demo", "print_demo", "DEMO_SESSION", "DEMO_PROMPTS"]

#: the session: the first edit loop of the shipped sessions (`aded bench -q sessions`)
DEMO_SESSION = "edit-inventory"
DEMO_PROMPTS = {
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


@friendly
def demo(
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1),
    dtype: str = DtypeOpt,
    backend: str = BackendOpt,
) -> None:
    """Plain decoding against aded on a short coding session and a free-writing prompt: wall time
    side by side, identical tokens."""
    from aded.api import load
    from aded.progress import console

    lm = load(model, drafter=drafter, dtype=dtype, backend=backend)
    rows, baseline = run_demo(lm, max_new_tokens)
    print_demo(rows, lm.drafter.name, baseline, step_cost(lm))
    if model == "smollm2-135m-instruct":
        console.print("[dim]A model that writes real code: `aded models install qwen2.5-coder-1.5b-instruct` "
                      "(1.1 GB, once), then `aded demo -m qwen2.5-coder-1.5b-instruct`.[/dim]")


def _conversations() -> list[tuple[str, list[list[dict]]]]:
    """(task, the messages that open each turn) for the session, then each single prompt."""
    from aded.bench.questions import load_questions

    (session,) = [q for q in load_questions(["sessions"]) if q.id == DEMO_SESSION]
    turns = [session.messages(i) for i in range(len(session.turns))]
    singles = [(task, [[{"role": "user", "content": prompt}]]) for task, prompt in DEMO_PROMPTS.items()]
    return [(session.category.replace("-", " "), turns), *singles]


def run_demo(lm, max_new_tokens: int, conversations=None) -> tuple[list[dict], str]:
    """(rows, baseline name): per turn, the backend's own plain greedy decoding (the benchmark's
    baseline method) against the loaded `Aded`, same prompt ids, each keeping the prompt cache the
    conversation's turns share. A turn's answer fed back is the baseline's, as in the benchmark.
    `conversations`: (task, the messages opening each turn) pairs; default the demo's own."""
    from aded.bench.catalog import build_methods
    from aded.bench.methods import DecodeSettings
    from aded.bench.runner import PromptBuilder
    from aded.progress import console

    prompts = PromptBuilder(lm.tokenizer)  # the benchmark's ids: the chat template, or turns joined
    settings = DecodeSettings.for_model(lm.runner, lm.tokenizer, max_new_tokens)
    baseline = build_methods([], lm.tokenizer, lm.runner, settings, make_budget=None).methods[0]
    rows = []
    for task, turns in conversations or _conversations():
        messages: list[dict] = []
        held: list[int] = []  # what plain decoding holds cached when the turn starts
        for number, opening in enumerate(turns, start=1):
            messages += opening
            ids = prompts.ids(messages)
            label = f"{task} {number}" if len(turns) > 1 else task
            console.print(f"[bold]{label}[/bold]: {len(ids)} prompt tokens, up to {max_new_tokens} new")
            baseline.resume(held)
            reference = baseline.run(ids, None)
            lm.runner.forget(held)
            completion = lm.generate(ids, max_new_tokens=max_new_tokens)
            rows.append({
                "task": label,
                "tokens": len(completion.token_ids),
                "baseline_s": reference.prefill_s + reference.decode_s,
                "aded_s": completion.stats.prefill_s + completion.stats.decode_s,
                "kept_tokens": completion.stats.cached_prompt_tokens,
                "mean_accepted_tokens": completion.stats.mean_accepted_tokens,
                "identical": completion.token_ids == reference.output_ids,
                "text": completion.text,
            })
            messages.append({"role": "assistant", "content": prompts.answer(reference.output_ids)})
            held = ids + reference.output_ids[:-1]
    return rows, baseline.name


def step_cost(lm) -> float | None:
    """What one verified draft token costs, in plain decoding steps, by the loaded budget's t(k)."""
    costs = lm.costs
    try:
        return costs(1) / costs(0) - 1.0 if costs is not None else None
    except (TypeError, ZeroDivisionError):
        return None


def print_demo(rows: list[dict], drafter: str, baseline: str = "hf", extra_cost: float | None = None) -> None:
    from rich.table import Table

    from aded.progress import console

    engine = {"hf": "transformers generate", "llama.cpp": "llama.cpp"}.get(baseline, baseline)
    for row in rows:
        console.rule(row["task"])
        console.print(row["text"], markup=False, highlight=False)
    table = Table(title=f"aded ({drafter}) against {engine}, greedy, same prompt ids, prompt cache kept")
    for column in ("turn", "tokens", f"{baseline} s", "aded s", "speedup", "tok/step", "identical"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["task"], str(row["tokens"]), f"{row['baseline_s']:.2f}", f"{row['aded_s']:.2f}",
                      f"{row['baseline_s'] / row['aded_s']:.2f}x", f"{row['mean_accepted_tokens']:.2f}",
                      "yes" if row["identical"] else "NO")
    base = sum(r["baseline_s"] for r in rows)
    mine = sum(r["aded_s"] for r in rows)
    table.add_row("all", str(sum(r["tokens"] for r in rows)), f"{base:.2f}", f"{mine:.2f}",
                  f"{base / mine:.2f}x", "", "yes" if all(r["identical"] for r in rows) else "NO")
    console.print(table)
    console.print("[dim]Wall time of each turn, prefill included, for both. Same output, token for "
                  "token, is the point: `identical` must say yes.[/dim]")
    slower = [r["task"] for r in rows if r["aded_s"] > r["baseline_s"]]
    if slower:
        cost = f" each verified draft token costs {extra_cost:.0%} of a step on this machine, and" \
            if extra_cost is not None else ""
        console.print(f"[dim]Not faster on {', '.join(slower)}:{cost} drafts pay only where the answer "
                      "repeats text it has seen (the file being edited, an earlier answer, the prompt); "
                      "where little repeats, aded drafts little and runs close to plain decoding.[/dim]")
