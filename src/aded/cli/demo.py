"""`aded demo`: one command that shows what aded does on this machine.

Runs the backend's own plain greedy decoding (transformers' `generate`, or llama.cpp's for a GGUF
file), then aded with the chosen drafter, on the same prompt ids in the same process, and prints
their speeds side by side and whether the tokens are identical. The baseline is the benchmark's
baseline method with the benchmark's settings (`DecodeSettings.for_model`), so the two agree.
"""

from __future__ import annotations

import typer

from aded.cli.common import BackendOpt, DrafterOpt, DtypeOpt, ModelOpt, friendly

__all__ = ["demo", "run_demo", "print_demo", "DEMO_PROMPTS"]


DEMO_PROMPTS = {
    "code edit": (
        "Add a docstring to each function and keep everything else exactly as it is.\n\n"
        "```python\n"
        "def mean(values):\n"
        "    total = 0\n"
        "    for value in values:\n"
        "        total += value\n"
        "    return total / len(values)\n\n\n"
        "def variance(values):\n"
        "    m = mean(values)\n"
        "    total = 0\n"
        "    for value in values:\n"
        "        total += (value - m) ** 2\n"
        "    return total / len(values)\n"
        "```"
    ),
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


@friendly
def demo(
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = typer.Option(160, "--max-new-tokens", "-n", min=1),
    dtype: str = DtypeOpt,
    backend: str = BackendOpt,
) -> None:
    """Plain decoding against aded on two prompts: speed side by side, identical tokens."""
    from aded.api import load

    lm = load(model, drafter=drafter, dtype=dtype, backend=backend)
    rows, baseline = run_demo(lm, max_new_tokens)
    print_demo(rows, lm.drafter.name, baseline)


def run_demo(lm, max_new_tokens: int) -> tuple[list[dict], str]:
    """(rows, baseline name): the backend's own plain greedy decoding (the benchmark's baseline
    method: transformers' `generate` or llama.cpp's) against the loaded `Aded`, same prompt ids."""
    from aded.bench.methods import DecodeSettings, build_methods
    from aded.progress import console

    settings = DecodeSettings.for_model(lm.runner, lm.tokenizer, max_new_tokens)
    baseline = build_methods([], lm.tokenizer, lm.runner, settings, make_budget=None).methods[0]
    rows = []
    for task, prompt in DEMO_PROMPTS.items():
        ids = lm.prompt_ids(prompt)
        console.print(f"[bold]{task}[/bold]: {len(ids)} prompt tokens, up to {max_new_tokens} new")
        reference = baseline.run(ids, None)
        lm.runner.forget()  # prefill from an empty cache, as the baseline's (timed here) does
        completion = lm.generate(ids, max_new_tokens=max_new_tokens)
        total_s = completion.stats.prefill_s + completion.stats.decode_s
        rows.append({
            "task": task,
            "tokens": len(completion.token_ids),
            "baseline_tokens_per_s": reference.tokens / (reference.prefill_s + reference.decode_s),
            "aded_tokens_per_s": len(completion.token_ids) / total_s,
            "mean_accepted_tokens": completion.stats.mean_accepted_tokens,
            "identical": completion.token_ids == reference.output_ids,
            "text": completion.text,
        })
    return rows, baseline.name


def print_demo(rows: list[dict], drafter: str, baseline: str = "hf") -> None:
    from rich.table import Table

    from aded.progress import console

    engine = {"hf": "transformers generate", "llama.cpp": "llama.cpp"}.get(baseline, baseline)
    for row in rows:
        console.rule(row["task"])
        console.print(row["text"], markup=False, highlight=False)
    table = Table(title=f"aded ({drafter}) against {engine}, greedy, same prompt ids")
    for column in ("task", "tokens", f"{baseline} tok/s", "aded tok/s", "speedup", "tokens/step",
                   "identical"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["task"], str(row["tokens"]), f"{row['baseline_tokens_per_s']:.1f}",
                      f"{row['aded_tokens_per_s']:.1f}",
                      f"{row['aded_tokens_per_s'] / row['baseline_tokens_per_s']:.2f}x",
                      f"{row['mean_accepted_tokens']:.2f}", "yes" if row["identical"] else "NO")
    console.print(table)
    console.print("[dim]Times include prefill for both. Same output, token for token, is the "
                  "point: `identical` must say yes.[/dim]")
