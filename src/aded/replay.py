"""Replay recorded greedy outputs through a drafter, without running the model.

Greedy decoding is deterministic, so what a drafter would gain on a recorded (prompt, output) pair
can be measured offline: at each position the drafter proposes a tree for the committed context,
the accepted length is the longest tree path equal to the recorded continuation, and the position
advances by accepted + 1 (the bonus token). The drafter sees the same `begin / propose / observe /
end` calls as in a real run, with the model's top-1 token as the only model evidence (replay has no
logits beyond the recorded token). For a deterministic drafter whose `wants_topk` is 0, mean
accepted tokens equal those of a real greedy run exactly, provided the replay sees what the engine
did: pass the same `BudgetPolicy` kind (and cost curve) and each record's `max_new_tokens`.

With a budget, each step's verification cost t(k) is summed too, so a speedup over plain decoding
can be predicted from the measured cost curve without running the model.

`aded simulate` (`simulate_results`) replays a benchmark's recorded baseline outputs: the baseline's
rows of a results.json carry each turn's prompt and output token ids. Replaying them measures what a drafter would accept on exactly those outputs in seconds. With the
run's cost curve t(k) (stored in results.json), every replayed step goes through the same
cost-aware budget as the real run, and t(k) turns the steps into a predicted speedup over plain
decoding on that machine. Mean accepted tokens then agree closely with the run's; exactly (for
deterministic drafters) when the run used `--budget off`, since a real budget also corrects t(k)
by the step times it observes, which a replay cannot know.
Only the tokenizer is loaded, and only for drafters that need one (to find their datastore).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from aded.budget import BudgetPolicy
from aded.decoding import fit_tree
from aded.drafters.base import Drafter, StepFeedback
from aded.tree import DraftTree

__all__ = ["Recorded", "ReplayStats", "replay", "replay_one", "recorded_from_results", "simulate_results",
           "render_simulation"]


@dataclass(frozen=True)
class Recorded:
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    category: str = "all"
    id: str | int | None = None
    max_new_tokens: int | None = None  # the run's limit (None: the output's length), trims trees


@dataclass
class ReplayStats:
    steps: int = 0
    tokens: int = 0
    draft_nodes: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # wall time in propose + observe
    verify_cost_s: float = 0.0  # sum of t(k) over steps (only with a budget's cost model)

    @property
    def mean_accepted_tokens(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def nodes_per_step(self) -> float:
        return self.draft_nodes / self.steps if self.steps else 0.0

    @property
    def accepted_per_node(self) -> float:
        accepted = self.tokens - self.steps
        return accepted / self.draft_nodes if self.draft_nodes else 0.0

    def merge(self, other: "ReplayStats") -> None:
        self.steps += other.steps
        self.tokens += other.tokens
        self.draft_nodes += other.draft_nodes
        self.accepted_lengths.extend(other.accepted_lengths)
        self.draft_s += other.draft_s
        self.verify_cost_s += other.verify_cost_s

    def predicted_speedup(self, plain_step_s: float) -> float | None:
        """Tokens per second over plain decoding's (one token per `plain_step_s`), drafting included."""
        seconds = self.verify_cost_s + self.draft_s
        return self.tokens * plain_step_s / seconds if seconds > 0 and self.verify_cost_s > 0 else None


def replay_one(drafter: Drafter, record: Recorded, max_nodes: int,
               budget: BudgetPolicy | None = None, max_leaves: int | None = None) -> ReplayStats:
    """Replay one recorded output; the first output token comes from prefill, as in a real run.

    Each tree goes through what the engine does to it before verification: the budget sizes the
    request (and thins it while drafts do not pay), nodes deeper than the remaining token budget
    are dropped, then `budget` picks the subtree to verify, at most `max_leaves` paths wide (the
    runner's limit: 1 on llama.cpp).
    """
    stats = ReplayStats()
    policy = budget if budget is not None else BudgetPolicy(enabled=False)  # width limit only
    output = [int(t) for t in record.output_token_ids]
    if not output:
        return stats
    max_new = record.max_new_tokens or len(output)
    context = [int(t) for t in record.prompt_token_ids] + output[:1]
    start = time.perf_counter()
    drafter.begin(list(record.prompt_token_ids))
    stats.draft_s += time.perf_counter() - start
    pos = 1
    while pos < len(output):
        t0 = time.perf_counter()
        ask = policy.proposal_nodes(max_nodes)
        # the loop's trimming rule; a recorded run already fitted its context, so no room limit
        tree = fit_tree(drafter.propose(context, ask), max_new - pos, room=1 << 30)
        tree = policy.plan_step(tree, max_leaves)
        t1 = time.perf_counter()
        remaining = output[pos:]
        path = tree.longest_match(remaining[:-1] if len(remaining) > 1 else [])
        accepted = [int(tree.token_ids[i]) for i in path]
        bonus = remaining[len(accepted)]
        step_cost = budget.cost(len(tree)) if budget is not None else 0.0
        policy.observe(tree, tuple(path))
        policy.observe_cost(len(tree), step_cost)
        stats.verify_cost_s += step_cost
        t2 = time.perf_counter()
        topk = None
        if drafter.wants_topk:
            topk = _recorded_topk(tree, output, pos, drafter.wants_topk)
        drafter.observe(
            StepFeedback(
                context_ids=context,
                tree=tree,
                accepted_nodes=tuple(path),
                accepted_ids=tuple(accepted),
                bonus_id=bonus,
                model_topk=topk,
            )
        )
        drafting = (t1 - t0) + (time.perf_counter() - t2)
        stats.draft_s += drafting
        policy.observe_step(ask > 0, len(accepted) + 1, step_cost + drafting)
        context.extend(accepted)
        context.append(bonus)
        pos += len(accepted) + 1
        stats.steps += 1
        stats.tokens += len(accepted) + 1
        stats.draft_nodes += len(tree)
        stats.accepted_lengths.append(len(accepted) + 1)
    drafter.end()
    return stats



def _recorded_topk(tree, output: list[int], pos: int, k: int) -> np.ndarray:
    """Model evidence available offline: the recorded next token on the path that matches the
    recording; -1 (unknown) elsewhere."""
    topk = np.full((len(tree) + 1, k), -1, dtype=np.int64)
    topk[0, 0] = output[pos]
    depth_of = tree.depths
    for node in range(len(tree)):
        depth = int(depth_of[node])
        if pos + depth < len(output) and tree.path_tokens(node) == output[pos : pos + depth]:
            topk[node + 1, 0] = output[pos + depth]
    return topk


def replay(
    drafter: Drafter, records: Iterable[Recorded], max_nodes: int, budget: BudgetPolicy | None = None,
    max_leaves: int | None = None,
) -> dict[str, ReplayStats]:
    """Stats per category and for "all", replaying records in order (drafters and the budget's
    calibration learn across records, as in a real run)."""
    by_category: dict[str, ReplayStats] = defaultdict(ReplayStats)
    overall = ReplayStats()
    for record in records:
        one = replay_one(drafter, record, max_nodes, budget, max_leaves)
        if record.category != "all":
            by_category[record.category].merge(one)
        overall.merge(one)
    return {**by_category, "all": overall}


# ---------------------------------------------------------------------------- recorded benchmark runs
def recorded_from_results(results: dict[str, Any]) -> list[Recorded]:
    """Every recorded turn of the baseline, in run order."""
    from aded.bench.report import baseline_name

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
    from aded.drafters import DRAFTERS, drafter_class, make_drafter

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
        if drafter_class(name).needs_tokenizer and tokenizer is None and tokenizer_loader is not None:
            tokenizer = tokenizer_loader()
        drafter = make_drafter(name, tokenizer)
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
