"""Acceptance: which drafted nodes the target model itself would have produced (method.md §3).

Greedy: from the root, descend into the child whose token is the argmax of the current node's
logits; the argmax where no child matches is the bonus token. The output is token for token the
model's own greedy decoding.

Sampling: drafts carry no distribution, so the exact rule is sample-and-match. At the current node
draw x from the model's warped distribution; if a child carries x, descend; otherwise x is the
bonus token and the step ends. Each emitted token is then drawn from exactly the distribution
ordinary sampling would use, whatever the tree. (Sampling an independent token per path and keeping
the best path, as the public ADED code does, is biased and never done here.)

Both read the rows they are given: with processors (processors.py) those are each node's processed
scores, so acceptance follows what plain decoding with the same processors would emit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aded.tree import DraftTree

__all__ = ["Sampling", "Acceptance", "accept_greedy", "accept_sampled", "warp"]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters in the order transformers applies them: temperature, top-k, top-p, min-p."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off; keeps ids at least min_p times as likely as the likeliest

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclass(frozen=True)
class Acceptance:
    accepted_nodes: tuple[int, ...]  # tree indices, root's child first
    accepted_ids: tuple[int, ...]
    bonus_id: int


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """`logits`: [1 + k, vocab] CPU float32 from verification (row 0 = after the root)."""
    argmax = logits.numpy().argmax(axis=-1).tolist()  # [1 + k]; numpy: no thread pool to wake
    return _descend(tree, lambda row: argmax[row])


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Probabilities [vocab] after temperature, top-k, top-p and min-p, as transformers' warpers do.

    `logits` are the row's scores after any processors (processors.py): what plain sampling would
    warp in that row's context."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if sampling.min_p > 0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < sampling.min_p * probs.max(), float("-inf"))
    return scores.softmax(dim=-1)


def accept_sampled(
    tree: DraftTree, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> Acceptance:
    """Sample-and-match over the tree; only the rows actually visited are warped and sampled
    (`generator` None: torch's default one)."""

    def draw(row: int) -> int:
        probs = warp(logits[row], sampling)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    return _descend(tree, draw)


def _descend(tree: DraftTree, next_token) -> Acceptance:
    children = tree.children
    node = -1
    nodes: list[int] = []
    ids: list[int] = []
    while True:
        token = next_token(node + 1)
        child = children.get(node, {}).get(token)
        if child is None:
            return Acceptance(tuple(nodes), tuple(ids), token)
        nodes.append(child)
        ids.append(token)
        node = child
