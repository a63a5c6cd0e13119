"""`aded simulate`: replay a benchmark's recorded baseline outputs through drafters, without the model.

The `hf` rows of a results.json carry each turn's prompt and output token ids. Replaying them
(aded.simulate) measures what a drafter would accept on exactly those outputs in seconds. With the
run's cost curve t(k) (stored in results.json), every replayed step goes through the same
cost-aware budget as the real run, and t(k) turns the steps into a predicted speedup over plain
decoding on that machine. Mean accepted tokens then agree closely with the run's; exactly (for
deterministic drafters) when the run used `--budget off`, since a real budget also corrects t(k)
by the step times it observes, which a replay cannot know.
Only the tokenizer is loaded, and only for drafters that need one (to find their datastore).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from aded.bench.report import baseline_name
from aded.simulate import Recorded, ReplayStats, replay

__all__ = ["recorded_from_results", "simulate_results", "render_simulation"]


def recorded_from_results(results: dict[str, Any]) -> list[Recorded]:
    """Every recorded turn of the baseline, in run order."""
    max_new = results.get("config", {}).get("max_new_tokens")
    base = baseline_name(results)
    records = []
    for row in results.get("questions", []):
        if row.get("method") != base:
            continue
        prompts, outputs = row.get("prompt_token_ids"), row.get("output_token_ids")
        if not isinstance(prompts, list) or not isinstance(outputs, list) or len(prompts) != len(outputs):
            raise ValueError(f"the {base} row of question {row.get('id')!r} has no recorded token ids")
        for turn, (prompt, output) in enumerate(zip(prompts, outputs)):
            records.append(Recorded(prompt, output, row["category"], f"{row['id']}#{turn}", max_new))
    if not records:
        raise ValueError(f"the results hold no {base} rows with recorded token ids to replay")
    return records


def _cost_model(results: dict[str, Any], budget: str):
    from aded.budget import CostModel

    if budget == "off":
        return None
    if budget == "typical":
        return CostModel.typical_cpu()
    if budget != "recorded":
        raise ValueError(f"budget must be recorded, typical or off, got {budget!r}")
    config = results.get("config", {})
    if config.get("budget") == "off":
        return None  # the run verified every proposed node: replay it the same way
    recorded = config.get("cost_model")
    if not recorded:
        return CostModel.typical_cpu()
    return CostModel(tuple(recorded["sizes"]), tuple(recorded["seconds"]))


def simulate_results(results: dict[str, Any], drafters: Sequence[str],
                     tokenizer_loader: Callable[[], Any] | None = None, budget: str = "recorded",
                     max_nodes: int | None = None) -> list[dict[str, Any]]:
    """Summary rows per drafter and category ("all" first), replaying with a fresh drafter each.

    `budget`: "recorded" (the run's cost curve, or a typical CPU one if it has none), "typical",
    or "off" (every proposed node counts; no speedup prediction).
    """
    from aded.budget import BudgetPolicy
    from aded.drafters import DRAFTERS, drafter_class

    unknown = [d for d in drafters if d not in DRAFTERS]
    if unknown:
        raise ValueError(f"unknown drafter(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(DRAFTERS)}")
    records = recorded_from_results(results)
    costs = _cost_model(results, budget)
    nodes = max_nodes if max_nodes is not None else results.get("config", {}).get("max_draft_nodes", 24)
    max_leaves = results.get("machine", {}).get("max_tree_leaves")  # the recorded runner's width
    runner_nodes = results.get("machine", {}).get("max_tree_nodes")  # and its exact chain length
    if runner_nodes is not None:
        nodes = min(nodes, runner_nodes)
    tokenizer = None
    summary: list[dict[str, Any]] = []
    for name in drafters:
        cls = drafter_class(name)
        options: dict[str, Any] = {}
        if getattr(cls, "needs_tokenizer", False) and tokenizer_loader is not None:
            tokenizer = tokenizer if tokenizer is not None else tokenizer_loader()
            options["tokenizer"] = tokenizer
        drafter = cls(**options)
        policy = BudgetPolicy(costs) if costs is not None else None
        start = time.perf_counter()
        stats = replay(drafter, records, nodes, policy, max_leaves)
        elapsed = time.perf_counter() - start
        plain = costs(0) if costs is not None else None
        for category in ["all", *[c for c in stats if c != "all"]]:
            summary.append(_row(name, category, stats[category], plain, elapsed if category == "all" else None))
    return summary


def _row(drafter: str, category: str, stats: ReplayStats, plain_step_s: float | None,
         elapsed: float | None) -> dict[str, Any]:
    speedup = stats.predicted_speedup(plain_step_s) if plain_step_s else None
    row = {
        "drafter": drafter,
        "category": category,
        "mean_accepted_tokens": round(stats.mean_accepted_tokens, 4),
        "nodes_per_step": round(stats.nodes_per_step, 3),
        "accepted_per_node": round(stats.accepted_per_node, 4),
        "steps": stats.steps,
        "tokens": stats.tokens,
        "draft_ms_per_step": round(1000 * stats.draft_s / stats.steps, 3) if stats.steps else None,
        "predicted_speedup": round(speedup, 4) if speedup is not None else None,
    }
    if elapsed is not None:
        row["replay_s"] = round(elapsed, 3)
    return row


def render_simulation(summary: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `simulate_results` rows."""
    lines = ["| Drafter | Category | MAT | nodes/step | accepted/node | draft ms/step | predicted speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        speedup = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x"
        draft = "-" if r["draft_ms_per_step"] is None else f"{r['draft_ms_per_step']:.2f}"
        lines.append(f"| {r['drafter']} | {r['category']} | {r['mean_accepted_tokens']:.2f} | "
                     f"{r['nodes_per_step']:.1f} | {r['accepted_per_node']:.3f} | {draft} | {speedup} |")
    return "\n".join(lines) + "\n"
