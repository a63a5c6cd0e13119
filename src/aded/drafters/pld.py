"""Prompt lookup: draft what followed earlier occurrences of the context's last n tokens.

Searches the prompt and the output so far. The longest n (from `max_ngram` down to `min_ngram`)
with an earlier occurrence wins; the continuations of its most recent occurrences are merged into
a tree, so a phrase that was followed differently in different places drafts both branches. Nodes
are kept best-first by how many occurrences support them.

The n-gram index is updated incrementally as the context grows (O(max_ngram) per new token), so a
lookup costs O(max_ngram + tree size) whatever the context length.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence

from aded.drafters.base import Drafter
from aded.drafters.context import FollowsContext
from aded.tree import DraftTree, TreeBuilder


class PromptLookupDrafter(FollowsContext, Drafter):
    name = "pld"

    def __init__(
        self,
        max_ngram: int = 4,
        min_ngram: int = 1,
        max_depth: int = 10,
        max_occurrences: int = 8,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_depth < 1 or max_occurrences < 1:
            raise ValueError("max_depth and max_occurrences must be at least 1")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_depth = max_depth
        self.max_occurrences = max_occurrences
        self.begin(())

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self._tokens: list[int] = []
        # n -> n-gram -> end positions (exclusive) of its occurrences, oldest first
        self._index: list[dict[tuple[int, ...], list[int]]] = [
            defaultdict(list) for _ in range(self.max_ngram + 1)
        ]
        self._take(prompt_ids)

    def _seen(self) -> list[int]:
        return self._tokens

    def _take(self, new_ids: Sequence[int]) -> None:
        tokens = self._tokens
        for token in new_ids:
            tokens.append(int(token))
            end = len(tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._index[n][tuple(tokens[end - n : end])].append(end)

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        self._follow(context_ids)
        tokens = self._tokens
        end = len(tokens)
        if max_nodes <= 0 or end == 0:
            return DraftTree.empty()
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            ends = self._index[n].get(tuple(tokens[end - n :]))
            if not ends or len(ends) < 2:  # the only occurrence is the context's own suffix
                continue
            starts = [e for e in reversed(ends[:-1]) if e < end][: self.max_occurrences]
            continuations = [tokens[s : s + self.max_depth] for s in starts]
            return _best_first_tree(continuations, max_nodes, self.name)
        return DraftTree.empty()


def _best_first_tree(continuations: list[list[int]], max_nodes: int, source: str) -> DraftTree:
    """Merge continuations into a trie; keep the nodes most occurrences agree on.

    A node's score is the fraction of continuations passing through it; nodes are taken in
    decreasing score (ties: shallower, then more recent), so a parent always precedes its child.
    """
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    first_seen: dict[tuple[int, ...], int] = {}
    for rank, continuation in enumerate(continuations):
        for depth in range(1, len(continuation) + 1):
            prefix = tuple(continuation[:depth])
            counts[prefix] += 1
            first_seen.setdefault(prefix, rank)
    total = len(continuations)
    heap: list[tuple[int, int, int, tuple[int, ...]]] = [(-counts[p], 1, first_seen[p], p) for p in counts if len(p) == 1]
    heapq.heapify(heap)
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
    for prefix in counts:
        if len(prefix) > 1:
            children[prefix[:-1]].append(prefix)
    builder = TreeBuilder(max_nodes)
    node_of: dict[tuple[int, ...], int] = {}
    while heap and not builder.full:
        neg_count, depth, _, prefix = heapq.heappop(heap)
        parent = node_of[prefix[:-1]] if depth > 1 else -1
        node = builder.add(parent, prefix[-1], -neg_count / total, source)
        if node is None:  # the budget is spent (checked above)
            break
        node_of[prefix] = node
        for child in children.get(prefix, ()):
            heapq.heappush(heap, (-counts[child], depth + 1, first_seen[child], child))
    return builder.build()
