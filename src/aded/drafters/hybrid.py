"""One draft tree from every source, ranked by calibrated acceptance probability.

Each source (edit-aware copying, suffix indexes, ADED when it is available) proposes its own scored tree
for the full budget. The trees are merged into one trie keyed by token path; every edge records
which sources proposed it and their confidence (a node's score over its parent's). The hybrid then
learns, from verification, `P(edge accepted | parent accepted)` per cell (set of agreeing sources,
their best confidence bucket, depth bucket) with `aded.drafters.calibration.BackoffCalibrator`, and
keeps the `max_nodes` nodes of highest path probability (product of edge estimates), best first.

Cheap sources first: the lookups (prompt lookup, suffix, edit) are asked every step; a source
that searches (`Drafter.expensive`, ADED's Monte-Carlo search) only when the lookups' likeliest
first token is right less often than `confident`, as learned every step by a separate calibration
of the lookups alone (cell: which lookups propose it, their confidence), or when they found
nothing. On the other steps it is asked for 0 nodes, which costs it nothing (ADED catches up with
the context at its next real proposal) and tells it no proposal of its is judged. That gate pays
where steps verify one path (llama.cpp's chains: a search's branches are not verified there),
not where they verify trees (transformers): there the search's branches land beside the lookups'
path. So once a verified tree has branched (the verifier takes trees), the search is asked every
step.

Agreement is learned, not assumed: prompt lookup and the per-request suffix index read the same
text, so their agreement is weak evidence, while the suffix index agreeing with ADED's corpus
statistics may be strong; each combination of sources is its own cell.

Example: pld proposes `a b` (1.0, 1.0), suffix proposes `a c` (0.6, 0.3). Edge `a` has sources
{pld, suffix}; after a few hundred steps in which such edges were accepted 70% of the time it
scores 0.7; `b` (pld alone, accepted 40%) scores 0.7 * 0.4 = 0.28; `c` scores 0.7 * its cell.

Each source is told what became of its own proposal: `observe` hands it its tree restricted to the
nodes that were verified, with the accepted path and bonus as seen from its tree.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aded.drafters.base import Drafter, LearningDrafter, StepFeedback, load_state, sibling_of
from aded.drafters.calibration import BackoffCalibrator, bucket
from aded.drafters.counts import CountTable
from aded.tree import DraftTree, TreeBuilder

__all__ = ["HybridDrafter", "default_sources"]

_CONFIDENCE_EDGES = (0.2, 0.4, 0.6, 0.8, 0.95)
_DEPTH_EDGES = (2, 3, 5, 9)
_UNSCORED = 0.5  # confidence of a node from a source that gives no scores


def default_sources() -> list[str]:
    """Registered sources the hybrid combines: edit, suffix, and aded when it imports.

    Not pld: edit copies what prompt lookup copies (its fallback is prompt lookup's match) and
    stays aligned through edits; with pld as a fourth source the hybrid accepted fewer tokens per
    step in replay, its near-duplicate proposals splitting the calibration cells (measured:
    benchmarks/drafts.md)."""
    from aded.drafters import DRAFTERS, drafter_class

    names = ["edit", "suffix"]
    if "aded" in DRAFTERS:
        try:
            drafter_class("aded")
        except (ImportError, AttributeError):
            return names
        names.append("aded")
    return names


class HybridDrafter(LearningDrafter):
    """`sources`: drafter names (from the registry) or drafter objects; None = `default_sources()`.
    `tokenizer` / `datastore` go to the aded source; `source_options` maps a name to its options."""

    name = "hybrid"
    needs_tokenizer = True  # passed on to the aded source, to find and check its datastore

    def __init__(
        self,
        sources: Sequence[str | Drafter] | None = None,
        *,
        tokenizer: Any = None,
        datastore: Any = None,
        source_options: dict[str, dict[str, Any]] | None = None,
        # sources score calibrated probabilities already: shrinking them lost accepted tokens in
        # replay (measured: benchmarks/drafts.md)
        prior_scale: float = 1.0,
        confident: float = 0.6,
    ) -> None:
        from aded.drafters import make_drafter

        if not 0.0 < prior_scale <= 1.0:
            raise ValueError(f"prior_scale must be in (0, 1], got {prior_scale}")
        if not 0.0 <= confident <= 1.0:
            raise ValueError(f"confident must be in [0, 1] (1 asks every source every step), got {confident}")
        # the search drafts the branches near the root; the lookups draft the deep paths
        options: dict[str, dict[str, Any]] = {"suffix": {"mode": "union"}, "aded": {"simulations_follow_ask": False}}
        if tokenizer is not None or datastore is not None:
            options["aded"].update(tokenizer=tokenizer, datastore=datastore)
        for name, extra in (source_options or {}).items():
            options.setdefault(name, {}).update(extra)
        self.sources: list[Drafter] = []
        for source in default_sources() if sources is None else sources:
            if isinstance(source, Drafter):
                self.sources.append(source)
            elif source == self.name:
                raise ValueError("the hybrid drafter cannot be one of its own sources")
            else:
                self.sources.append(make_drafter(source, **options.get(source, {})))
        if not self.sources:
            raise ValueError("the hybrid drafter needs at least one source")
        self.wants_topk = max(s.wants_topk for s in self.sources)
        self.prior_scale = prior_scale
        self.confident = confident
        self._verifies_trees = False  # set by the first verified tree that is not a chain
        self.calibrator = BackoffCalibrator()
        self.gate = BackoffCalibrator()  # P(the lookups' likeliest first token is right | its cell)
        self._gate_pick: tuple[tuple, int] | None = None  # (cells, token) judged by the next observe
        self._last: list[DraftTree] = []
        self._cells: dict[tuple[int, ...], tuple] = {}

    def begin(self, prompt_ids: Sequence[int]) -> None:
        for source in self.sources:
            source.begin(prompt_ids)

    def end(self, emitted: int | None = None) -> None:
        for source in self.sources:
            source.end(emitted)

    # ------------------------------------------------------------------ drafting
    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        self._gate_pick = None
        cheap = [s.propose(context_ids, max_nodes) if not s.expensive else None for s in self.sources]
        edges = self._merge(cheap) if max_nodes > 0 else {}
        searchable = max_nodes > 0 and None in cheap
        ask = searchable and (self._unsure(edges) or self._verifies_trees)  # the gate learns every step
        self._last = [t if t is not None else s.propose(context_ids, max_nodes if ask else 0)
                      for s, t in zip(self.sources, cheap)]
        if max_nodes <= 0:
            self._cells = {}
            return DraftTree.empty()
        if ask:  # the search's tree joins the lookups'; otherwise it proposed nothing
            edges = self._merge(self._last)
        children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for path in edges:
            children.setdefault(path[:-1], []).append(path)
        builder = TreeBuilder(max_nodes)
        node_of: dict[tuple[int, ...], int] = {(): -1}
        cells: dict[tuple[int, ...], tuple] = {}
        heap: list = []
        counter = 0

        def push(parent: tuple[int, ...], score: float) -> None:
            nonlocal counter
            for path in children.get(parent, ()):
                cells[path], edge = self._edge(path, *edges[path])
                counter += 1
                heapq.heappush(heap, (-score * edge, len(path), counter, path))

        push((), 1.0)
        while heap and not builder.full:
            neg_score, _, _, path = heapq.heappop(heap)
            labels = edges[path][0]
            node = builder.add(node_of[path[:-1]], path[-1], -neg_score, "+".join(labels))
            if node is None:  # the budget is spent (checked above)
                break
            node_of[path] = node
            push(path, -neg_score)
        self._cells = cells  # every scored candidate, kept or not, is judged by the outcome
        return builder.build()

    def _unsure(self, cheap_edges: dict[tuple[int, ...], tuple[tuple[str, ...], float]]) -> bool:
        """Should the expensive sources draft this step too (given the lookups' merged edges)?
        Picks the lookups' likeliest first token for `observe` to judge."""
        best = 0.0
        for path, (labels, confidence) in cheap_edges.items():
            if len(path) == 1:
                cell = (labels, bucket(confidence, _CONFIDENCE_EDGES))
                estimate = self.gate.estimate(cell, labels, self.prior_scale * confidence)
                if estimate > best:
                    self._gate_pick, best = ((cell, labels), path[0]), estimate
        return self.confident >= 1.0 or best < self.confident

    def _edge(self, path: tuple[int, ...], labels: tuple[str, ...], confidence: float) -> tuple[tuple, float]:
        """An edge's calibration cells (fine, coarse) and its estimated acceptance."""
        coarse = (labels, bucket(confidence, _CONFIDENCE_EDGES))
        fine = (*coarse, bucket(len(path), _DEPTH_EDGES))
        return (fine, coarse), self.calibrator.estimate(fine, coarse, self.prior_scale * confidence)

    def _merge(self, trees: Sequence[DraftTree | None]) -> dict[tuple[int, ...], tuple[tuple[str, ...], float]]:
        """path -> (sorted labels of the sources proposing it, their best confidence), over
        `trees` (one per source, None for one not asked)."""
        merged: dict[tuple[int, ...], tuple[set[str], float]] = {}
        for source, tree in zip(self.sources, trees):
            if tree is None:
                continue
            paths = tree.paths
            parents = tree.parents.tolist()
            scores = tree.scores.tolist() if tree.scores is not None else None
            for i, path in enumerate(paths):
                label = tree.sources[i] if tree.sources is not None and tree.sources[i] else source.name
                confidence = _UNSCORED
                if scores is not None:
                    parent = parents[i]
                    above = scores[parent] if parent >= 0 else 1.0
                    confidence = min(max(scores[i] / above, 0.0), 1.0) if above > 0 else 0.0
                labels, best = merged.get(path, (set(), 0.0))
                labels.add(label)
                merged[path] = (labels, max(best, confidence))
        return {path: (tuple(sorted(labels)), best) for path, (labels, best) in merged.items()}

    # ------------------------------------------------------------------ learned state
    def state_dict(self) -> dict[str, np.ndarray]:
        """Its calibrations and each learning source's state, keyed `source/name`."""
        state = {"hybrid/calibration": np.array(self.calibrator.to_json()),
                 "hybrid/gate": np.array(self.gate.to_json())}
        for source in self._learners():
            state.update({f"{source.name}/{k}": v for k, v in source.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        names = {"hybrid", *(s.name for s in self.sources)}
        foreign = sorted(k for k in state if k.split("/", 1)[0] not in names)
        if foreign:
            raise ValueError(f"hybrid state has arrays of no source of this hybrid: {foreign}")
        for source in self.sources:
            prefix = f"{source.name}/"
            load_state(source, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        if "hybrid/calibration" in state:
            self.calibrator.load_json(str(state["hybrid/calibration"]))
        if "hybrid/gate" in state:
            self.gate.load_json(str(state["hybrid/gate"]))

    def spawn(self) -> HybridDrafter:
        """A sibling whose sources are siblings of these; the calibration is shared."""
        sibling = copy.copy(self)
        sibling.sources = [sibling_of(source) for source in self.sources]
        sibling._last, sibling._cells, sibling._gate_pick = [], {}, None
        return sibling

    def use_shared_counts(self, table: CountTable) -> bool:
        # a list, not a generator: every source with such a layer attaches, not only the first
        return any([source.use_shared_counts(table) for source in self._learners()])

    def _learners(self) -> list[LearningDrafter]:
        return [source for source in self.sources if isinstance(source, LearningDrafter)]

    # ------------------------------------------------------------------ feedback
    def observe(self, feedback: StepFeedback) -> None:
        if self._gate_pick is not None:
            (cell, labels), token = self._gate_pick
            self.gate.update(cell, labels, token == (feedback.accepted_ids or (feedback.bonus_id,))[0])
            self._gate_pick = None
        self.calibrator.learn(self._cells, feedback)
        if not self._verifies_trees:  # `is_chain` is cached on the tree; the real runners ask it too
            self._verifies_trees = not feedback.tree.is_chain
        verified = {path: i for i, path in enumerate(feedback.tree.paths)}
        for source, tree in zip(self.sources, self._last or [DraftTree.empty()] * len(self.sources)):
            source.observe(_restrict(source, tree, verified, feedback))


def _restrict(source: Drafter, tree: DraftTree, verified: dict[tuple[int, ...], int],
              feedback: StepFeedback) -> StepFeedback:
    """The step as one source saw it: its verified nodes, its accepted path, the next token."""
    # verified nodes are parent-closed (the engine verifies subtrees), so this is a tree
    sub = tree.subtree([i for i, path in enumerate(tree.paths) if path in verified])
    committed = feedback.committed
    path = sub.longest_match(committed[:-1])
    topk = None
    if source.wants_topk and feedback.model_topk is not None:
        rows = [0] + [verified[p] + 1 for p in sub.paths]
        topk = feedback.model_topk[rows, : source.wants_topk]
    return StepFeedback(
        context_ids=feedback.context_ids,
        tree=sub,
        accepted_nodes=tuple(path),
        accepted_ids=tuple(int(sub.token_ids[i]) for i in path),
        bonus_id=committed[len(path)],
        model_topk=topk,
    )
