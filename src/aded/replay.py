"""Replay recorded greedy outputs through a drafter, without running the model.

Greedy decoding is deterministic, so what a drafter would gain on a recorded (prompt, output) pair
can be measured offline. Replay runs the engine's own loop (`SpeculativeDecoder`: the budget, tree
trimming, acceptance, the drafter's `begin / propose / observe / end`) with a `RecordedRunner` in
place of the model, whose logits name the recorded token after every context that follows the
recording and nothing elsewhere; so replay and real runs cannot drift apart. The recorded token is
the only model evidence a drafter gets, unless the record carries the model's own top-k along the
output (`recorded_topk`, `aded simulate --model-topk`). For a deterministic drafter whose `wants_topk` is 0, mean
accepted tokens equal those of a real greedy run exactly, provided the replay sees what the engine
did: pass the same cost curve (None for a run with the budget off) and each record's `max_new_tokens`.

With a budget, each step's verification cost t(k) is summed too, so a speedup over plain decoding
can be predicted from the measured cost curve without running the model.

`aded simulate` (`simulate_results`) replays a benchmark's recorded baseline outputs: the baseline's
rows of a results.json carry each turn's prompt and output token ids. Replaying them measures what a drafter would accept on exactly those outputs in seconds. With the
run's cost curve t(k) (stored in results.json), every replayed step goes through the same
cost-aware budget as the real run, and t(k) turns the steps into a predicted speedup over plain
decoding on that machine. Mean accepted tokens then agree closely with the run's; exactly (for
deterministic drafters) when the run used `--budget off`, since a real budget also corrects t(k)
by the step times it observes, which a replay cannot know.
Only the tokenizer is loaded, and only for drafters that need one (to find their datastore).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from aded.backends.base import Prefill
from aded.budget import Budget, CostModel, cost_model, new_budget
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters.base import Drafter
from aded.tree import DraftTree

__all__ = ["Recorded", "ReplayStats", "RecordedRunner", "replay", "replay_one", "recorded_from_results",
           "recorded_topk", "simulate_results", "render_simulation"]


@dataclass(frozen=True)
class Recorded:
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    category: str = "all"
    id: str | int | None = None
    max_new_tokens: int | None = None  # the run's limit (None: the output's length), trims trees
    #: [len(output), K] the model's top-K ids before each output token, best first (row j's first
    #: is output[j]); None: the recording's token is the only model evidence (`recorded_topk`)
    model_topk: Any = None


@dataclass
class ReplayStats:
    steps: int = 0
    tokens: int = 0
    draft_nodes: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # wall time in propose + observe
    verify_cost_s: float = 0.0  # sum of t(k) over steps (only with a budget's cost model)

    @property
    def mean_accepted_tokens(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def nodes_per_step(self) -> float:
        return self.draft_nodes / self.steps if self.steps else 0.0

    @property
    def accepted_per_node(self) -> float:
        accepted = self.tokens - self.steps
        return accepted / self.draft_nodes if self.draft_nodes else 0.0

    def merge(self, other: ReplayStats) -> None:
        self.steps += other.steps
        self.tokens += other.tokens
        self.draft_nodes += other.draft_nodes
        self.accepted_lengths.extend(other.accepted_lengths)
        self.draft_s += other.draft_s
        self.verify_cost_s += other.verify_cost_s

    def predicted_speedup(self, plain_step_s: float) -> float | None:
        """Tokens per second over plain decoding's (one token per `plain_step_s`), drafting included."""
        seconds = self.verify_cost_s + self.draft_s
        return self.tokens * plain_step_s / seconds if seconds > 0 and self.verify_cost_s > 0 else None


def replay_one(drafter: Drafter, record: Recorded, max_nodes: int, costs: CostModel | None = None,
               max_leaves: int | None = None, eos_token_ids: Sequence[int] = (),
               max_tree_nodes: int | None = None, budget: Budget | None = None) -> ReplayStats:
    """Replay one recorded output through the engine's own loop (`SpeculativeDecoder`), with a
    runner that answers from the recording instead of a model; the first output token comes from
    prefill, as in a real run.

    Every step is the engine's: the budget sizes the request and thins drafting while drafts do not
    pay, trees are trimmed to the tokens left, the budget picks the subtree to verify, at most
    `max_leaves` paths wide and `max_tree_nodes` nodes (the recorded runner's limits: one path on
    llama.cpp). The loop's clock sees each verification take the budget's t(k), so the budget
    learns from simulated step times as it would from measured ones. `costs` None verifies every
    proposed node; `budget` (a budget over `costs`) carries what earlier records taught it.
    """
    output = [int(t) for t in record.output_token_ids]
    if not output:
        return ReplayStats()
    eos = frozenset(int(t) for t in eos_token_ids)
    # the run's limit holds only if the output ended itself; otherwise the recording is the limit
    max_new = (record.max_new_tokens or len(output)) if output[-1] in eos else len(output)
    policy = budget if budget is not None else new_budget(costs)
    runner = RecordedRunner(record.prompt_token_ids, output, costs,
                            max_leaves, max_tree_nodes, record.model_topk)
    decoder = SpeculativeDecoder(runner, drafter, eos, policy, clock=runner.clock)
    result = decoder.generate(list(record.prompt_token_ids),
                              GenerationConfig(max_new_tokens=max_new, max_draft_nodes=max_nodes))
    if result.token_ids != output[: len(result.token_ids)]:
        raise AssertionError("replay left the recording: the loop's acceptance disagrees with it")
    stats = result.stats
    return ReplayStats(steps=stats.steps, tokens=sum(stats.accepted_lengths), draft_nodes=stats.draft_nodes,
                       accepted_lengths=list(stats.accepted_lengths), draft_s=stats.draft_s,
                       verify_cost_s=runner.simulated_s)


class RecordedRunner:
    """A runner (backends/base.py) whose model is a recording: after the committed context and a
    tree path that follow the recorded output, the logits say the recorded next token (0 there,
    -inf elsewhere; with `model_topk`, its runners-up too, at -1, -2, ...); after anything else
    they say nothing (all -inf: no evidence, never accepted, since acceptance only walks paths the
    recording follows).

    `cost(k)`, when given, is what a verification of k nodes takes on the loop's `clock`: the real
    time spent here is replaced by it, and summed in `simulated_s`.
    """

    backend = "replay"

    def __init__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], cost: Callable[[int], float] | None,
                 max_tree_leaves: int | None = None, max_tree_nodes: int | None = None,
                 model_topk: Any = None) -> None:
        self.output = [int(t) for t in output_ids]
        self.topk = None
        if model_topk is not None:
            self.topk = torch.from_numpy(np.array(model_topk, dtype=np.int64))  # a copy, any strides
            if self.topk.ndim != 2 or len(self.topk) < len(self.output) or not bool(
                    (self.topk[: len(self.output), 0] == torch.tensor(self.output, dtype=torch.int64)).all()):
                raise ValueError("model_topk must hold a row per output token, led by that token")
        extra = [] if self.topk is None else [int(self.topk.max())]
        self.vocab_size = max([*prompt_ids, *self.output, *extra, 0]) + 1
        self.max_positions = len(prompt_ids) + len(self.output) + 4096
        self.max_tree_leaves = max_tree_leaves
        self.max_tree_nodes = max_tree_nodes
        self.eos_token_ids: tuple[int, ...] = ()
        self.cost = cost
        self.simulated_s = 0.0
        self._offset = 0.0  # simulated minus real seconds spent in verifications
        self._pos = 0  # output tokens committed

    def clock(self) -> float:
        return time.perf_counter() + self._offset

    def new_sequence(self, capacity: int) -> None:
        self._pos = 0

    def prefill(self, seq: Any, input_ids: Sequence[int]) -> Prefill:
        self._pos = 1  # the first output token is the prefill's
        return Prefill(self._logits(1, {0: 0})[0], 0)

    def verify(self, seq: Any, root_id: int, tree: DraftTree) -> torch.Tensor:
        start = time.perf_counter()
        pos, output = self._pos, self.output
        # row -> the output position it predicts: the root's row, and the nodes of the one path
        # that follows the recording (siblings carry distinct tokens)
        path = tree.longest_match(output[pos : pos + len(tree)])
        known = {0: pos, **{node + 1: pos + depth for depth, node in enumerate(path, start=1)}}
        logits = self._logits(1 + len(tree), known)
        if self.cost is not None:
            seconds = self.cost(len(tree))
            self.simulated_s += seconds
            self._offset += seconds - (time.perf_counter() - start)
        return logits

    def commit(self, seq: Any, accepted_nodes: Sequence[int]) -> None:
        self._pos += len(accepted_nodes) + 1  # the accepted path and the bonus token

    def rewind(self, seq: Any, length: int) -> None:
        """Nothing to take back: a recording holds no cells (replay is charged recorded costs,
        so `budget.measure_costs` never times one)."""

    def forget(self, keep: Sequence[int] = ()) -> None:
        pass  # nothing is kept across sequences

    def cost_identity(self) -> str:
        return "replay"

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def _logits(self, num_rows: int, known: dict[int, int]) -> torch.Tensor:
        """[num_rows, vocab]: row r says the output token at position known[r]; the rest nothing."""
        logits = torch.full((num_rows, self.vocab_size), float("-inf"))
        for row, position in known.items():
            if position < len(self.output):
                if self.topk is None:
                    logits[row, self.output[position]] = 0.0
                else:
                    ids = self.topk[position]
                    ids = ids[ids >= 0]
                    logits[row, ids] = -torch.arange(len(ids), dtype=logits.dtype)
        return logits


def recorded_topk(runner, record: Recorded, k: int, chunk: int = 64) -> np.ndarray:
    """[len(output), k] the model's top-k ids before each recorded output token, best first, led by
    the recorded token: what a drafter asking `wants_topk` is told about the recorded path.

    The output is verified as chains through `runner` (a few forwards per record, not one per
    token). Where the runner's top-1 is not the recorded token (another backend's rounding), the
    recorded token leads and the runner's other choices follow."""
    output = [int(t) for t in record.output_token_ids]
    if not output or k < 1:
        return np.zeros((len(output), max(k, 0)), dtype=np.int64)
    if runner.max_tree_nodes is not None:  # 0: a runner that verifies no drafts, one token a step
        chunk = min(chunk, runner.max_tree_nodes)
    seq = runner.new_sequence(len(record.prompt_token_ids) + len(output) + chunk + 2)
    ranks = min(k + 1, runner.vocab_size)
    rows = [runner.prefill(seq, list(record.prompt_token_ids)).logits[None].topk(ranks).indices]
    root = 0
    while root < len(output) - 1:  # as the decoding loop steps: the chain accepted, the next root its bonus
        ids = output[root + 1 : root + 1 + chunk]
        logits = runner.verify(seq, output[root], DraftTree.chain(ids))
        rows.append(logits.topk(ranks).indices)  # row i says what comes at root + 1 + i
        runner.commit(seq, tuple(range(len(ids))))
        root += len(ids) + 1
    ranked = torch.cat(rows).numpy()[: len(output)]
    table = np.full((len(output), k), -1, dtype=np.int64)  # -1: no more ranks (a tiny vocabulary)
    for j, token in enumerate(output):
        others = [t for t in ranked[j] if t != token][: k - 1]
        table[j, : 1 + len(others)] = [token, *others]
    return table


def replay(
    drafter: Drafter, records: Iterable[Recorded], max_nodes: int, costs: CostModel | None = None,
    max_leaves: int | None = None, eos_token_ids: Sequence[int] = (), max_tree_nodes: int | None = None,
    before_each: Callable[[Recorded], None] | None = None,
) -> dict[str, ReplayStats]:
    """Stats per category and for "all", replaying records in order (drafters and the budget's
    calibration learn across records, as in a real run); `before_each` sees each record first."""
    by_category: dict[str, ReplayStats] = defaultdict(ReplayStats)
    overall = ReplayStats()
    budget = new_budget(costs)
    for record in records:
        if before_each is not None:
            before_each(record)
        one = replay_one(drafter, record, max_nodes, costs, max_leaves, eos_token_ids, max_tree_nodes, budget)
        if record.category != "all":
            by_category[record.category].merge(one)
        overall.merge(one)
    return {**by_category, "all": overall}


# ---------------------------------------------------------------------------- recorded benchmark runs
def recorded_from_results(results: dict[str, Any]) -> list[Recorded]:
    """Every recorded turn of the baseline, in run order."""
    from aded.bench.report import baseline_name

    max_new = results.get("config", {}).get("max_new_tokens")
    base = baseline_name(results)
    records = []
    for row in results.get("questions", []):
        if row.get("method") != base:
            continue
        prompts, outputs = row.get("prompt_token_ids"), row.get("output_token_ids")
        if not isinstance(prompts, list) or not isinstance(outputs, list) or len(prompts) != len(outputs):
            raise ValueError(f"the {base} row of question {row.get('id')!r} has no recorded token ids")
        for turn, (prompt, output) in enumerate(zip(prompts, outputs)):
            records.append(Recorded(prompt, output, row["category"], f"{row['id']}#{turn}", max_new))
    if not records:
        raise ValueError(f"the results hold no {base} rows with recorded token ids to replay")
    return records


def _cost_model(results: dict[str, Any], budget: str) -> CostModel | None:
    """The t(k) a replay charges: the run's own ("recorded"), or as `aded.budget.cost_model` names
    it without a model: off, typical or a cost file."""
    if budget != "recorded":
        return cost_model(budget)
    config = results.get("config", {})
    if config.get("budget") == "off":
        return None  # the run verified every proposed node: replay it the same way
    recorded = config.get("cost_model")
    return CostModel.from_dict(recorded) if recorded else CostModel.typical_cpu()


def simulate_results(results: dict[str, Any], drafters: Sequence[str],
                     tokenizer_loader: Callable[[], Any] | None = None, budget: str = "recorded",
                     max_nodes: int | None = None, model_topk: int = 0,
                     runner_loader: Callable[[], Any] | None = None,
                     max_leaves: int | None = -1, repeats: int = 1) -> list[dict[str, Any]]:
    """Summary rows per drafter and category ("all" first), replaying with a fresh drafter each.

    `repeats` > 1 replays each drafter that many times, each with a fresh drafter and budget, and
    reports the means with the range of MAT and speedup (`*_range`). Under a budget, replay charges
    each step the drafter's real drafting time, and the budget's thinning follows it: the same
    replay differs a little from run to run, and a choice between two drafters closer than that
    range is noise.

    `model_topk` > 0: the model (`runner_loader()`) ranks its top tokens along every recorded
    output once, and drafters that ask for them (`wants_topk`) get them on the recorded path, as
    a real run gives them; otherwise the recorded token is their only model evidence.
    `max_leaves`: paths one verification may carry (-1: the recorded runner's; None: any, as
    transformers verifies), to ask what a recording made on one backend would gain on the other.

    `budget`: "recorded" (the run's cost curve, or a typical CPU one if it has none), "typical",
    "off" (every proposed node counts; no speedup prediction), or a file of measured t(k) (see
    `aded.budget.read_cost_file`). `oracle` (the recorded continuation itself, as the benchmark's oracle
    drafts it) is the ceiling any drafter can reach under that budget.
    """
    from aded.drafters import DRAFTERS, drafter_class, make_drafter

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    unknown = [d for d in drafters if d not in DRAFTERS and d != "oracle"]
    if unknown:
        raise ValueError(f"unknown drafter(s) {', '.join(map(repr, unknown))}; choose from: "
                         f"{', '.join([*DRAFTERS, 'oracle'])}")
    records = recorded_from_results(results)
    if model_topk > 0:
        if runner_loader is None:
            raise ValueError("model_topk needs the model: pass runner_loader")
        from aded.progress import status

        runner = runner_loader()
        with status(f"Ranking the model's top {model_topk} along {len(records)} recorded outputs"):
            records = [replace(r, model_topk=recorded_topk(runner, r, model_topk)) for r in records]
    costs = _cost_model(results, budget)
    nodes = max_nodes if max_nodes is not None else results.get("config", {}).get("max_draft_nodes", 24)
    if max_leaves == -1:
        max_leaves = results.get("machine", {}).get("max_tree_leaves")  # the recorded runner's width
    runner_nodes = results.get("machine", {}).get("max_tree_nodes")  # and its exact chain length
    eos = results.get("config", {}).get("eos_token_ids") or ()
    plain = costs(0) if costs is not None else None
    tokenizer = None

    def replay_once(name: str) -> list[dict[str, Any]]:
        """One replay of `name` with a fresh drafter and budget: its rows, "all" first."""
        nonlocal tokenizer
        before_each = None
        drafter: Drafter
        if name == "oracle":
            from aded.drafters.oracle import OracleDrafter

            oracle = OracleDrafter()
            drafter = oracle
            before_each = lambda record, oracle=oracle: oracle.expect(record.output_token_ids)  # noqa: E731
        else:
            if drafter_class(name).needs_tokenizer and tokenizer is None and tokenizer_loader is not None:
                tokenizer = tokenizer_loader()
            drafter = make_drafter(name, tokenizer)
        start = time.perf_counter()
        stats = replay(drafter, records, nodes, costs, max_leaves, eos, runner_nodes, before_each)
        elapsed = time.perf_counter() - start
        return [_row(name, category, stats[category], plain, elapsed if category == "all" else None)
                for category in ["all", *[c for c in stats if c != "all"]]]

    summary: list[dict[str, Any]] = []
    for name in drafters:
        runs = [replay_once(name) for _ in range(repeats)]
        summary.extend(runs[0] if repeats == 1 else [_mean_row(rows) for rows in zip(*runs)])
    return summary


def _row(drafter: str, category: str, stats: ReplayStats, plain_step_s: float | None,
         elapsed: float | None) -> dict[str, Any]:
    speedup = stats.predicted_speedup(plain_step_s) if plain_step_s else None
    row = {
        "drafter": drafter,
        "category": category,
        "mean_accepted_tokens": round(stats.mean_accepted_tokens, 4),
        "nodes_per_step": round(stats.nodes_per_step, 3),
        "accepted_per_node": round(stats.accepted_per_node, 4),
        "steps": stats.steps,
        "tokens": stats.tokens,
        "draft_ms_per_step": round(1000 * stats.draft_s / stats.steps, 3) if stats.steps else None,
        "predicted_speedup": round(speedup, 4) if speedup is not None else None,
    }
    if elapsed is not None:
        row["replay_s"] = round(elapsed, 3)
    return row


def _mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for repeated replays of a drafter and category: means, and the range of MAT and
    predicted speedup."""
    mean = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rows if r[key] is not None]
            mean[key] = round(sum(values) / len(values), 4) if values else None
    for key in ("mean_accepted_tokens", "predicted_speedup"):
        values = [r[key] for r in rows if r[key] is not None]
        mean[f"{key}_range"] = [min(values), max(values)] if values else None
    mean["repeats"] = len(rows)
    return mean


def render_simulation(summary: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `simulate_results` rows."""
    lines = ["| Drafter | Category | MAT | nodes/step | accepted/node | draft ms/step | predicted speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        speedup = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x"
        mat = f"{r['mean_accepted_tokens']:.2f}"
        if r.get("predicted_speedup_range"):
            speedup += " ({:.2f}-{:.2f})".format(*r["predicted_speedup_range"])
        if r.get("mean_accepted_tokens_range"):
            mat += " ({:.2f}-{:.2f})".format(*r["mean_accepted_tokens_range"])
        draft = "-" if r["draft_ms_per_step"] is None else f"{r['draft_ms_per_step']:.2f}"
        lines.append(f"| {r['drafter']} | {r['category']} | {mat} | "
                     f"{r['nodes_per_step']:.1f} | {r['accepted_per_node']:.3f} | {draft} | {speedup} |")
    return "\n".join(lines) + "\n"
