"""Online calibration of draft scores: how often does a drafted edge get accepted?

The engine keeps the top-scoring nodes of a tree under a cost model, so a node's score must be the
probability that it is accepted, not a raw frequency: a continuation seen once in the prompt is
"certain" by counts yet the model follows it perhaps half the time. Scores here are built edge by
edge: `P(node accepted) = P(parent accepted) * P(edge | parent accepted)`, and the edge factor is
learned from verification. An edge is *judged* when the model emitted its parent (or it hangs from
the root) and *accepted* when the model emitted its token there; edges under a rejected parent
teach nothing.

Edges are described by a fine feature cell (e.g. source, frequency bucket, match-length bucket)
that backs off to a coarse cell (e.g. source, frequency bucket), which backs off to a prior:

    coarse = (acc_c + w * prior)  / (n_c + w)
    fine   = (acc_f + w * coarse) / (n_f + w)

Example: with w = 4 and prior 0.6, a coarse cell seen 10 times with 3 acceptances gives
(3 + 2.4) / 14 = 0.39; a fine cell inside it seen twice, both accepted, gives (2 + 1.54) / 6 = 0.59.
Counts are capped (older evidence is scaled down), so the estimates follow a drifting workload.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Mapping

from aded.drafters.base import StepFeedback

__all__ = ["BackoffCalibrator", "bucket", "judged_edges"]


def bucket(value: float, edges: tuple[float, ...]) -> int:
    """Index of the first edge above `value` (len(edges) if none): a small fixed histogram bin."""
    return bisect_right(edges, value)


class BackoffCalibrator:
    """Acceptance rate of drafted edges per feature cell, backing off from a fine cell to a coarse
    one to a prior; see the module docstring."""

    def __init__(self, prior_weight: float = 4.0, max_weight: float = 400.0) -> None:
        if prior_weight <= 0 or max_weight <= prior_weight:
            raise ValueError(f"need 0 < prior_weight < max_weight, got {prior_weight}, {max_weight}")
        self.prior_weight = prior_weight
        self.max_weight = max_weight
        self._stats: dict[Hashable, list[float]] = {}  # cell -> [accepted, tried]

    def rate(self, cell: Hashable, prior: float) -> float:
        accepted, tried = self._stats.get(cell, (0.0, 0.0))
        return (accepted + self.prior_weight * prior) / (tried + self.prior_weight)

    def estimate(self, fine: Hashable, coarse: Hashable, prior: float) -> float:
        return self.rate(fine, self.rate(coarse, prior))

    def update(self, fine: Hashable, coarse: Hashable, accepted: bool) -> None:
        for cell in (fine, coarse):
            stats = self._stats.setdefault(cell, [0.0, 0.0])
            stats[0] += 1.0 if accepted else 0.0
            stats[1] += 1.0
            if stats[1] > self.max_weight:
                scale = self.max_weight / stats[1]
                stats[0] *= scale
                stats[1] *= scale

    def learn(self, cells: Mapping[tuple[int, ...], tuple[Hashable, Hashable]], feedback: StepFeedback) -> None:
        """Count every judged edge of a proposal (`judged_edges`); `cells` maps each proposed path
        to its (fine, coarse) cells."""
        for path, accepted in judged_edges(cells, feedback):
            self.update(*cells[path], accepted)

    def tried(self, cell: Hashable) -> float:
        return self._stats.get(cell, (0.0, 0.0))[1]

    def to_json(self) -> str:
        """The learned counts as JSON (cells are tuples of strings, ints and tuples)."""
        return json.dumps([[_listed(cell), stats] for cell, stats in self._stats.items()])

    def load_json(self, text: str) -> None:
        try:
            rows = json.loads(text)
            self._stats = {_tupled(cell): [float(a), float(n)] for cell, (a, n) in rows}
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a calibration state: {text[:80]!r}") from exc


def _listed(cell):
    return [_listed(x) for x in cell] if isinstance(cell, tuple) else cell


def _tupled(cell):
    return tuple(_tupled(x) for x in cell) if isinstance(cell, list) else cell


def judged_edges(
    paths: Iterable[tuple[int, ...]], feedback: StepFeedback
) -> list[tuple[tuple[int, ...], bool]]:
    """(path, accepted) for every proposed path whose parent the model emitted.

    The committed tokens (accepted + bonus) are what the model emitted after the root and after
    each accepted node, so an edge below the root or an accepted node is judged by comparing its
    token with the model's, whether or not the engine kept it for verification. Judging the whole
    proposal (not only what was verified) keeps an edge class that the engine prunes from being
    starved of evidence at a low estimate.
    """
    committed = feedback.committed
    out = []
    for path in paths:
        depth = len(path)
        if 0 < depth <= len(committed) and path[: depth - 1] == committed[: depth - 1]:
            out.append((path, path[-1] == committed[depth - 1]))
    return out
