"""How many draft nodes to verify: the cost-aware budget of method.md §6.

Verifying k nodes costs t(k) on this machine (measured once per model, dtype, device and thread
count, then cached). A drafter scores each node with its estimate that the node is accepted, so
the expected number of accepted tokens of the k best nodes is the sum of their scores, E(k). The
policy verifies the parent-closed set of top-scoring nodes that maximises

    (1 + E(k)) / t(k)            (tokens per second of the step; k = 0 is plain decoding)

Scores are calibrated online per depth (drafters are optimistic in some places, pessimistic in
others): the ratio of accepted nodes to predicted acceptances at each depth, decayed so it tracks
the current text. A drafter without scores gets 1.0 per node, which calibration turns into the
observed acceptance rate per depth. Because the decayed evidence fades back to the prior, a drafter
that was pruned to nothing is tried again now and then, at the cost of an occasional small tree.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from aded.tree import DraftTree

__all__ = ["CostModel", "BudgetPolicy", "measure_costs", "load_or_measure_costs"]

MAX_DEPTH = 64


@dataclass(frozen=True)
class CostModel:
    """t(k): seconds for one verification step with k draft nodes (k = 0: a plain decoding step)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes or self.sizes[0] != 0:
            raise ValueError("a cost model needs matching sizes and seconds, starting at k = 0")

    def __call__(self, k: int) -> float:
        if isinstance(k, int) and k >= 0:  # the loop asks for a whole k every step: no numpy call
            table = self._whole_sizes
            return table[min(k, len(table) - 1)]
        return float(np.interp(k, self.sizes, self.seconds))

    def upto(self, max_k: int) -> np.ndarray:
        """[max_k + 1] t(0), t(1), ..., t(max_k) (beyond the largest measured size t stays flat)."""
        return np.interp(np.arange(max_k + 1), self.sizes, self.seconds)

    @functools.cached_property
    def _whole_sizes(self) -> list[float]:
        """`upto` the largest measured size, as Python floats."""
        return self.upto(int(self.sizes[-1])).tolist()

    @classmethod
    def flat(cls) -> "CostModel":
        """Every size costs the same (roughly a GPU): the budget is then limited by scores alone."""
        return cls((0, 1024), (1.0, 1.0))

    @classmethod
    def typical_cpu(cls) -> "CostModel":
        """Relative costs seen for small models on a 2-core CPU; used until a measurement exists."""
        return cls((0, 2, 4, 8, 16, 32, 64), (1.0, 1.25, 1.35, 1.55, 1.85, 2.5, 3.8))


# bump when the runner's kernels change: t(k) cached on disk is then measured anew
COSTS_VERSION = "3"
COST_BUCKETS = np.array([0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 1024])
_BUCKET_PRIOR = 3.0  # pseudo-timings at the overall ratio in every bucket's estimate


@dataclass
class BudgetPolicy:
    cost: CostModel = field(default_factory=CostModel.typical_cpu)
    decay: float = 0.97  # per verified step: evidence fades with a half-life of ~23 steps
    prior_weight: float = 2.0  # pseudo-observations per depth pulling the ratio toward 1
    enabled: bool = True  # False: verify every proposed node (no pruning, no calibration)
    cost_memory: float = 0.95  # per timing of a size bucket: ~20 recent timings count
    cost_step: float = 1.5  # a timing counts as at most this factor off its bucket's estimate
    _predicted: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH + 1))
    _accepted: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH + 1))
    _unapplied_decay: float = 1.0  # steps that verified nothing only decay: applied when next read
    # observed / prior cost per size bucket, as decayed sums: the machine's state today (other
    # load, threads, thermal) corrects the once-measured curve where steps actually run
    # (Python lists: they are updated every step, where numpy's per-call cost would show)
    _cost_ratio_sum: list[float] = field(default_factory=lambda: [0.0] * len(COST_BUCKETS))
    _cost_ratio_n: list[float] = field(default_factory=lambda: [0.0] * len(COST_BUCKETS))
    explore_every: int = 32  # after this many steps that verified nothing, try a small tree:
    explore_cost: float = 1.5  # the most nodes (up to 4) whose step costs at most this many plain steps
    # Drafting costs time even when nothing of it is verified. After `thin_after` proposals in a
    # row that were not worth verifying, ask for one only every `thin_every` steps until one is.
    # (Backing off further, doubling the interval up to 32 while thinned proposals lose time, was
    # measured and lost: replay with true costs 1.14x -> 1.10x on GSM8K, 1.53x -> 1.51x on the
    # shipped set; drafts that land come in stretches, and a long interval misses their start.)
    thin_after: int = 8
    thin_every: int = 4
    # A drafter's time grows with its tree, and nodes beyond what the budget keeps are drafted for
    # nothing: ask for about twice what recent steps verified, at least `min_proposal`. After a
    # step that accepted every node it verified, ask for at least twice that many: a verbatim copy
    # (a whole function returned with one line changed) reaches the longest chains in a few steps
    # instead of the ten a decayed mean takes, where on a CPU each longer chain pays (replay of
    # such a copy on a Xeon's llama.cpp curve: 9.8 -> 12.8 tokens a step for suffix, 2.15x -> 2.26x).
    min_proposal: int = 8
    _verified_mean: float = 0.0  # decayed mean of nodes verified per step
    _all_accepted: int = 0  # nodes the last step verified, if it accepted them all (else 0)
    _idle_steps: int = 0
    _thinned: int = 0
    # What drafting earned lately: tokens per second of the steps that drafted, over the plain
    # decoding rate, drafting time included (a decayed mean; 1 = break-even). Below `min_gain`,
    # drafting is thinned as above: on an engine where a node costs a third of a step, drafts that
    # land about as often as they cost are a loss once drafting time counts.
    gain_memory: float = 0.9
    min_gain: float = 1.0
    _gain: float = 1.5

    def proposal_nodes(self, max_nodes: int) -> int:
        """How many nodes to ask the drafter for this step (at most `max_nodes`); 0 while drafts
        keep failing (a drafter answers 0 cheaply, without drafting)."""
        if not self.enabled:
            return max_nodes
        if self._idle_steps >= self.thin_after or self._gain < self.min_gain:
            self._thinned += 1
            if self._thinned < self.thin_every:
                return 0
            self._thinned = 0
        recent = max(math.ceil(2.0 * self._verified_mean), 2 * self._all_accepted)
        return min(max_nodes, max(self.min_proposal, recent))

    def _cost_ratios(self) -> list[float] | None:
        """Observed / prior cost per size bucket, None before any timing; a bucket with few
        timings leans on the overall ratio (3 pseudo-timings)."""
        overall = self._overall_cost_ratio()
        if overall is None:
            return None
        return [_blended(s, n, overall) for s, n in zip(self._cost_ratio_sum, self._cost_ratio_n)]

    def _overall_cost_ratio(self) -> float | None:
        total = sum(self._cost_ratio_n)
        return sum(self._cost_ratio_sum) / total if total else None

    def _bucket_ratio(self, bucket: int) -> float | None:
        """One bucket's entry of `_cost_ratios`, without computing the others."""
        overall = self._overall_cost_ratio()
        return None if overall is None else _blended(self._cost_ratio_sum[bucket], self._cost_ratio_n[bucket], overall)

    def step_cost(self, k: int) -> float:
        """t(k) in the prior's units, corrected by timings observed in this process."""
        ratio = self._bucket_ratio(_bucket(k))
        return self.cost(k) if ratio is None else self.cost(k) * ratio

    def step_costs(self, max_k: int) -> np.ndarray:
        """[max_k + 1] corrected t(0..max_k), computed at once (the budget asks every step)."""
        prior = self.cost.upto(max_k)
        ratios = self._cost_ratios()
        if ratios is None:
            return prior
        return prior * np.asarray(ratios)[_BUCKET_OF[np.minimum(np.arange(max_k + 1), len(_BUCKET_OF) - 1)]]

    def observe_step(self, drafted: bool, tokens: int, seconds: float) -> None:
        """A whole step (drafting, verification, bookkeeping) emitted `tokens` in `seconds`."""
        if not self.enabled or not drafted or seconds <= 0 or not any(self._cost_ratio_n):
            return
        ratio = tokens * self.step_cost(0) / seconds  # step_cost(0) is in seconds once observed
        self._gain = self.gain_memory * self._gain + (1.0 - self.gain_memory) * ratio

    def observe_cost(self, k: int, seconds: float) -> None:
        """One verification step of k nodes took `seconds`."""
        if not self.enabled or seconds <= 0:
            return
        bucket = _bucket(k)
        ratio = seconds / self.cost(k)
        # A timing counts as at most `cost_step` times its bucket's estimate (and at least
        # 1 / cost_step): one slow step (a kernel tuned on first use, a collection, the OS) would
        # otherwise price its size out for good, since the budget then stops choosing that size
        # and no later timing corrects it.
        estimate = self._bucket_ratio(bucket)
        estimate = 1.0 if estimate is None else estimate  # before any timing: the curve itself
        ratio = min(max(ratio, estimate / self.cost_step), estimate * self.cost_step)
        self._cost_ratio_sum[bucket] = self._cost_ratio_sum[bucket] * self.cost_memory + ratio
        self._cost_ratio_n[bucket] = self._cost_ratio_n[bucket] * self.cost_memory + 1.0

    def calibrated(self, tree: DraftTree) -> np.ndarray:
        """[k] calibrated acceptance estimates, never above the parent's."""
        raw = tree.scores if tree.scores is not None else np.ones(len(tree))
        depths = np.minimum(tree.depths, MAX_DEPTH)
        self._apply_decay()
        ratio = (self._accepted + self.prior_weight) / (self._predicted + self.prior_weight)
        scores = np.clip(raw * ratio[depths], 0.0, 1.0)
        for i, parent in enumerate(tree.parents.tolist()):
            if parent >= 0 and scores[i] > scores[parent]:
                scores[i] = scores[parent]
        return scores

    def plan_step(self, tree: DraftTree, max_leaves: int | None = None) -> DraftTree:
        """The subtree worth verifying this step on this machine (possibly empty), with at most
        `max_leaves` root-to-leaf paths (a runner's limit; None: any width). It plans a step: it
        counts steps that verified nothing (to explore now and then) and the sizes it chose."""
        if len(tree) == 0:
            return tree
        if not self.enabled:
            return tree.subtree(tree.within_leaves(range(len(tree)), max_leaves))
        scores = self.calibrated(tree)
        order = tree.within_leaves(_best_first(tree, scores), max_leaves)
        costs = self.step_costs(len(order))
        rates = (1.0 + np.concatenate(([0.0], np.cumsum(scores[order])))) / costs  # k = 0..n
        best_k = int(np.argmax(rates))  # the first of equal rates: the smallest tree
        if best_k == 0:
            # keep the estimates honest: a policy that never verifies never learns it was wrong
            self._idle_steps += 1
            if self._idle_steps >= self.explore_every:
                affordable = np.flatnonzero(costs[: min(len(order), 4) + 1] <= self.explore_cost * costs[0])
                best_k = max(1, int(affordable[-1]))
        if best_k:
            self._idle_steps = 0
        self._verified_mean = 0.9 * self._verified_mean + 0.1 * best_k
        return tree.subtree(order[:best_k])

    def _apply_decay(self) -> None:
        if self._unapplied_decay != 1.0:
            self._predicted *= self._unapplied_decay
            self._accepted *= self._unapplied_decay
            self._unapplied_decay = 1.0

    def observe(self, tree: DraftTree, accepted_nodes: tuple[int, ...]) -> None:
        """Fold one verified tree's outcome into the per-depth calibration."""
        if not self.enabled:
            return
        self._unapplied_decay *= self.decay
        self._all_accepted = len(tree) if len(accepted_nodes) == len(tree) else 0
        if len(tree) == 0:
            return
        self._apply_decay()
        raw = tree.scores if tree.scores is not None else np.ones(len(tree))
        depths = np.minimum(tree.depths, MAX_DEPTH)
        np.add.at(self._predicted, depths, raw)
        for node in accepted_nodes:
            self._accepted[depths[node]] += 1.0


def _blended(ratio_sum: float, timings: float, overall: float) -> float:
    """A bucket's cost ratio, leaning on the overall ratio while it has few timings."""
    return (ratio_sum + _BUCKET_PRIOR * overall) / (timings + _BUCKET_PRIOR)


def _bucket(k: int) -> int:
    return _BUCKETS[min(k, len(_BUCKETS) - 1)]


#: the nearest cost bucket of every k up to the largest bucket (ties to the smaller bucket)
_BUCKET_OF = np.abs(COST_BUCKETS[None, :] - np.arange(COST_BUCKETS[-1] + 1)[:, None]).argmin(axis=1)
_BUCKETS: list[int] = _BUCKET_OF.tolist()


def _best_first(tree: DraftTree, scores: np.ndarray) -> list[int]:
    """Nodes by decreasing score, each after its parent (a parent-closed prefix at every k)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents.tolist()):
        children.setdefault(parent, []).append(i)
    heap = [(-scores[i], i) for i in children.get(-1, [])]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        _, node = heapq.heappop(heap)
        order.append(node)
        for child in children.get(node, []):
            heapq.heappush(heap, (-scores[child], child))
    return order


# ---------------------------------------------------------------------------- measuring t(k)
DEFAULT_SIZES = (0, 1, 2, 4, 8, 12, 16, 24, 32)


def measure_costs(runner, sizes=DEFAULT_SIZES, past_len: int = 256, repeats: int = 5) -> CostModel:
    """Time verification steps of k nodes (a bushy tree, as drafts are) after `past_len` tokens.

    Sizes are interleaved in every round, so a slow moment of the machine hits all sizes alike,
    and each size's fastest round is kept (other load only ever adds time).

    Each step is timed as decoding meets it. A step whose batch differs in size from the one
    before costs more: llama.cpp rebuilds its compute graph, ~4 ms here on a 14 ms step. A drafted
    step usually follows a step of another size, and pays that, as the interleaving has it do. A
    plain step usually follows a plain step, so k = 0 is timed after an untimed plain step. Timed
    after a 32-node step instead, it read 16 ms where decoding takes 13-14, and a node looked like
    28% of a step when it costs ~45%.
    """
    if runner.max_tree_nodes is not None:  # sizes the runner cannot verify exactly never run,
        cap = runner.max_tree_nodes  # and the longest it can is timed, not extrapolated
        sizes = tuple(sorted({k for k in sizes if k <= cap} | {cap}))
    rng = np.random.default_rng(0)
    vocab = min(runner.vocab_size, 30000)
    seq = runner.new_sequence(past_len + max(sizes) + 8)
    runner.prefill(seq, rng.integers(0, vocab, past_len).tolist())
    trees = []
    for k in sizes:
        parents = np.array([-1] + [(i - 1) // 2 for i in range(1, k)], dtype=np.int64)[:k]
        tree = DraftTree(np.arange(100, 100 + k) % vocab, parents)  # siblings stay distinct
        if runner.max_tree_leaves is not None and len(tree.leaves()) > runner.max_tree_leaves:
            parents = np.array([-1] + [max(0, i - runner.max_tree_leaves) for i in range(1, k)])[:k]
            tree = DraftTree(np.arange(100, 100 + k) % vocab, parents)  # a comb of that width
        trees.append(tree)
    timings: list[list[float]] = [[] for _ in sizes]
    for round_ in range(repeats + 1):  # round 0 warms up kernels and is not kept
        for i, tree in enumerate(trees):
            if len(tree) == 0:  # a plain step after a plain step, as in decoding
                runner.verify(seq, 7 % vocab, tree)
                runner.commit(seq, ())
                runner.rewind(seq, past_len)
            start = time.perf_counter()
            runner.verify(seq, 7 % vocab, tree)
            elapsed = time.perf_counter() - start
            runner.commit(seq, ())
            runner.rewind(seq, past_len)
            if round_:
                timings[i].append(elapsed)
    seconds = [min(t) for t in timings]  # the least disturbed run; observed steps refine it
    # costs must not fall with size (timing noise would otherwise invite bigger trees)
    seconds = np.maximum.accumulate(np.asarray(seconds)).tolist()
    return CostModel(tuple(sizes), tuple(seconds))


def _cost_key(runner, model_id: str) -> str:
    parts = [model_id, COSTS_VERSION, runner.cost_identity(), platform.processor() or platform.machine()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def load_or_measure_costs(runner, model_id: str) -> CostModel:
    """The cached t(k) for this model and machine, measuring it (a few seconds) the first time."""
    from aded.fileio import write_atomic
    from aded.models import cache_dir
    from aded.progress import status

    path = cache_dir() / "costs" / f"{_cost_key(runner, model_id)}.json"
    try:
        data = json.loads(path.read_text())
        return CostModel(tuple(data["sizes"]), tuple(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with status("Measuring verification cost t(k) for this model and machine (once)"):
        costs = measure_costs(runner)
    record = {"sizes": list(costs.sizes), "seconds": list(costs.seconds), "model": model_id,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": os.uname().nodename}
    write_atomic(path, json.dumps(record, indent=1))
    return costs
