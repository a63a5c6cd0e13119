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
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from aded.budget import BudgetPolicy
from aded.decoding import fit_tree
from aded.drafters.base import Drafter, StepFeedback
from aded.tree import DraftTree

__all__ = ["Recorded", "ReplayStats", "replay", "replay_one"]


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
        tree = policy.choose(tree, max_leaves)
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
