"""Replay recorded greedy outputs through a drafter, without running the model.

Greedy decoding is deterministic, so what a drafter would gain on a recorded (prompt, output) pair
can be measured offline: at each position the drafter proposes a tree for the committed context,
the accepted length is the longest tree path equal to the recorded continuation, and the position
advances by accepted + 1 (the bonus token). The drafter sees the same `begin / propose / observe /
end` calls as in a real run, with the model's top-1 token as the only model evidence (replay has no
logits beyond the recorded token). For a deterministic drafter whose `wants_topk` is 0, mean
accepted tokens equal those of a real greedy run exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from aded.drafters.base import Drafter, StepFeedback

__all__ = ["Recorded", "ReplayStats", "replay", "replay_one"]


@dataclass(frozen=True)
class Recorded:
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    category: str = "all"
    id: str | int | None = None


@dataclass
class ReplayStats:
    steps: int = 0
    tokens: int = 0
    draft_nodes: int = 0
    accepted_lengths: list[int] = field(default_factory=list)

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


def replay_one(drafter: Drafter, record: Recorded, max_nodes: int) -> ReplayStats:
    """Replay one recorded output; the first output token comes from prefill, as in a real run."""
    stats = ReplayStats()
    output = [int(t) for t in record.output_token_ids]
    if not output:
        return stats
    context = [int(t) for t in record.prompt_token_ids] + output[:1]
    drafter.begin(list(record.prompt_token_ids))
    pos = 1
    while pos < len(output):
        tree = drafter.propose(context, max_nodes)
        remaining = output[pos:]
        path = tree.longest_match(remaining[:-1] if len(remaining) > 1 else [])
        accepted = [int(tree.token_ids[i]) for i in path]
        bonus = remaining[len(accepted)]
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
    drafter: Drafter, records: Iterable[Recorded], max_nodes: int
) -> dict[str, ReplayStats]:
    """Stats per category and for "all", replaying records in order (drafters may learn across)."""
    by_category: dict[str, ReplayStats] = defaultdict(ReplayStats)
    overall = ReplayStats()
    for record in records:
        one = replay_one(drafter, record, max_nodes)
        if record.category != "all":
            by_category[record.category].merge(one)
        overall.merge(one)
    return {**by_category, "all": overall}
