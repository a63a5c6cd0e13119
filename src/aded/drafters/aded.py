"""ADED: Monte Carlo tree search over the layered tri-gram representative (arXiv 2407.12021).

What differs from the public code, and why:
- The value means something: a node's Q is the expected number of accepted tokens through it,
  given its parent is accepted, from *calibrated* acceptance probabilities. A `ProbabilityCalibrator` maps
  the representative's raw probability (and which layer it came from) to the acceptance rate
  measured on this model's verification feedback, so the search learns what this model accepts.
- Randomness (rollouts) comes from a seeded generator, re-seeded per proposal from the context,
  so a fresh run with the same seed gives the same drafts. Unseen contexts back off to bigrams.
- Simulations, depth and the node budget are parameters; defaults were chosen by offline replay.

Each simulation: select children by PUCT, `Q + c_puct * P * sqrt(N) / (1 + n)` (P = calibrated
probability, N the parent's visits, n the child's); expand the leaf with the representative's
candidates; roll out `rollout_depth` sampled tokens; back up the expected accepted length. The
draft is the searched tree's nodes with the highest path acceptance probability (see `_tree`);
every node's score is that probability, so the engine can prune the tree by expected gain.
"""

from __future__ import annotations

import copy
import math
import os
import random
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aded.drafters.base import LearningDrafter, StepFeedback
from aded.drafters.calibration import bucket
from aded.drafters.counts import CountTable
from aded.drafters.representative import NUM_LEVELS, Representative, RepresentativeConfig
from aded.store.datastore import Datastore, TokenizerIdentity, tokenizer_identity
from aded.tree import DraftTree, TreeBuilder

__all__ = ["AdedDrafter", "ProbabilityCalibrator"]

_BIN_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_DEPTH_EDGES = (2, 3, 5)  # depth buckets: 1, 2, 3-4, 5+
_DEPTH_PRIOR = 10.0  # pseudo-counts pulling a depth factor toward 1


class ProbabilityCalibrator:
    """Turns the representative's raw probability of a drafted edge into the rate at which this
    model accepts such edges, by (layer, supported, raw-probability bin).

    Each cell is a Beta posterior whose prior mean is the raw probability itself (strength
    `prior`), so with no feedback the raw probability is returned; counts decay slowly so it
    follows the model as the representative drifts. On top, a factor per depth (1, 2, 3-4, 5+)
    corrects what the cells miss about deep edges: errors compound along a path, and without it
    deep trees promised more accepted tokens than they delivered (measured: benchmarks/drafts.md).
    """

    def __init__(self, prior: float = 4.0, decay: float = 0.9995) -> None:
        self.prior = prior
        self.decay = decay
        shape = (NUM_LEVELS, 2, len(_BIN_EDGES) + 1)
        self.accepted = np.zeros(shape)  # [levels, supported, bins]
        self.tried = np.zeros(shape)
        self._raw_sum = np.zeros(shape)  # sum of raw probabilities seen in each cell
        self.depth_accepted = np.zeros(len(_DEPTH_EDGES) + 1)  # [depth buckets]
        self.depth_predicted = np.zeros(len(_DEPTH_EDGES) + 1)  # sum of cell estimates
        self._factors = [1.0] * (len(_DEPTH_EDGES) + 1)
        self._memo: dict[tuple[int, int, int], tuple[float, float, float]] = {}

    @staticmethod
    def cell(level: int, supported: bool, raw: float) -> tuple[int, int, int]:
        return level, int(supported), bucket(raw, _BIN_EDGES)

    def __call__(self, level: int, supported: bool, raw: float) -> float:
        cell = self.cell(level, supported, raw)
        stats = self._memo.get(cell)
        if stats is None:  # (accepted, tried, mean raw) as floats: numpy scalar reads are slow
            tried = float(self.tried[cell])
            stats = self._memo[cell] = (float(self.accepted[cell]), tried, float(self._raw_sum[cell]) / tried if tried else 0.0)
        accepted, tried, mean_raw = stats
        if tried == 0:
            return raw
        # empirical rate in the cell, shifted by how far this raw value is from the cell's mean
        rate = (accepted + self.prior * mean_raw) / (tried + self.prior)
        return min(max(rate + (raw - mean_raw) * 0.5, 1e-4), 0.999)

    def depth_factor(self, depth: int) -> float:
        return self._factors[bucket(depth, _DEPTH_EDGES)]

    def update(self, level: int, supported: bool, raw: float, accepted: bool, depth: int = 1,
               predicted: float | None = None) -> None:
        """One tested edge; `predicted` is the probability the draft used before the depth factor."""
        b = bucket(depth, _DEPTH_EDGES)
        predicted = self(level, supported, raw) if predicted is None else predicted
        self.depth_accepted[b] = self.depth_accepted[b] * self.decay + float(accepted)
        self.depth_predicted[b] = self.depth_predicted[b] * self.decay + predicted
        ratio = (self.depth_accepted[b] + _DEPTH_PRIOR) / (self.depth_predicted[b] + _DEPTH_PRIOR)
        self._factors[b] = float(min(max(ratio, 0.3), 1.2))
        cell = self.cell(level, supported, raw)
        self.accepted[cell] = self.accepted[cell] * self.decay + float(accepted)
        self.tried[cell] = self.tried[cell] * self.decay + 1.0
        self._raw_sum[cell] = self._raw_sum[cell] * self.decay + raw
        self._memo.pop(cell, None)

    def arrays(self) -> dict[str, np.ndarray]:
        """The learned cells, copied."""
        arrays = {"calib_accepted": self.accepted, "calib_tried": self.tried, "calib_raw_sum": self._raw_sum,
                  "calib_depth_accepted": self.depth_accepted, "calib_depth_predicted": self.depth_predicted}  # fmt: skip
        return {key: np.array(value, dtype=np.float64, copy=True) for key, value in arrays.items()}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the learned cells by `arrays()` output; ValueError when they do not fit."""
        loaded = {}
        for key, like in self.arrays().items():
            if key not in arrays:
                raise ValueError(f"calibration array {key!r} is missing")
            value = np.array(arrays[key], dtype=np.float64)
            if value.shape != like.shape:
                raise ValueError(f"calibration array {key!r} has shape {value.shape}, expected {like.shape}")
            loaded[key] = value
        self.accepted, self.tried, self._raw_sum = loaded["calib_accepted"], loaded["calib_tried"], loaded["calib_raw_sum"]
        self.depth_accepted, self.depth_predicted = loaded["calib_depth_accepted"], loaded["calib_depth_predicted"]
        ratios = (self.depth_accepted + _DEPTH_PRIOR) / (self.depth_predicted + _DEPTH_PRIOR)
        self._factors = np.clip(ratios, 0.3, 1.2).tolist()
        self._memo.clear()


class _Node:
    __slots__ = ("token", "parent", "tail", "p", "meta", "path_p", "depth", "children", "visits", "value", "expanded")

    def __init__(self, token: int, parent: _Node | None, tail: tuple[int, ...], p: float, meta: tuple, depth: int) -> None:  # fmt: skip
        self.token, self.parent, self.tail, self.p, self.meta, self.depth = token, parent, tail, p, meta, depth
        self.path_p: float = p * (parent.path_p if parent is not None else 1.0)
        self.children: list[_Node] = []
        self.visits = 0
        self.value = 0.0  # sum of backed-up expected accepted lengths through this node
        self.expanded = False


class AdedDrafter(LearningDrafter):
    """MCTS drafts over an adaptive layered tri-gram representative.

    `datastore`: a datastore file (or an open `Datastore`); None uses the default datastore of
    `tokenizer` when one is given, else drafts from the request and learned layers only.
    `learned`: a learned-state file to start from (`aded.drafters.state_file`, e.g. a server's
    `--state` file). `learn=False` freezes the cross-request layer and the calibration (for
    measuring what adaptivity adds).
    """

    name = "aded"
    needs_tokenizer = True  # to find (or build) and check its datastore
    # a Monte-Carlo tree search: many lookups' time a step (measured: benchmarks/drafts.md)
    expensive = True

    def __init__(
        self,
        datastore: str | os.PathLike | Datastore | None = None,
        tokenizer: Any = None,
        *,
        # more simulations accepted no more tokens in replay, at a higher cost (measured: benchmarks/drafts.md)
        num_simulations: int = 8,
        # at least one simulation per asked node, so a large ask can grow a path that deep (each
        # simulation expands one node); the hybrid turns it off: its lookups draft the deep paths
        simulations_follow_ask: bool = True,
        max_depth: int = 16,
        rollout_depth: int = 1,
        c_puct: float = 1.0,
        branching: int = 6,
        # the model's top-k at verified nodes as extra evidence (Token Recycling); off: replayed with
        # the model's real top-k it was never faster, and it makes drafting slower (measured:
        # benchmarks/drafts.md)
        topk: int = 0,
        seed: int = 0,
        learn: bool = True,
        learned: str | os.PathLike | None = None,
        config: RepresentativeConfig | None = None,
    ) -> None:
        if num_simulations < 1 or max_depth < 1 or branching < 1 or rollout_depth < 0:
            raise ValueError("num_simulations, max_depth and branching must be >= 1, rollout_depth >= 0")
        self.identity: TokenizerIdentity | None = tokenizer_identity(tokenizer) if tokenizer is not None else None
        if isinstance(datastore, Datastore):
            store = datastore
        elif datastore is not None:
            store = Datastore.load(datastore, expect=self.identity)
        elif tokenizer is not None:
            from aded.store.default import default_datastore_path

            store = Datastore.load(default_datastore_path(tokenizer), expect=self.identity)
        else:
            store = None
        if self.identity is None and store is not None:
            self.identity = store.tokenizer
        self.rep = Representative(store, config or RepresentativeConfig())
        self.calibrator = ProbabilityCalibrator()
        self.num_simulations = num_simulations
        self.simulations_follow_ask = simulations_follow_ask
        self.max_depth = max_depth
        self.rollout_depth = rollout_depth
        self.c_puct = c_puct
        self.branching = branching
        self.wants_topk = topk
        self.seed = seed
        self.learn = learn
        self._shared_counts = False  # True: the counts are someone else's to learn (`use_shared_counts`)
        # path tokens -> (level, supported, raw p, calibrated p before the depth factor)
        self._proposed: dict[tuple[int, ...], tuple] = {}
        if learned is not None:
            from aded.drafters.state_file import StateFile

            self.load_state_dict(StateFile(learned, self.name, self.identity).read()[1])

    # ------------------------------------------------------------------ lifecycle
    def begin(self, prompt_ids: Sequence[int]) -> None:
        self.rep.begin(prompt_ids)

    def end(self, emitted: int | None = None) -> None:
        if self.learn and not self._shared_counts:
            self.rep.end(emitted)
        else:
            self.rep.begin(())

    # ------------------------------------------------------------------ learned state
    def state_dict(self) -> dict[str, np.ndarray]:
        """The learned tri-/bigram counts and the acceptance calibration."""
        return {**self.rep.learned.to_arrays(), **self.calibrator.arrays()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"aded state needs arrays {sorted(expected)}, got {sorted(state)}")
        CountTable(self.rep.learned.bounds).load_arrays(dict(state))  # checked before anything changes
        self.calibrator.load(state)
        self.rep.learned.load_arrays(dict(state))

    def spawn(self) -> AdedDrafter:
        """A sibling with its own request layer, sharing the learned counts and the calibration."""
        sibling = copy.copy(self)
        sibling.rep = Representative(self.rep.datastore, self.rep.config, learned=self.rep.learned)
        sibling._proposed = {}
        return sibling

    def use_shared_counts(self, table: CountTable) -> bool:
        self.rep.learned = table
        self._shared_counts = True
        return True

    # ------------------------------------------------------------------ drafting
    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        if max_nodes <= 0 or len(context_ids) == 0:
            return DraftTree.empty()
        self.rep.sync(context_ids)
        order = self.rep.config.max_order
        root = _Node(-1, None, tuple(int(t) for t in context_ids[-order:]), 1.0, (), 0)
        seed = zlib.crc32(np.asarray(context_ids[-8:], dtype=np.int64).tobytes()) ^ self.seed
        rng = random.Random(seed)
        cache: dict[tuple[int, ...], list[tuple[int, float, tuple]]] = {}
        simulations = max(self.num_simulations, max_nodes) if self.simulations_follow_ask else self.num_simulations
        for _ in range(simulations):
            self._simulate(root, cache, rng)
            if not root.children:
                break
        return self._tree(root, max_nodes)

    def _expansions(self, tail: tuple[int, ...], cache: dict) -> list[tuple[int, float, tuple]]:
        """Calibrated (token, p, (level, supported, raw p)) after `tail`, memoised for the proposal."""
        hit = cache.get(tail)
        if hit is None:
            hit = []
            total = 0.0
            for cand in self.rep.candidates(tail, self.branching):
                p = self.calibrator(cand.level, cand.supported, cand.prob)
                hit.append((cand.token, p, (cand.level, cand.supported, cand.prob)))
                total += p
            if total > 1.0:  # siblings are exclusive events
                hit = [(token, p / total, meta) for token, p, meta in hit]
            cache[tail] = hit
        return hit

    def _simulate(self, root: _Node, cache: dict, rng: random.Random) -> None:
        node, path, c_puct = root, [root], self.c_puct
        while node.expanded and node.children and node.depth < self.max_depth:
            sqrt_n = math.sqrt(node.visits)
            best, best_u = None, -1.0
            for child in node.children:
                q = child.value / child.visits if child.visits else child.p
                u = q + c_puct * child.p * sqrt_n / (1 + child.visits)
                if u > best_u:
                    best, best_u = child, u
            assert best is not None  # every u is >= 0
            node = best
            path.append(node)
        if not node.expanded and node.depth < self.max_depth:
            node.expanded = True
            factor = self.calibrator.depth_factor(node.depth + 1)
            for token, p, meta in self._expansions(node.tail, cache):
                child_p = min(p * factor, 0.999)
                tail = (node.tail + (token,))[-self.rep.config.max_order :]
                node.children.append(_Node(token, node, tail, child_p, (*meta, p), node.depth + 1))
        value = self._rollout(node, cache, rng)
        for visited in reversed(path):
            visited.visits += 1
            if visited is not root:
                value = visited.p * (1.0 + value)
                visited.value += value

    def _rollout(self, node: _Node, cache: dict, rng: random.Random) -> float:
        """Expected accepted tokens below `node` along one sampled continuation."""
        tail, depth, reach, total = node.tail, node.depth, 1.0, 0.0
        for _ in range(self.rollout_depth):
            if depth >= self.max_depth:
                break
            options = self._expansions(tail, cache)
            if not options:
                break
            draw, token, p = rng.random(), options[-1][0], options[-1][1]
            mass = sum(o[1] for o in options)
            for option_token, option_p, _ in options:
                draw -= option_p / mass
                if draw <= 0:
                    token, p = option_token, option_p
                    break
            reach *= p
            total += reach
            tail = (tail + (token,))[-self.rep.config.max_order :]
            depth += 1
        return total

    def _tree(self, root: _Node, max_nodes: int) -> DraftTree:
        """The searched tree's nodes of highest path acceptance probability (visits break ties).

        Every node the search created is a candidate: the visited ones and the children their
        expansion revealed (the public code's "most visited paths, each extended by one greedy
        token"). Taking them by path probability maximises the expected accepted length,
        the sum of the chosen nodes' path probabilities; parents always rank before children.
        """
        nodes, stack = [], list(root.children)
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children)
        nodes.sort(key=lambda n: (-n.path_p, -n.visits, n.depth))
        builder = TreeBuilder(max_nodes)
        index: dict[int, int] = {id(root): -1}
        paths: dict[int, tuple[int, ...]] = {id(root): ()}
        self._proposed = {}
        for node in nodes:
            if builder.full:
                break
            parent = index.get(id(node.parent))
            if parent is None:
                continue
            added = builder.add(parent, node.token, node.path_p, self.name)
            if added is None:  # the budget is spent (checked above)
                break
            index[id(node)] = added
            paths[id(node)] = paths[id(node.parent)] + (node.token,)
            self._proposed[paths[id(node)]] = node.meta
        return builder.build()

    # ------------------------------------------------------------------ learning from verification
    def observe(self, feedback: StepFeedback) -> None:
        tree, order = feedback.tree, self.rep.config.max_order
        context = list(feedback.context_ids[-order:])  # all a tail below (`order` >= 2) reads
        accepted = set(feedback.accepted_nodes)
        topk = feedback.model_topk
        paths = tree.paths
        for i, (parent, token) in enumerate(zip(tree.parents.tolist(), tree.token_ids.tolist())):
            path = paths[i]
            parent_on_path = parent < 0 or parent in accepted
            if parent_on_path:  # this edge was tested against the model's own token
                meta = self._proposed.get(path)  # (level, supported, raw p, p before the depth factor)
                if meta and self.learn:
                    self.calibrator.update(meta[0], meta[1], meta[2], accepted=i in accepted, depth=len(path),
                                           predicted=meta[3])
                if i not in accepted:
                    self.rep.reject((context + list(path[:-1]))[-order:], token)
            if topk is not None and i not in accepted:
                # the model's next tokens after an off-path node: free evidence (Token Recycling)
                self.rep.add_model_topk((context + list(path))[-2:], topk[i + 1].tolist())
        if topk is not None:
            # on the accepted path the top-1 is committed anyway; its runners-up are evidence too
            for row, path in [(0, ())] + [(i + 1, paths[i]) for i in feedback.accepted_nodes]:
                self.rep.add_model_topk((context + list(path))[-2:], [-1] + topk[row, 1:].tolist())
