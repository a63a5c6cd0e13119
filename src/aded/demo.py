"""`aded demo`: one command that shows what aded does on this machine.

Runs transformers' own greedy `generate`, then aded with the chosen drafter, on the same prompt ids
in the same process, and prints their speeds side by side and whether the tokens are identical.
"""

from __future__ import annotations

import time

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


def run_demo(model: str, drafter: str, max_new_tokens: int, dtype: str) -> list[dict]:
    import torch

    from aded.api import load
    from aded.progress import console

    lm = load(model, drafter=drafter, dtype=dtype)
    rows = []
    for task, prompt in DEMO_PROMPTS.items():
        ids = lm.prompt_ids(prompt)
        console.print(f"[bold]{task}[/bold]: {len(ids)} prompt tokens, up to {max_new_tokens} new")
        start = time.perf_counter()
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=lm.runner.device)
            out = lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False)
        hf_s = time.perf_counter() - start
        reference = out[0, len(ids):].tolist()
        completion = lm.generate(ids, max_new_tokens=max_new_tokens)
        total_s = completion.stats.prefill_s + completion.stats.decode_s
        rows.append({
            "task": task,
            "tokens": len(completion.token_ids),
            "hf_tokens_per_s": len(reference) / hf_s,
            "aded_tokens_per_s": len(completion.token_ids) / total_s,
            "mean_accepted_tokens": completion.stats.mean_accepted_tokens,
            "identical": completion.token_ids == reference,
            "text": completion.text,
        })
    return rows


def print_demo(rows: list[dict], drafter: str) -> None:
    from rich.table import Table

    from aded.progress import console

    for row in rows:
        console.rule(row["task"])
        console.print(row["text"], markup=False, highlight=False)
    table = Table(title=f"aded ({drafter}) against transformers generate, greedy, same prompt ids")
    for column in ("task", "tokens", "generate tok/s", "aded tok/s", "speedup", "tokens/step",
                   "identical"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["task"], str(row["tokens"]), f"{row['hf_tokens_per_s']:.1f}",
                      f"{row['aded_tokens_per_s']:.1f}",
                      f"{row['aded_tokens_per_s'] / row['hf_tokens_per_s']:.2f}x",
                      f"{row['mean_accepted_tokens']:.2f}", "yes" if row["identical"] else "NO")
    console.print(table)
    console.print("[dim]Times include prefill for both. Same output, token for token, is the "
                  "point: `identical` must say yes.[/dim]")
