"""SuffixDecoding drafts: grow a tree below the longest matched suffix of the context.

Two suffix indexes (`aded.drafters.suffix_index.SuffixIndex`): one per request over its prompt and output so
far, one global over earlier requests' outputs (bounded, oldest evicted). For each, the longest
suffix of the context (up to `max_depth` tokens) is matched, and a tree is grown best-first below
it by the empirical continuation probability `count(child) / count(parent)`; a path's probability
is the product along it, paths under `min_prob` are dropped, and no path is longer than
`alpha * match_length`. The tree with the larger score (sum of node scores) wins, as in
SuffixDecoding; `mode="union"` merges both instead (the hybrid drafter uses that).

Node scores are calibrated acceptance probabilities (`aded.drafters.calibration`): the raw edge
probability is bucketed together with the matched context length (the coarse cell) and the
parent's count (the fine cell), and verification teaches how often such edges are accepted. The
match length belongs in the coarse cell: a fine cell with few edges falls back to it, and without
the length a two-token match in earlier outputs borrowed the rate of whole answers repeated
verbatim (0.99) and drafted another answer's words into this one. The tree order uses calibrated
scores.

Example: context `... x a b` with `a b c` seen 3 times and `a b d` once in the request; the match
is `a b` (length 2), so paths are at most 2 long: `c` (raw 0.75), `d` (raw 0.25), and below `c`
whatever followed `a b c`, e.g. `e` twice (raw 0.75 * 2/3 = 0.5).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import numpy as np

from aded.drafters.base import LearningDrafter, StepFeedback
from aded.drafters.calibration import BackoffCalibrator, bucket
from aded.drafters.context import FollowsContext
from aded.drafters.suffix_index import Match, SuffixIndex
from aded.tree import DraftTree, TreeBuilder

__all__ = ["SuffixDrafter", "Proposal", "merge_proposals"]

_PROB_EDGES = (0.2, 0.4, 0.6, 0.8, 0.95)
_SUPPORT_EDGES = (2, 3, 5, 9)
_LENGTH_EDGES = (2, 3, 5, 9, 17)

#: one drafted node: (path tokens from the root, calibrated score, calibration cells, source)
Proposal = tuple[tuple[int, ...], float, tuple, str]


class SuffixDrafter(FollowsContext, LearningDrafter):
    name = "suffix"

    def __init__(
        self,
        max_depth: int = 32,
        alpha: float = 1.0,
        min_prob: float = 0.1,
        global_max_tokens: int = 200_000,
        use_global: bool = True,
        mode: str = "best",
        max_occurrences: int | None = 256,
        prior_scale: float = 0.6,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        if mode not in ("best", "union"):
            raise ValueError(f"mode must be 'best' or 'union', got {mode!r}")
        if not 0.0 < prior_scale <= 1.0:
            raise ValueError(f"prior_scale must be in (0, 1], got {prior_scale}")
        self.max_depth = max_depth
        self.alpha = alpha
        self.min_prob = min_prob
        self.use_global = use_global
        self.mode = mode
        self.max_occurrences = max_occurrences
        self.prior_scale = prior_scale
        self.global_index = SuffixIndex(
            max_depth, max_tokens=global_max_tokens, max_occurrences=max_occurrences
        )
        self.calibrator = BackoffCalibrator()
        self.begin(())

    # ------------------------------------------------------------------ lifecycle
    def begin(self, prompt_ids: Sequence[int]) -> None:
        self._request = SuffixIndex(self.max_depth, max_occurrences=self.max_occurrences)
        self._context: list[int] = []
        self._cells: dict[tuple[int, ...], tuple] = {}
        self._take(prompt_ids)
        self._prompt_len = len(self._context)

    def _seen(self) -> list[int]:
        return self._context

    def _take(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        self._context.extend(tokens)
        self._request.extend(tokens)

    def observe(self, feedback: StepFeedback) -> None:
        self.calibrator.learn(self._cells, feedback)
        self._follow_step(feedback)

    def end(self, emitted: int | None = None) -> None:
        output = self._context[self._prompt_len :][:emitted]
        if self.use_global and output:
            self.global_index.add_sequence(output)

    # ------------------------------------------------------------------ drafting
    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        self._follow(context_ids)
        proposals = self.propose_nodes(max_nodes)
        self._cells = {path: cells for path, _, cells, _ in proposals}
        return merge_proposals(proposals, max_nodes)

    def propose_nodes(self, max_nodes: int) -> list[Proposal]:
        """Scored nodes of the chosen tree (or both trees in union mode), best first."""
        if max_nodes <= 0 or not self._context:
            return []
        sources = [("suffix", self._request)]
        if self.use_global and len(self.global_index):
            sources.append(("suffix-global", self.global_index))
        grown = []
        for label, index in sources:
            match = index.match(self._context)
            if match is not None:
                grown.append(self._grow(index, match, label, max_nodes))
        if not grown:
            return []
        if self.mode == "best":
            return max(grown, key=lambda nodes: sum(score for _, score, _, _ in nodes))
        return sorted((p for nodes in grown for p in nodes), key=lambda p: (-p[1], len(p[0])))

    def _grow(self, index: SuffixIndex, match: Match, label: str, max_nodes: int) -> list[Proposal]:
        """Best-first growth below the matched node; parents always precede their children."""
        max_len = int(self.alpha * match.length + 1e-9)
        if max_len < 1:
            return []
        heap: list = []
        counter = 0

        def push_children(ends: np.ndarray, path: tuple, score: float, raw: float) -> None:
            nonlocal counter
            total = len(ends)
            min_count = max(1, math.ceil(self.min_prob * total / raw - 1e-9))
            length = match.length + len(path)  # tokens of context the prediction rests on
            for child in index.children(ends, min_count):
                edge = child.count / total
                coarse = (label, bucket(edge, _PROB_EDGES), bucket(length, _LENGTH_EDGES))
                fine = (*coarse, bucket(total, _SUPPORT_EDGES))
                child_score = score * self.calibrator.estimate(fine, coarse, self.prior_scale * edge)
                counter += 1
                item = (-child_score, len(path) + 1, counter, path + (child.token,), raw * edge, child.ends, (fine, coarse))
                heapq.heappush(heap, item)

        push_children(match.ends, (), 1.0, 1.0)
        nodes: list[Proposal] = []
        while heap and len(nodes) < max_nodes:
            neg_score, depth, _, path, raw, ends, cells = heapq.heappop(heap)
            nodes.append((path, -neg_score, cells, label))
            if depth < max_len and len(ends):
                push_children(ends, path, -neg_score, raw)
        return nodes

    # ------------------------------------------------------------------ learned state
    def state_dict(self) -> dict[str, np.ndarray]:
        """The global index over earlier outputs and the calibration."""
        state = self.global_index.state_arrays()
        state["calibration"] = np.array(self.calibrator.to_json())
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replaces the global index object: load before spawning siblings that share it."""
        state = dict(state)
        index = SuffixIndex.from_state_arrays(state)
        index.max_occurrences = self.max_occurrences
        self.global_index = index
        if "calibration" in state:
            self.calibrator.load_json(str(state["calibration"]))


def merge_proposals(proposals: Sequence[Proposal], max_nodes: int) -> DraftTree:
    """Proposals sorted best first (parents before children) -> one tree of at most `max_nodes`."""
    builder = TreeBuilder(max_nodes)
    node_of: dict[tuple[int, ...], int] = {}
    for path, score, _, source in proposals:
        if builder.full:
            break
        parent = node_of.get(path[:-1], -1) if len(path) > 1 else -1
        if len(path) > 1 and path[:-1] not in node_of:
            continue
        node = builder.add(parent, path[-1], score, source)
        if node is not None:
            node_of[path] = node
    return builder.build()
