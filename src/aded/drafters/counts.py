"""Tri-gram and bigram counts learned across requests: the ADED representative's learned layer, and
what serving replicas share (`aded.integrations.shared_state`). One structure, so both bump, decay
and compact the same way.

Counts are stored times a global `scale`, so decaying everything is one division of the scale (a
request's end costs what it adds, not the table's size). `compact()` applies the pending decay,
drops entries below `min_count`, keeps each context's `max_successors` strongest successors and the
`max_contexts` contexts of largest total. Ties break by token, then by context, so the same calls
give the same table in every process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Bounds", "CountTable", "Counts"]

Counts = dict[int, float]
_MAX_SCALE = 1e12  # past this, pending decay is applied (compaction) to keep floats exact enough


@dataclass(frozen=True)
class Bounds:
    max_contexts: int = 200_000  # two-token contexts kept (smallest totals go first)
    max_successors: int = 8  # successors kept per context
    min_count: float = 0.05  # entries below this are dropped at compaction

    def __post_init__(self) -> None:
        if self.max_contexts < 1 or self.max_successors < 1:
            raise ValueError(f"max_contexts and max_successors must be >= 1, got {self.max_contexts}, {self.max_successors}")


class CountTable:
    """`(a, b) -> {c: count}` and `b -> {c: count}`; read true counts with `followers`."""

    def __init__(self, bounds: Bounds = Bounds()) -> None:
        self.bounds = bounds
        self.tri: dict[tuple[int, int], Counts] = {}  # stored counts: true count x scale
        self.bi: dict[int, Counts] = {}
        self.scale = 1.0

    def __len__(self) -> int:
        return len(self.tri)

    @property
    def num_entries(self) -> int:
        return sum(map(len, self.tri.values())) + sum(map(len, self.bi.values()))

    def followers(self, context: tuple[int, int] | int) -> Counts | None:
        """True counts after a two-token context (or, for an int, a one-token one); do not mutate."""
        counts = self.bi.get(context) if isinstance(context, int) else self.tri.get(context)
        if not counts or self.scale == 1.0:
            return counts
        return {c: w / self.scale for c, w in counts.items()}

    # ------------------------------------------------------------------ adding
    def add(self, context: tuple[int, int] | int, token: int, weight: float = 1.0) -> None:
        if isinstance(context, int):
            followers = self.bi.get(context)
            if followers is None:
                followers = self.bi[context] = {}
        else:
            followers = self.tri.get(context)
            if followers is None:
                followers = self.tri[context] = {}
        followers[token] = followers.get(token, 0.0) + weight * self.scale

    def add_sequence(self, token_ids: Sequence[int], weight: float = 1.0) -> None:
        """Count the sequence's tri-grams and bigrams."""
        tokens = [int(t) for t in token_ids]
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            self.add((a, b), c, weight)
        for b, c in itertools.pairwise(tokens):
            self.add(b, c, weight)

    def merge(self, other: CountTable, scale: float = 1.0) -> None:
        """Add `other`'s true counts (times `scale`)."""
        factor = scale / other.scale
        for table in (other.tri, other.bi):
            for context, followers in table.items():
                for c, w in followers.items():
                    self.add(context, c, w * factor)

    # ------------------------------------------------------------------ forgetting
    def decay(self, factor: float) -> None:
        """Shrink every count by `factor` (lazily, through the scale)."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"decay factor must lie in (0, 1], got {factor}")
        self.scale /= factor
        if self.scale > _MAX_SCALE:
            self.compact()

    @property
    def overfull(self) -> bool:
        # slack of 25%: compaction is O(table), so it runs once per quarter of growth, not per call
        limit = 1.25 * self.bounds.max_contexts
        return len(self.tri) > limit or len(self.bi) > limit

    def compact(self) -> None:
        """Apply the pending decay, drop small entries, keep the strongest successors and contexts."""
        self.tri = _compacted(self.tri, self.scale, self.bounds)
        self.bi = _compacted(self.bi, self.scale, self.bounds)
        self.scale = 1.0

    def compact_if_overfull(self) -> None:
        if self.overfull:
            self.compact()

    def copy(self) -> CountTable:
        table = CountTable(self.bounds)
        table.merge(self)
        return table

    # ------------------------------------------------------------------ plain arrays (files, transport)
    def to_arrays(self) -> dict[str, np.ndarray]:
        """True counts: keys [n, 3] / [m, 2] int64, counts [n] / [m] float64."""
        tri = [(a, b, c, w / self.scale) for (a, b), f in self.tri.items() for c, w in f.items()]
        bi = [(b, c, w / self.scale) for b, f in self.bi.items() for c, w in f.items()]
        tri_array = np.asarray(tri, dtype=np.float64).reshape(-1, 4)
        bi_array = np.asarray(bi, dtype=np.float64).reshape(-1, 3)
        return {
            "learned_tri_keys": tri_array[:, :3].astype(np.int64), "learned_tri_counts": tri_array[:, 3].copy(),
            "learned_bi_keys": bi_array[:, :2].astype(np.int64), "learned_bi_counts": bi_array[:, 2].copy(),
        }  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], bounds: Bounds = Bounds()) -> CountTable:
        table = cls(bounds)
        table.load_arrays(arrays)
        return table

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the counts, in place (holders of this table see them), by `to_arrays` output;
        KeyError or ValueError when the arrays are not such output."""
        tri_keys, tri_counts = np.asarray(arrays["learned_tri_keys"]), np.asarray(arrays["learned_tri_counts"])
        bi_keys, bi_counts = np.asarray(arrays["learned_bi_keys"]), np.asarray(arrays["learned_bi_counts"])
        if tri_keys.shape != (len(tri_counts), 3) or bi_keys.shape != (len(bi_counts), 2):
            raise ValueError(f"learned count arrays of shapes {tri_keys.shape}, {tri_counts.shape}, "
                             f"{bi_keys.shape}, {bi_counts.shape} do not fit together")
        self.tri, self.bi, self.scale = {}, {}, 1.0
        for (a, b, c), w in zip(tri_keys.tolist(), tri_counts.tolist()):
            self.add((a, b), c, w)
        for (b, c), w in zip(bi_keys.tolist(), bi_counts.tolist()):
            self.add(b, c, w)
        self.compact_if_overfull()


def _compacted(table: dict, scale: float, bounds: Bounds) -> dict:
    kept = []
    for context, followers in table.items():
        top = sorted(((w / scale, c) for c, w in followers.items() if w / scale >= bounds.min_count),
                     key=lambda x: (-x[0], x[1]))[: bounds.max_successors]
        if top:
            kept.append((sum(w for w, _ in top), context, {c: w for w, c in top}))
    if len(kept) > bounds.max_contexts:
        kept.sort(key=lambda x: (-x[0], x[1]))
        kept = kept[: bounds.max_contexts]
    return {context: followers for _, context, followers in kept}
