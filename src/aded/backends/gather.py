"""Several requests at once on one llama.cpp context: their steps share `llama_decode` calls.

    runner = LlamaCppRunner(path, slots=4)         # four sequences, each with its own prompt cache
    gather = Gather(runner)                        # starts one worker thread
    # in each request's own thread (one thread per concurrent request):
    with gather.session(prompt_ids, owner=api_key) as view:     # waits for a free slot
        decoder = SpeculativeDecoder(view, drafter, eos_ids, budget)  # this request's own drafter
        for ids in decoder.stream(prompt_ids, config):                # and budget: not shared
            send(ids)
    # from any thread, e.g. when the client went away:
    view.cancel()        # its prefill or step raises `GatherCancelled` within one chunk
    gather.close()       # at shutdown

A session (`GatherSession`) is a `Runner` (backends/base.py) bound to one slot, so the decoding loop
(`SpeculativeDecoder`, `_decode`) runs unchanged in each request's thread. Its `verify` and each
chunk of its `prefill` hand rows to the gatherer and block; the gatherer's worker thread runs one
`llama_decode` with the rows of every request that has handed some in (`LlamaCppRunner.decode_parts`:
each request's rows under its own sequence id) and gives each its logits. Why this stays exact: each
slot's cells live in their own KV stream (llama.cpp's non-unified cache), so a request's rows attend
over the same cells at the same offsets as when it runs alone, and batch rows are computed row by
row; `LlamaCppRunner`'s module doc has the measurement. Every output is therefore each request's
solo output, token for token, whatever ran beside it.

When a decode runs. As soon as every request that is between steps has handed in its rows; a
request that is busy elsewhere (drafting, its client reading) is waited for only about twice its
usual time between steps, and at most `max_wait_s` (5 ms by default, a fraction of one decode), so
one slow request never stalls the others for long; one that finished its generation and has not
released its slot is not waited for at all.

What one decode carries. Every waiting verification first (oldest first), then a chunk of prompt
rows (`n_batch` rows in all at most), the shortest remaining prompt first: a long prompt is computed
a chunk at a time with the other requests' steps in the same decodes, and a short prompt that
arrives behind it goes into the next decode whole, as llama-server fills its batch. A chunk is as
many rows as take about `chunk_s` (0.25 s) at the rate the worker measures, between 32 and `n_batch`
rows (or a fixed `prefill_rows`): a request that arrives behind a long prompt waits for at most
one chunk and then runs its prompt in the next decode, so its time to first token is about
`2 * chunk_s` plus its own prompt's time, whatever the long prompt's length and however busy the
machine (a fixed row count would take seconds on a loaded 2-core CPU); requests that are decoding
meanwhile get a step every `chunk_s` or so. Smaller chunks cost a lone long prompt a little speed
(each decode reads the weights once more). A cancelled or closed request's prompt stops at the next
chunk. Where the runner measured that only short batches are bit-exact (`max_tree_nodes` not None:
weights repacked for the CPU, K-quants' tiled matmul) a decode carries at most `max_tree_nodes + 1`
verification rows, and a prompt chunk of `n_batch` rows runs alone, as in solo decoding, taking
turns with the steps.

Slots. A session takes the free slot whose cached tokens share the longest prefix with its prompt;
failing that, a slot that caches nothing (so other clients' cached prompts live on, as
llama-server's least recently used slot), then the lowest slot (which keeps the busy sequence ids
consecutive: llama.cpp runs rows of consecutive sequences in one micro-batch). `owner` keeps one
client's cached prompt from another's: a slot last used by another owner forgets its cache before a
new owner's prompt runs in it, so neither its speed nor `cached_prompt_tokens` tells anything about
another client's prompts.

Budgets. Each request may keep its own budget over the solo cost curve (`new_budget(costs)`), as
a one-slot runner's requests do; outputs are the same whatever the budget. `gather.budget(costs)`
prices a step as gathered decoding pays for it (`GatheredBudget`): with n requests sharing decodes,
one more row of this request costs what it costs alone, while the step itself costs a 1/n share, so
a drafted node must be about n times surer to be worth its row. It learns acceptance as the solo
budget does but no timings (a gathered step's time is everyone's rows; the solo budget, learning
from them, finds nodes cheaper than they are). On a 2-core CPU, where a batch row costs ~45% of a
one-row decode, it verifies next to no drafts while 3-4 requests share decodes, and drafts as the
solo budget does when a request is alone (benchmarks/results/llama-smollm2-concurrency).

Threads. One per concurrent request (the decoding loop is synchronous) plus the worker. Each request
needs its own drafter and budget (or thread-safe ones: a learning drafter's `spawn()` gives a
sibling that shares what it learns); the runner is touched only under the gatherer's lock.
`llama_decode` releases the GIL, so a request left out of a decode drafts while it runs; on a CPU
whose cores all run llama.cpp's threads that drafting also slows the decode, one more reason the
worker waits for the requests between steps rather than running without them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aded.backends.base import Prefill
from aded.backends.llama_cpp import BatchPart, LlamaCppRunner, LlamaSequence
from aded.budget import Budget, BudgetConfig, CostAwareBudget, CostModel, StepOutcome, VerifyAll
from aded.tree import DraftTree

__all__ = ["Gather", "GatherSession", "GatherCancelled", "GatherStats", "GatheredBudget",
           "DEFAULT_MAX_WAIT_S", "DEFAULT_CHUNK_S"]

#: the longest a decode waits for a request that is between steps (seconds)
DEFAULT_MAX_WAIT_S = 0.005
#: the shortest wait for such a request, whatever its history
MIN_WAIT_S = 0.0005
#: about how long a decode that carries a chunk of a prompt takes (seconds)
DEFAULT_CHUNK_S = 0.25
#: the fewest prompt rows a chunk carries, and the chunk before the rate is known
MIN_CHUNK_ROWS, FIRST_CHUNK_ROWS = 32, 128


class GatherCancelled(RuntimeError):
    """The request was cancelled (or its session closed) before its prompt or step ran."""


@dataclass
class GatherStats:
    """What the worker did: decodes, the rows and requests they carried."""

    decodes: int = 0
    rows: int = 0
    parts: int = 0  # request pieces summed over decodes (parts / decodes: requests per decode)
    verify_parts: int = 0
    prefill_rows: int = 0
    busy_s: float = 0.0  # seconds inside llama_decode

    def as_dict(self) -> dict[str, Any]:
        return {"decodes": self.decodes, "rows": self.rows, "parts": self.parts,
                "verify_parts": self.verify_parts, "prefill_rows": self.prefill_rows,
                "busy_s": round(self.busy_s, 4),
                "parts_per_decode": round(self.parts / self.decodes, 3) if self.decodes else 0.0}


@dataclass(eq=False)
class _Job:
    """Rows one request waits on: a verification (one part) or what is left of a prompt."""

    session: GatherSession
    seq: LlamaSequence
    part: BatchPart | None = None  # a verification
    prompt: list[int] = field(default_factory=list)  # a prefill: the ids still to compute
    done_rows: int = 0
    submitted: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None

    @property
    def is_prefill(self) -> bool:
        return self.part is None

    @property
    def rows_left(self) -> int:
        return len(self.part.tokens) if self.part is not None else len(self.prompt) - self.done_rows

    def finish(self, result: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.finished.set()


class Gather:
    """Concurrent requests' decoding steps in shared `llama_decode` calls (see the module's doc)."""

    def __init__(self, runner: LlamaCppRunner, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 chunk_s: float = DEFAULT_CHUNK_S, prefill_rows: int | None = None,
                 clock=time.perf_counter) -> None:
        """`max_wait_s`: the longest a decode waits for a request between steps; `chunk_s`: about
        how long a decode carrying a prompt chunk takes; `prefill_rows`: a fixed number of prompt
        rows a decode carries instead (at most n_batch)."""
        self.runner = runner
        self.slots = runner.slots
        self.max_wait_s = float(max_wait_s)
        self.chunk_s = float(chunk_s)
        #: a fixed chunk of prompt rows, or None: sized to `chunk_s` at the measured rate
        self.prefill_rows = None if prefill_rows is None else max(1, min(runner.n_batch, int(prefill_rows)))
        self._rows_per_s: float | None = None  # measured on decodes that carry a prompt chunk
        #: requests per decode lately (a decayed mean): how many share a step's fixed cost
        self.sharing = 1.0
        self.clock = clock
        #: the most rows a decode may carry whose rows equal one-token decoding (None: any)
        self.exact_rows = None if runner.max_tree_nodes is None else runner.max_tree_nodes + 1
        self.stats = GatherStats()
        self._cond = threading.Condition()
        self._ctx_lock = threading.Lock()  # the llama.cpp context: one caller at a time
        self._holders: list[GatherSession | None] = [None] * self.slots
        self._owners: list[Hashable | None] = [None] * self.slots
        self._jobs: list[_Job] = []  # handed in, waiting for a decode
        self._in_flight: list[_Job] = []  # in the decode that runs now
        self._prefill_turn = False  # exact-limited runners: prompts and steps take turns
        self._closed = False
        self._broken: BaseException | None = None  # what stopped the worker, if anything did
        self._worker = threading.Thread(target=self._run, name="aded-gather", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ slots
    def session(self, prompt_ids: Sequence[int] = (), owner: Hashable | None = None,
                timeout: float | None = None) -> GatherSession:
        """A runner view bound to a free slot (waits up to `timeout` seconds for one; None: no
        limit; TimeoutError after). Release it with `close()` or a `with` block. `prompt_ids`
        (optional) picks the slot holding the longest prefix of the prompt among those `owner`
        used last (see the module's doc)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise GatherCancelled("the gatherer is closed")
                free = [s for s in range(self.slots) if self._holders[s] is None]
                if free:
                    break
                left = None if deadline is None else deadline - self.clock()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no free slot of {self.slots} within {timeout} s")
                self._cond.wait(left)
            ids = list(prompt_ids)

            def shared(s: int) -> int:
                return self.runner.cached_prefix(ids, s) if self._owners[s] == owner else 0

            # the longest shared prefix; else a slot that caches nothing (another client's cached
            # prompt lives on); else the lowest (the busy sequence ids stay consecutive)
            slot = max(free, key=lambda s: (shared(s), self.runner.cached_length(s) == 0, -s))
            if self._owners[slot] != owner:  # another client's cached prompt is not this one's
                self.runner.forget((), slot)
            self._owners[slot] = owner
            view = GatherSession(self, slot, owner)
            self._holders[slot] = view
            return view

    def budget(self, cost: CostModel | None, config: BudgetConfig = BudgetConfig()) -> Budget:
        """A request's budget over the solo cost curve `cost`, priced as gathered decoding pays
        (`GatheredBudget`); None: verify every proposed node."""
        return VerifyAll() if cost is None else GatheredBudget(self, cost, config)

    @property
    def free_slots(self) -> int:
        with self._cond:
            return sum(h is None for h in self._holders)

    @property
    def active_sessions(self) -> int:
        return self.slots - self.free_slots

    def close(self) -> None:
        """Stop the worker; waiting and later requests raise `GatherCancelled`."""
        with self._cond:
            self._closed = True
            for view in self._holders:
                if view is not None:
                    view._cancelled = True
            self._cond.notify_all()
        self._worker.join()

    def __enter__(self) -> Gather:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ what sessions call
    def _submit(self, job: _Job) -> torch.Tensor:
        view = job.session
        with self._cond:
            if self._closed:
                raise GatherCancelled("the gatherer is closed" + (f" ({self._broken!r})" if self._broken else ""))
            if view._cancelled:
                raise GatherCancelled(f"the request in slot {view.slot} was cancelled")
            now = self.clock()
            job.submitted = now
            if view._delivered_at is not None and not job.is_prefill:  # away between two steps
                away = now - view._delivered_at
                view._away_s = away if view._away_s is None else 0.7 * view._away_s + 0.3 * away
            view._waiting = True
            self._jobs.append(job)
            self._cond.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _release(self, view: GatherSession) -> None:
        with self._cond:
            view._cancelled = True
            while True:
                for job in [j for j in self._jobs if j.session is view]:
                    self._jobs.remove(job)
                    job.finish(error=GatherCancelled(f"the request in slot {view.slot} was closed"))
                self._cond.notify_all()
                if not any(j.session is view for j in self._in_flight):
                    break
                self._cond.wait()  # its rows are being decoded (a prompt's rest may come back)
        with self._ctx_lock:  # after this, nothing of this view touches the slot
            view._closed = True
        with self._cond:
            if self._holders[view.slot] is view:
                self._holders[view.slot] = None
            self._cond.notify_all()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            with self._cond:
                self._closed = True
                self._broken = exc
                for job in [*self._jobs, *self._in_flight]:
                    job.finish(error=GatherCancelled(f"the gatherer stopped: {exc!r}"))
                self._jobs.clear()
                self._in_flight = []
                self._cond.notify_all()
            raise

    def _serve(self) -> None:
        while True:
            with self._cond:
                picked = self._next_decode()
                if picked is None:
                    return
                self._in_flight = [job for job, _ in picked]
            parts = [part for _, part in picked]
            error: BaseException | None = None
            results: list[torch.Tensor] = []
            with self._ctx_lock:
                start = self.clock()
                try:
                    results = self.runner.decode_parts(parts)
                except BaseException as exc:  # every request in it learns why
                    error = exc
                busy = self.clock() - start
            with self._cond:
                now = self.clock()
                self.stats.decodes += 1
                self.stats.busy_s += busy
                self.stats.parts += len(parts)
                self.stats.rows += sum(len(p.tokens) for p in parts)
                self.sharing = 0.8 * self.sharing + 0.2 * len(parts)
                prompt_rows = sum(len(p.tokens) for p in parts if p.prefill)
                if error is None and prompt_rows >= MIN_CHUNK_ROWS and busy > 0:
                    rate = sum(len(p.tokens) for p in parts) / busy
                    self._rows_per_s = rate if self._rows_per_s is None else 0.7 * self._rows_per_s + 0.3 * rate
                for i, (job, part) in enumerate(picked):
                    if error is not None:
                        job.finish(error=error)
                    elif job.is_prefill:
                        self.stats.prefill_rows += len(part.tokens)
                        job.done_rows += len(part.tokens)
                        if job.rows_left == 0:
                            job.finish(results[i][0])
                        else:
                            self._jobs.append(job)  # the rest of the prompt, in later decodes
                            continue
                    else:
                        self.stats.verify_parts += 1
                        job.finish(results[i])
                    job.session._waiting = False
                    job.session._delivered_at = now
                self._in_flight = []
                self._cond.notify_all()

    def _next_decode(self) -> list[tuple[_Job, BatchPart]] | None:
        """Wait until a decode should run (called holding the condition); its jobs and parts."""
        while True:
            if self._closed:
                for job in self._jobs:
                    job.finish(error=GatherCancelled("the gatherer is closed"))
                self._jobs.clear()
                return None
            for job in [j for j in self._jobs if j.session._cancelled]:
                self._jobs.remove(job)
                job.session._waiting = False
                job.finish(error=GatherCancelled(f"the request in slot {job.session.slot} was cancelled"))
            if not self._jobs:
                self._cond.wait()
                continue
            wait = self._patience_left()
            if wait > 0:
                self._cond.wait(wait)
                continue
            return self._pick()

    def _patience_left(self) -> float:
        """Seconds worth waiting for requests between steps that have not handed in rows yet."""
        now = self.clock()
        left = 0.0
        rows = sum(j.rows_left for j in self._jobs if not j.is_prefill)
        if self.exact_rows is not None and rows >= self.exact_rows:
            return 0.0  # the decode is full already
        for view in self._holders:
            if view is None or view._waiting or view._cancelled or view._delivered_at is None:
                continue
            usual = view._away_s if view._away_s is not None else self.max_wait_s
            patience = min(self.max_wait_s, max(MIN_WAIT_S, 2.0 * usual))
            left = max(left, view._delivered_at + patience - now)
        return left

    def _pick(self) -> list[tuple[_Job, BatchPart]]:
        """The jobs of the next decode, and the part of each it runs (see the module's doc)."""
        runner = self.runner
        cap = runner.n_batch
        verifies = sorted((j for j in self._jobs if not j.is_prefill), key=lambda j: j.submitted)
        prompts = [j for j in self._jobs if j.is_prefill]
        picked: list[tuple[_Job, BatchPart]] = []
        rows = 0
        if self.exact_rows is not None and prompts and (self._prefill_turn or not verifies):
            job = min(prompts, key=lambda j: j.submitted)  # a chunk alone, as solo prefill runs it
            picked.append((job, self._prompt_piece(job, cap)))
            self._prefill_turn = False
        else:
            limit = cap if self.exact_rows is None else min(cap, self.exact_rows)
            for job in verifies:
                if rows + job.rows_left <= limit:
                    assert job.part is not None
                    picked.append((job, job.part))
                    rows += job.rows_left
            if self.exact_rows is None:
                room = min(cap - rows, self.chunk_rows)
                for job in sorted(prompts, key=lambda j: j.rows_left):
                    if room <= 0:
                        break
                    piece = self._prompt_piece(job, room)
                    picked.append((job, piece))
                    room -= len(piece.tokens)
            self._prefill_turn = True
        for job, _ in picked:
            self._jobs.remove(job)
        return picked

    @property
    def chunk_rows(self) -> int:
        """Prompt rows the next decode may carry (see the module's doc)."""
        cap = self.runner.n_batch
        if self.prefill_rows is not None:
            return self.prefill_rows
        if self._rows_per_s is None:
            return min(cap, FIRST_CHUNK_ROWS)
        return max(min(cap, MIN_CHUNK_ROWS), min(cap, int(self.chunk_s * self._rows_per_s)))

    def _prompt_piece(self, job: _Job, rows: int) -> BatchPart:
        start = job.done_rows
        chunk = job.prompt[start : start + rows]
        last = start + len(chunk) == len(job.prompt)
        return self.runner.prefill_part(job.seq, chunk, last, len(job.prompt))


class GatherSession:
    """A `Runner` bound to one slot of a gatherer's runner, for one request's thread at a time.

    Its prefill and verify wait for a shared decode; `cancel()` (any thread) makes the waiting or
    next one raise `GatherCancelled`; `close()` (or leaving a `with` block) releases the slot, after
    which the view touches nothing. It may serve several requests in turn (a conversation), each
    keeping the prefix the slot holds, as a one-slot runner does."""

    backend = "llama.cpp"

    def __init__(self, gather: Gather, slot: int, owner: Hashable | None = None) -> None:
        runner = gather.runner
        self._gather = gather
        self._runner = runner
        self.slot = slot
        self.owner = owner
        self.vocab_size = runner.vocab_size
        self.max_positions = runner.max_positions
        self.max_tree_leaves = runner.max_tree_leaves
        self.max_tree_nodes = runner.max_tree_nodes
        self.eos_token_ids = runner.eos_token_ids
        self._cancelled = False
        self._closed = False
        # the gatherer's view of this request's rhythm (read and written under its condition)
        self._waiting = False
        self._delivered_at: float | None = None
        self._away_s: float | None = None

    # ------------------------------------------------------------------ the request's own controls
    def cancel(self) -> None:
        """Stop this request: its waiting or next prefill chunk or step raises `GatherCancelled`.
        Safe from any thread; the slot stays held until `close()`."""
        with self._gather._cond:
            self._cancelled = True
            self._gather._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def close(self) -> None:
        """Release the slot (idempotent). A prefill or step in progress ends with `GatherCancelled`;
        the slot keeps the cells of what was computed and committed, for a later prompt's prefix."""
        if not self._closed:
            self._gather._release(self)

    def __enter__(self) -> GatherSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self) -> None:
        if self._cancelled or self._closed:
            raise GatherCancelled(f"the request in slot {self.slot} was cancelled")

    # ------------------------------------------------------------------ the Runner protocol
    def new_sequence(self, capacity: int) -> LlamaSequence:
        return self._runner.new_sequence(capacity, self.slot)

    def prefill(self, seq: LlamaSequence, input_ids: Sequence[int]) -> Prefill:
        self._check_seq(seq)
        with self._gather._ctx_lock:
            self._check()
            ids, reused = self._runner.start_prefill(seq, input_ids)
        logits = self._gather._submit(_Job(self, seq, prompt=ids))
        return Prefill(logits, reused)

    def verify(self, seq: LlamaSequence, root_id: int, tree: DraftTree) -> torch.Tensor:
        self._check_seq(seq)
        self._check()
        if tree.is_chain:  # laid out without touching the context
            part = self._runner.verify_part(seq, root_id, tree)
        else:
            with self._gather._ctx_lock:  # a tree's layout copies cells (one-slot runners only)
                part = self._runner.verify_part(seq, root_id, tree)
        return self._gather._submit(_Job(self, seq, part=part))

    def commit(self, seq: LlamaSequence, accepted_nodes: Sequence[int]) -> None:
        self._check_seq(seq)
        with self._gather._ctx_lock:
            if not self._closed:
                self._runner.commit(seq, accepted_nodes)

    def rewind(self, seq: LlamaSequence, length: int) -> None:
        self._check_seq(seq)
        with self._gather._ctx_lock:
            if not self._closed:
                self._runner.rewind(seq, length)

    def forget(self, keep: Sequence[int] = ()) -> None:
        with self._gather._ctx_lock:
            if not self._closed:
                self._runner.forget(keep, self.slot)

    def cost_identity(self) -> str:
        return self._runner.cost_identity()  # each request prices its steps on the solo t(k)

    def describe(self) -> dict[str, Any]:
        return {**self._runner.describe(), "slot": self.slot}

    def _check_seq(self, seq: LlamaSequence) -> None:
        if seq.slot != self.slot:
            raise ValueError(f"a sequence of slot {seq.slot} used through the view of slot {self.slot}")


class GatheredBudget(CostAwareBudget):
    """The cost-aware budget of a request whose steps share decodes (see "Budgets" above).

    Over the solo curve t(k), a step of k nodes costs this request t(0) / n + t(k) - t(0), n being
    how many requests the gatherer's decodes carried lately: the fixed part of a decode is shared,
    its rows are not (on a CPU a row is most of a one-row decode: ggml computes rows one by one, and
    a chain longer than the others' runs as one more micro-batch of llama.cpp's non-unified cache).
    Alone (n = 1) it is the solo curve. Acceptance is learned as the solo budget learns it; timings
    and the drafting gain are not (a gathered step's time is every request's rows)."""

    def __init__(self, gather: Gather, cost: CostModel, config: BudgetConfig = BudgetConfig()) -> None:
        super().__init__(cost, config)
        self._gather = gather

    def step_costs(self, max_k: int) -> np.ndarray:
        solo = self.cost.upto(max_k)
        n = max(1.0, self._gather.sharing)
        return solo - solo[0] + solo[0] / n

    def step_cost(self, k: int) -> float:
        return float(self.step_costs(k)[k])

    def learn(self, outcome: StepOutcome) -> None:
        self.learn_acceptance(outcome.tree, outcome.accepted_nodes)
