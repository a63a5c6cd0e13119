"""Draft trees: the one structure every drafter produces and the verifier consumes.

A tree hangs below a *root*: the last committed token, whose key/value is not in the cache yet.
Nodes are stored flat in topological order (a parent always comes before its children), each with
a token id and a parent index (-1 for the root's children). Everything verification needs (depths,
position offsets, the ancestor mask, child lookup, root-to-node paths) is derived here, so no
drafter ever builds a mask.

Example: drafts "a b c" and "a d" become

    index   0  1  2  3
    token   a  b  c  d
    parent -1  0  1  0
    depth   1  2  3  2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

__all__ = ["DraftTree", "TreeBuilder"]


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Flat token tree below the root. Immutable; derived buffers are computed once and cached."""

    token_ids: np.ndarray  # [k] int64
    parents: np.ndarray  # [k] int64, -1 = child of the root, else an earlier index
    scores: np.ndarray | None = None  # [k] float, drafter's estimate that the node is accepted
    sources: tuple[str, ...] | None = None  # [k] which draft source proposed each node

    def __post_init__(self) -> None:
        token_ids = np.asarray(self.token_ids, dtype=np.int64).reshape(-1)
        parents = np.asarray(self.parents, dtype=np.int64).reshape(-1)
        token_ids.flags.writeable = False
        parents.flags.writeable = False
        object.__setattr__(self, "token_ids", token_ids)
        object.__setattr__(self, "parents", parents)
        if parents.shape != token_ids.shape:
            raise ValueError(f"{len(token_ids)} tokens but {len(parents)} parents")
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if scores.shape != token_ids.shape:
                raise ValueError(f"{len(token_ids)} tokens but {len(scores)} scores")
            object.__setattr__(self, "scores", scores)
        if self.sources is not None and len(self.sources) != len(token_ids):
            raise ValueError(f"{len(token_ids)} tokens but {len(self.sources)} sources")
        # checked on lists: drafters make several small trees a step, and numpy calls on a few
        # elements cost more than the loops
        tokens, parent_list = token_ids.tolist(), parents.tolist()
        if tokens and min(tokens) < 0:
            raise ValueError("token ids must be non-negative")
        if any(parent >= i or parent < -1 for i, parent in enumerate(parent_list)):
            raise ValueError("each parent must be -1 or an earlier node index (topological order)")
        edges = list(zip(parent_list, tokens))
        if len(set(edges)) != len(edges):
            parent, token = next(edge for i, edge in enumerate(edges) if edge in edges[:i])
            raise ValueError(f"duplicate child token {token} under node {parent}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls) -> DraftTree:
        return _EMPTY

    @classmethod
    def chain(cls, token_ids: Sequence[int], source: str | None = None) -> DraftTree:
        n = len(token_ids)
        return cls(
            np.asarray(token_ids, dtype=np.int64),
            np.arange(-1, n - 1, dtype=np.int64),
            sources=(source,) * n if source is not None else None,
        )

    # ------------------------------------------------------------------ derived structure
    def __len__(self) -> int:
        return len(self.token_ids)

    @cached_property
    def depths(self) -> np.ndarray:
        """[k] depth of each node; the root's children have depth 1."""
        depths = np.zeros(len(self), dtype=np.int64)
        for i, parent in enumerate(self.parents.tolist()):
            depths[i] = 1 if parent < 0 else depths[parent] + 1
        return _frozen(depths)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

    @cached_property
    def children(self) -> dict[int, dict[int, int]]:
        """parent index (-1 = root) -> {token id: child index}, children in index order."""
        table: dict[int, dict[int, int]] = {}
        for i, (parent, token) in enumerate(zip(self.parents.tolist(), self.token_ids.tolist())):
            table.setdefault(parent, {})[token] = i
        return table

    @cached_property
    def ancestor_mask(self) -> np.ndarray:
        """[k, k] bool: row i is True at node i and at each of its ancestors."""
        k = len(self)
        mask = np.zeros((k, k), dtype=bool)
        for i, parent in enumerate(self.parents.tolist()):
            if parent >= 0:
                mask[i] = mask[parent]
            mask[i, i] = True
        return _frozen(mask)

    @cached_property
    def verify_mask(self) -> np.ndarray:
        """[1 + k, 1 + k] bool over (root, nodes): who may attend to whom inside the step's input."""
        k = len(self)
        mask = np.zeros((k + 1, k + 1), dtype=bool)
        mask[:, 0] = True
        mask[1:, 1:] = self.ancestor_mask
        return _frozen(mask)

    @cached_property
    def position_offsets(self) -> np.ndarray:
        """[1 + k] position of (root, nodes) relative to the root's position."""
        return _frozen(np.concatenate([[0], self.depths]).astype(np.int64))

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """The token path from the root to each node (the node's own token last): what tells the
        same draft apart in trees of different sources or steps, whatever its index there."""
        paths: list[tuple[int, ...]] = []
        for parent, token in zip(self.parents.tolist(), self.token_ids.tolist()):
            paths.append((paths[parent] if parent >= 0 else ()) + (token,))
        return tuple(paths)

    @cached_property
    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive)."""
        path = []
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def path_tokens(self, node: int) -> list[int]:
        return [int(self.token_ids[i]) for i in self.path_to(node)]

    def leaves(self) -> list[int]:
        has_child = np.zeros(len(self), dtype=bool)
        has_child[self.parents[self.parents >= 0]] = True
        return [i for i in range(len(self)) if not has_child[i]]

    def longest_match(self, tokens: Sequence[int]) -> list[int]:
        """Node indices of the longest tree path that equals a prefix of `tokens`."""
        path: list[int] = []
        node = -1
        for token in tokens:
            child = self.children.get(node, {}).get(int(token))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The tree restricted to the nodes `keep` (which must include every kept node's parent)."""
        keep_sorted = sorted(int(i) for i in keep)
        if len(keep_sorted) == len(self):
            return self
        new_index = {old: new for new, old in enumerate(keep_sorted)}
        parents = []
        for old in keep_sorted:
            parent = int(self.parents[old])
            if parent >= 0 and parent not in new_index:
                raise ValueError(f"node {old} is kept without its parent {parent}")
            parents.append(new_index[parent] if parent >= 0 else -1)
        idx = np.asarray(keep_sorted, dtype=np.int64)
        return DraftTree(
            self.token_ids[idx],
            np.asarray(parents, dtype=np.int64),
            scores=self.scores[idx] if self.scores is not None else None,
            sources=tuple(self.sources[i] for i in keep_sorted) if self.sources is not None else None,
        )

    def within_leaves(self, order: Sequence[int], max_leaves: int | None) -> list[int]:
        """The longest run of `order` (a parent-first node order) whose nodes, with their kept
        parents, form a tree of at most `max_leaves` root-to-leaf paths; nodes that would add a
        path beyond that are skipped, and so are their descendants."""
        if max_leaves is None:
            return list(order)
        parents = self.parents.tolist()
        kept: set[int] = set()
        has_child: set[int] = set()
        leaves = 0
        out: list[int] = []
        for node in order:
            parent = parents[node]
            if parent >= 0 and parent not in kept:
                continue
            grows = parent < 0 or parent in has_child  # a new path, not the extension of a leaf
            if grows and leaves >= max_leaves:
                continue
            leaves += grows
            kept.add(node)
            has_child.add(parent)
            out.append(node)
        return out

    def __repr__(self) -> str:
        return f"DraftTree(k={len(self)}, depth={self.max_depth}, tokens={self.token_ids.tolist()}, parents={self.parents.tolist()})"


def _frozen(array: np.ndarray) -> np.ndarray:
    """Derived buffers are shared by every user of a tree: make accidental writes fail loudly."""
    array.flags.writeable = False
    return array


_EMPTY = DraftTree(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


@dataclass
class TreeBuilder:
    """Accumulates draft paths into a trie under a node budget; the usual way drafters make trees.

    Adding a path reuses the nodes of any prefix already present and appends the rest until the
    budget is spent. A node keeps the highest score and the first source that proposed it.
    """

    max_nodes: int | None = None
    _tokens: list[int] = field(default_factory=list)
    _parents: list[int] = field(default_factory=list)
    _scores: list[float] = field(default_factory=list)
    _sources: list[str | None] = field(default_factory=list)
    _index: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def full(self) -> bool:
        return self.max_nodes is not None and len(self._tokens) >= self.max_nodes

    def add(self, parent: int, token: int, score: float = 0.0, source: str | None = None) -> int | None:
        """Add one node under `parent` (or find it); None when the budget is spent."""
        key = (parent, int(token))
        existing = self._index.get(key)
        if existing is not None:
            if score > self._scores[existing]:
                self._scores[existing] = score
            return existing
        if self.full:
            return None
        index = len(self._tokens)
        self._index[key] = index
        self._tokens.append(int(token))
        self._parents.append(parent)
        self._scores.append(float(score))
        self._sources.append(source)
        return index

    def add_path(
        self,
        tokens: Sequence[int],
        scores: Sequence[float] | None = None,
        source: str | None = None,
        parent: int = -1,
    ) -> int:
        """Add a path below `parent`; returns how many of its tokens are in the tree afterwards."""
        for depth, token in enumerate(tokens):
            node = self.add(parent, token, scores[depth] if scores is not None else 0.0, source)
            if node is None:
                return depth
            parent = node
        return len(tokens)

    def build(self) -> DraftTree:
        if not self._tokens:
            return DraftTree.empty()
        sources = None
        if any(s is not None for s in self._sources):
            sources = tuple(s or "" for s in self._sources)
        return DraftTree(
            np.asarray(self._tokens, dtype=np.int64),
            np.asarray(self._parents, dtype=np.int64),
            scores=np.asarray(self._scores, dtype=np.float64),
            sources=sources,
        )
