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

import copy
import functools
import hashlib
import heapq
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aded.tree import DraftTree

__all__ = ["CostModel", "Budget", "BudgetConfig", "BudgetState", "StepOutcome", "CostAwareBudget", "VerifyAll",
           "new_budget", "cost_model", "read_cost_file", "BUDGETS", "measure_costs", "load_or_measure_costs"]

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
    def from_dict(cls, data: Any) -> CostModel:
        """The curve of `{"sizes": [...], "seconds": [...]}`; ValueError when it is not one."""
        try:
            return cls(tuple(int(k) for k in data["sizes"]), tuple(float(t) for t in data["seconds"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'no cost curve {{"sizes": [...], "seconds": [...]}} ({exc})') from exc

    def as_dict(self) -> dict[str, list]:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def flat(cls) -> CostModel:
        """Every size costs the same (roughly a GPU): the budget is then limited by scores alone."""
        return cls((0, 1024), (1.0, 1.0))

    @classmethod
    def typical_cpu(cls) -> CostModel:
        """Relative costs seen for small models on a 2-core CPU; used until a measurement exists."""
        return cls((0, 2, 4, 8, 16, 32, 64), (1.0, 1.25, 1.35, 1.55, 1.85, 2.5, 3.8))


# bump when the runner's kernels change: t(k) cached on disk is then measured anew
COSTS_VERSION = "3"
COST_BUCKETS = np.array([0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 1024])
_BUCKET_PRIOR = 3.0  # pseudo-timings at the overall ratio in every bucket's estimate


@dataclass(frozen=True)
class BudgetConfig:
    """The budget's tuning knobs, fixed for a run (what it learns lives in `BudgetState`)."""

    decay: float = 0.97  # per verified step: evidence fades with a half-life of ~23 steps
    prior_weight: float = 2.0  # pseudo-observations per depth pulling the ratio toward 1
    cost_memory: float = 0.95  # per timing of a size bucket: ~20 recent timings count
    cost_step: float = 1.5  # a timing counts as at most this factor off its bucket's estimate
    explore_every: int = 32  # after this many steps that verified nothing, try a small tree:
    explore_cost: float = 1.5  # the most nodes (up to 4) whose step costs at most this many plain steps
    # Drafting costs time even when nothing of it is verified. After `thin_after` proposals in a
    # row that were not worth verifying, ask for one only every `thin_every` steps until one is
    # (a longer back-off misses the start of the stretches in which drafts land; measured in
    # benchmarks/drafts.md).
    thin_after: int = 8
    thin_every: int = 4
    # A drafter's time grows with its tree, and nodes beyond what the budget keeps are drafted for
    # nothing: ask for about twice what recent steps verified, at least `min_proposal`. After a
    # step that accepted every node it verified, ask for at least twice that many: a verbatim copy
    # reaches the longest chains in a few steps instead of the ten a decayed mean takes, where on
    # a CPU each longer chain pays.
    min_proposal: int = 8
    # What drafting earned lately: tokens per second of the steps that drafted, over the plain
    # decoding rate, drafting time included (a decayed mean; 1 = break-even). Below `min_gain`,
    # drafting is thinned as above: on an engine where a node costs a third of a step, drafts that
    # land about as often as they cost are a loss once drafting time counts.
    gain_memory: float = 0.9
    min_gain: float = 1.0
    initial_gain: float = 1.5


@dataclass
class BudgetState:
    """What a budget learned from the steps it saw: plain values, so a copy is a snapshot."""

    predicted: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH + 1))  # per depth
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DEPTH + 1))  # per depth
    unapplied_decay: float = 1.0  # steps that verified nothing only decay: applied when next read
    # observed / prior cost per size bucket, as decayed sums: the machine's state today (other
    # load, threads, thermal) corrects the once-measured curve where steps actually run
    # (Python lists: they are updated every step, where numpy's per-call cost would show)
    cost_ratio_sum: list[float] = field(default_factory=lambda: [0.0] * len(COST_BUCKETS))
    cost_ratio_n: list[float] = field(default_factory=lambda: [0.0] * len(COST_BUCKETS))
    verified_mean: float = 0.0  # decayed mean of nodes verified per step
    all_accepted: int = 0  # nodes the last step verified, if it accepted them all (else 0)
    idle_steps: int = 0  # steps in a row that verified nothing
    thinned: int = 0  # proposals skipped since the last one asked for while thinning
    gain: float = BudgetConfig.initial_gain  # see BudgetConfig.gain_memory


@dataclass(frozen=True)
class StepOutcome:
    """What one decoding step showed: the tree verified, the nodes accepted, and its times."""

    tree: DraftTree
    accepted_nodes: tuple[int, ...]
    drafted: bool  # whether the drafter was asked for a tree this step
    verify_s: float  # the forward pass of the tree (and its acceptance)
    step_s: float  # the whole step: drafting, verification, bookkeeping

    @property
    def tokens(self) -> int:
        """Tokens the step emitted: its accepted path and the model's own next token."""
        return len(self.accepted_nodes) + 1


class Budget(Protocol):
    """What the decoding loop asks of a budget, in the order of a step."""

    def nodes_to_draft(self, max_nodes: int) -> int:
        """How many nodes to ask the drafter for (0: skip drafting this step)."""

    def plan(self, tree: DraftTree, max_leaves: int | None = None) -> DraftTree:
        """The parent-closed part of `tree` to verify, with at most `max_leaves` paths."""

    def learn(self, outcome: StepOutcome) -> None:
        """Fold one step's outcome into what the budget knows."""

    def snapshot(self) -> Any:
        """What it learned so far, unaffected by later steps."""

    def restore(self, snapshot: Any) -> None:
        """Forget what was learned since `snapshot`."""


class VerifyAll:
    """No budget: every proposed node is verified (within the runner's width); nothing learned."""

    def nodes_to_draft(self, max_nodes: int) -> int:
        return max_nodes

    def plan(self, tree: DraftTree, max_leaves: int | None = None) -> DraftTree:
        if len(tree) == 0:
            return tree
        return tree.subtree(tree.within_leaves(range(len(tree)), max_leaves))

    def learn(self, outcome: StepOutcome) -> None:
        pass

    def snapshot(self) -> Any:
        return None

    def restore(self, snapshot: Any) -> None:
        pass


class CostAwareBudget:
    """The budget of method.md §6 over a measured cost curve t(k) (see the module docstring)."""

    def __init__(self, cost: CostModel | None = None, config: BudgetConfig = BudgetConfig()) -> None:
        self.cost = cost if cost is not None else CostModel.typical_cpu()
        self.config = config
        self.state = BudgetState(gain=config.initial_gain)

    # ------------------------------------------------------------------ the loop's protocol
    def nodes_to_draft(self, max_nodes: int) -> int:
        """At most `max_nodes`; 0 while drafts keep failing (a drafter answers 0 cheaply)."""
        c, s = self.config, self.state
        if s.idle_steps >= c.thin_after or s.gain < c.min_gain:
            s.thinned += 1
            if s.thinned < c.thin_every:
                return 0
            s.thinned = 0
        recent = max(math.ceil(2.0 * s.verified_mean), 2 * s.all_accepted)
        return min(max_nodes, max(c.min_proposal, recent))

    def plan(self, tree: DraftTree, max_leaves: int | None = None) -> DraftTree:
        """The subtree worth verifying this step on this machine (possibly empty). It counts steps
        that verified nothing (to explore now and then) and the sizes it chose."""
        if len(tree) == 0:
            return tree
        s = self.state
        scores = self.calibrated(tree)
        order = tree.within_leaves(_best_first(tree, scores), max_leaves)
        costs = self.step_costs(len(order))
        rates = (1.0 + np.concatenate(([0.0], np.cumsum(scores[order])))) / costs  # k = 0..n
        best_k = int(np.argmax(rates))  # the first of equal rates: the smallest tree
        if best_k == 0:
            # keep the estimates honest: a policy that never verifies never learns it was wrong
            s.idle_steps += 1
            if s.idle_steps >= self.config.explore_every:
                affordable = np.flatnonzero(costs[: min(len(order), 4) + 1] <= self.config.explore_cost * costs[0])
                best_k = max(1, int(affordable[-1]))
        if best_k:
            s.idle_steps = 0
        s.verified_mean = 0.9 * s.verified_mean + 0.1 * best_k
        return tree.subtree(order[:best_k])

    def learn(self, outcome: StepOutcome) -> None:
        self.learn_acceptance(outcome.tree, outcome.accepted_nodes)
        self.learn_cost(len(outcome.tree), outcome.verify_s)
        if outcome.drafted:
            self.learn_gain(outcome.tokens, outcome.step_s)

    def snapshot(self) -> BudgetState:
        return copy.deepcopy(self.state)

    def restore(self, snapshot: BudgetState) -> None:
        self.state = copy.deepcopy(snapshot)

    # ------------------------------------------------------------------ what it learns
    def learn_acceptance(self, tree: DraftTree, accepted_nodes: tuple[int, ...]) -> None:
        """Fold one verified tree's outcome into the per-depth calibration."""
        s = self.state
        s.unapplied_decay *= self.config.decay
        s.all_accepted = len(tree) if len(accepted_nodes) == len(tree) else 0
        if len(tree) == 0:
            return
        self._apply_decay()
        raw = tree.scores if tree.scores is not None else np.ones(len(tree))
        depths = np.minimum(tree.depths, MAX_DEPTH)
        np.add.at(s.predicted, depths, raw)
        for node in accepted_nodes:
            s.accepted[depths[node]] += 1.0

    def learn_cost(self, k: int, seconds: float) -> None:
        """One verification step of k nodes took `seconds`."""
        if seconds <= 0:
            return
        s = self.state
        bucket = _bucket(k)
        ratio = seconds / self.cost(k)
        # A timing counts as at most `cost_step` times its bucket's estimate (and at least
        # 1 / cost_step): one slow step (a kernel tuned on first use, a collection, the OS) would
        # otherwise price its size out for good, since the budget then stops choosing that size
        # and no later timing corrects it.
        estimate = self._bucket_ratio(bucket)
        estimate = 1.0 if estimate is None else estimate  # before any timing: the curve itself
        step = self.config.cost_step
        ratio = min(max(ratio, estimate / step), estimate * step)
        memory = self.config.cost_memory
        s.cost_ratio_sum[bucket] = s.cost_ratio_sum[bucket] * memory + ratio
        s.cost_ratio_n[bucket] = s.cost_ratio_n[bucket] * memory + 1.0

    def learn_gain(self, tokens: int, seconds: float) -> None:
        """A whole step that drafted emitted `tokens` in `seconds` (drafting included)."""
        s = self.state
        if seconds <= 0 or not any(s.cost_ratio_n):
            return
        ratio = tokens * self.step_cost(0) / seconds  # step_cost(0) is in seconds once observed
        memory = self.config.gain_memory
        s.gain = memory * s.gain + (1.0 - memory) * ratio

    # ------------------------------------------------------------------ what it believes
    def calibrated(self, tree: DraftTree) -> np.ndarray:
        """[k] calibrated acceptance estimates, never above the parent's."""
        s = self.state
        raw = tree.scores if tree.scores is not None else np.ones(len(tree))
        depths = np.minimum(tree.depths, MAX_DEPTH)
        self._apply_decay()
        prior = self.config.prior_weight
        ratio = (s.accepted + prior) / (s.predicted + prior)
        scores = np.clip(raw * ratio[depths], 0.0, 1.0)
        for i, parent in enumerate(tree.parents.tolist()):
            if parent >= 0 and scores[i] > scores[parent]:
                scores[i] = scores[parent]
        return scores

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

    def _cost_ratios(self) -> list[float] | None:
        """Observed / prior cost per size bucket, None before any timing; a bucket with few
        timings leans on the overall ratio (3 pseudo-timings)."""
        overall = self._overall_cost_ratio()
        if overall is None:
            return None
        s = self.state
        return [_blended(total, n, overall) for total, n in zip(s.cost_ratio_sum, s.cost_ratio_n)]

    def _overall_cost_ratio(self) -> float | None:
        total = sum(self.state.cost_ratio_n)
        return sum(self.state.cost_ratio_sum) / total if total else None

    def _bucket_ratio(self, bucket: int) -> float | None:
        """One bucket's entry of `_cost_ratios`, without computing the others."""
        overall = self._overall_cost_ratio()
        s = self.state
        return None if overall is None else _blended(s.cost_ratio_sum[bucket], s.cost_ratio_n[bucket], overall)

    def _apply_decay(self) -> None:
        s = self.state
        if s.unapplied_decay != 1.0:
            s.predicted *= s.unapplied_decay
            s.accepted *= s.unapplied_decay
            s.unapplied_decay = 1.0


def new_budget(cost: CostModel | None, config: BudgetConfig = BudgetConfig()) -> Budget:
    """A fresh budget over `cost`; None: verify every proposed node."""
    return VerifyAll() if cost is None else CostAwareBudget(cost, config)


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
    from aded.paths import cache_dir
    from aded.progress import status

    path = cache_dir() / "costs" / f"{_cost_key(runner, model_id)}.json"
    try:
        return CostModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    with status("Measuring verification cost t(k) for this model and machine (once)"):
        costs = measure_costs(runner)
    record = {**costs.as_dict(), "model": model_id, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": os.uname().nodename}
    write_atomic(path, json.dumps(record, indent=1))
    return costs


def read_cost_file(path: str | os.PathLike) -> CostModel:
    """A measured t(k) from a file: the cached curve of either backend (`~/.cache/aded/costs/*.json`)
    or an `aded bench` results.json or its folder (the run's recorded curve)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable cost file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds no cost curve")
    curve = data.get("config", {}).get("cost_model") if isinstance(data.get("config"), dict) else None
    try:
        return CostModel.from_dict(curve or data.get("cost_model") or data)
    except ValueError as exc:
        raise ValueError(f"{path}: holds {exc}") from exc


#: the budgets every surface names (a surface may offer fewer), and what each prices a step at
BUDGETS = {
    "measured": "t(k) measured once for this model and machine, then cached",
    "fresh": "t(k) timed now, not cached (a final run on a quiet machine)",
    "typical": "a typical small-model CPU curve (no measurement)",
    "off": "no budget: every proposed node is verified",
}


def cost_model(name: str, runner=None, model_id: str = "model") -> CostModel | None:
    """The cost curve a budget named `name` prices steps at (None for "off"): a name of `BUDGETS`
    or, with no runner to time, a cost file (`read_cost_file`)."""
    if name == "off":
        return None
    if name == "typical":
        return CostModel.typical_cpu()
    if name in ("measured", "fresh"):
        if runner is None:
            raise ValueError(f"the {name} budget times the model, and no model is loaded here")
        if name == "measured":
            return load_or_measure_costs(runner, model_id)
        from aded.progress import status

        with status("Measuring verification cost t(k) for this run"):
            return measure_costs(runner)
    if runner is not None:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {name!r}")
    try:
        return read_cost_file(name)
    except ValueError as exc:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)} or a cost file: {exc}") from None
