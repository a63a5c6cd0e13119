"""Learned drafter state shared by serving replicas: tri-gram counts, merged from deltas, versioned.

What is shared is what the ADED representative learns across requests (`Representative.learned`):
counts of `(a, b) -> c` and `b -> c` over finished outputs. Counts merge by addition, so replicas
need no coordination beyond a store that adds what they send:

    replica                                   store (one named Ray actor)
    record(output) -> outbox (local counts)
    poll(): exchange(outbox, my version) -->  merge(delta); version += 1
            view = snapshot + unsent     <--  (version, snapshot) if newer than mine

The view the drafters read is rebuilt off to the side and swapped in by one assignment, so a
proposal never sees half a snapshot. Calls are asynchronous (a Ray call returns at once; `poll`
only collects finished ones), and any transport failure keeps the delta queued and the local view
in use: a dead store slows learning down, never drafting. Everything is bounded (`max_contexts`,
`max_successors`, decay at every merge) and the store saves and restores itself in the datastore
file format. The core (`CountTable`, `SharedStateCore`, `SharedStateClient`) has no Ray in it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from aded.store.datastore import DatastoreError, read_arrays, write_arrays

__all__ = ["CountTable", "InlineTransport", "RayTransport", "SharedStateClient", "SharedStateCore", "TransportError"]

Counts = dict[int, float]


class TransportError(RuntimeError):
    """The shared store could not be reached or answered with an error."""


@dataclass(frozen=True)
class Bounds:
    max_contexts: int = 200_000  # two-token contexts kept (smallest totals go first)
    max_successors: int = 8  # successors kept per context
    min_count: float = 0.05  # entries below this are dropped at compaction

    def __post_init__(self) -> None:
        if self.max_contexts < 1 or self.max_successors < 1:
            raise ValueError(f"max_contexts and max_successors must be >= 1, got {self.max_contexts}, {self.max_successors}")


class CountTable:
    """Tri-gram and bigram counts in the layout `Representative.learned` uses (scale 1)."""

    def __init__(self, bounds: Bounds = Bounds()) -> None:
        self.bounds = bounds
        self.tri: dict[tuple[int, int], Counts] = {}
        self.bi: dict[int, Counts] = {}

    def __len__(self) -> int:
        return len(self.tri)

    @property
    def num_entries(self) -> int:
        return sum(map(len, self.tri.values())) + sum(map(len, self.bi.values()))

    def add_sequence(self, token_ids: Sequence[int], weight: float = 1.0) -> None:
        """Count the sequence's tri-grams and bigrams (what `Representative.end` folds in)."""
        tokens = [int(t) for t in token_ids]
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            _bump(self.tri, (a, b), c, weight)
        for b, c in itertools.pairwise(tokens):
            _bump(self.bi, b, c, weight)
        self._cap_if_overfull()

    def merge(self, other: CountTable, scale: float = 1.0) -> None:
        """Add `other`'s counts (times `scale`) to these, then enforce the bounds if overfull."""
        for context, followers in other.tri.items():
            for c, w in followers.items():
                _bump(self.tri, context, c, w * scale)
        for b, followers in other.bi.items():
            for c, w in followers.items():
                _bump(self.bi, b, c, w * scale)
        self._cap_if_overfull()

    def decay(self, factor: float) -> None:
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"decay factor must lie in (0, 1], got {factor}")
        if factor < 1.0:
            for table in (self.tri, self.bi):
                for followers in table.values():
                    for c in followers:
                        followers[c] *= factor
            self.compact()

    def compact(self) -> None:
        """Drop small entries, keep the top successors and the contexts of largest total (deterministic)."""
        self.tri = _compacted(self.tri, self.bounds)
        self.bi = _compacted(self.bi, self.bounds)

    def _cap_if_overfull(self) -> None:
        # slack of 25%: compaction is O(table), so it runs once per quarter of growth, not per call
        if len(self.tri) > 1.25 * self.bounds.max_contexts or len(self.bi) > 1.25 * self.bounds.max_contexts:
            self.compact()

    def copy(self) -> CountTable:
        table = CountTable(self.bounds)
        table.merge(self)
        return table

    # ------------------------------------------------------------------ plain arrays (transport, files)
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Keys [n, 3] / [m, 2] int64 and counts float64: `Representative.export_learned`'s layout."""
        tri = [(a, b, c, w) for (a, b), f in self.tri.items() for c, w in f.items()]
        bi = [(b, c, w) for b, f in self.bi.items() for c, w in f.items()]
        tri_array = np.asarray(tri, dtype=np.float64).reshape(-1, 4)
        bi_array = np.asarray(bi, dtype=np.float64).reshape(-1, 3)
        return {
            "learned_tri_keys": tri_array[:, :3].astype(np.int64), "learned_tri_counts": tri_array[:, 3].copy(),
            "learned_bi_keys": bi_array[:, :2].astype(np.int64), "learned_bi_counts": bi_array[:, 2].copy(),
        }  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], bounds: Bounds = Bounds()) -> CountTable:
        table = cls(bounds)
        for (a, b, c), w in zip(np.asarray(arrays["learned_tri_keys"]).tolist(), np.asarray(arrays["learned_tri_counts"]).tolist()):
            _bump(table.tri, (a, b), c, w)
        for (b, c), w in zip(np.asarray(arrays["learned_bi_keys"]).tolist(), np.asarray(arrays["learned_bi_counts"]).tolist()):
            _bump(table.bi, b, c, w)
        table._cap_if_overfull()
        return table


class SharedStateCore:
    """The store: merges deltas, counts versions, serves snapshots, saves and restores itself.

    `decay` shrinks the global counts at every merged delta so old habits fade; snapshots are built
    once per version and reused for every replica that asks.
    """

    def __init__(self, max_contexts: int = 200_000, max_successors: int = 8, decay: float = 1.0, path: str | None = None) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.table = CountTable(Bounds(max_contexts, max_successors))
        self.decay = decay
        self.version = 0
        self.path = path
        self._snapshot: tuple[int, dict[str, np.ndarray]] | None = None
        if path is not None and Path(path).exists():
            self.restore(path)

    def exchange(self, delta: dict[str, np.ndarray] | None, since_version: int) -> tuple[int, dict[str, np.ndarray] | None]:
        """Merge a replica's delta, then answer (version, snapshot or None when `since_version` is current)."""
        if delta is not None and len(delta.get("learned_bi_keys", ())):
            self.table.decay(self.decay)
            self.table.merge(CountTable.from_arrays(delta, self.table.bounds))
            self.version += 1
        if since_version == self.version:
            return self.version, None
        return self.version, self.snapshot()

    def snapshot(self) -> dict[str, np.ndarray]:
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, self.table.to_arrays())
        return self._snapshot[1]

    def stats(self) -> dict[str, int]:
        return {"version": self.version, "contexts": len(self.table), "entries": self.table.num_entries}

    def save(self, path: str | None = None) -> str:
        """Write the counts atomically (datastore file format, kind aded-shared-state)."""
        target = path or self.path
        if target is None:
            raise ValueError("no path to save the shared state to")
        meta = {"kind": "aded-shared-state", "version": self.version}
        write_arrays(target, self.table.to_arrays(), meta)
        return str(target)

    def restore(self, path: str) -> None:
        meta, arrays = read_arrays(path)
        if meta.get("kind") != "aded-shared-state":
            raise DatastoreError(f"{path}: holds {meta.get('kind')!r}, not aded shared state")
        self.table = CountTable.from_arrays(arrays, self.table.bounds)
        self.version = int(meta.get("version", 0)) + 1  # a restored store is newer than any replica's view
        self._snapshot = None


class Transport(Protocol):
    """How a client reaches the store: `submit` starts an exchange, `result` collects it."""

    def submit(self, delta: dict[str, np.ndarray] | None, since_version: int) -> object: ...

    def result(self, handle: object) -> tuple[int, dict[str, np.ndarray] | None] | None:
        """The exchange's answer, None while it is running; raises TransportError if it failed."""


class InlineTransport:
    """A store in the same process (tests, single replica): exchanges finish at once."""

    def __init__(self, core: SharedStateCore) -> None:
        self.core = core
        self.reachable = True  # tests flip this to play a dead store

    def submit(self, delta: dict[str, np.ndarray] | None, since_version: int) -> object:
        if not self.reachable:
            raise TransportError("inline store marked unreachable")
        return self.core.exchange(delta, since_version)

    def result(self, handle: object) -> tuple[int, dict[str, np.ndarray] | None] | None:
        return handle  # type: ignore[return-value]


class SharedStateClient:
    """A replica's side: local counts for drafting now, deltas to the store in the background.

    `view` is the table drafters read: the last snapshot plus what this replica recorded since.
    `poll()` is cheap and never blocks; call it before drafting. It returns True when a new view
    was swapped in (so holders of the old one can re-point to it).
    """

    def __init__(self, transport: Transport | None, bounds: Bounds = Bounds(), interval_s: float = 2.0,
                 clock=time.monotonic) -> None:  # fmt: skip
        self.transport = transport
        self.bounds = bounds
        self.interval_s = interval_s
        self.clock = clock
        self.view = CountTable(bounds)
        self.version = 0
        self.failures = 0
        self._outbox = CountTable(bounds)  # recorded, not sent yet
        self._inflight: tuple[object, CountTable] | None = None
        self._next_try = 0.0

    def record(self, token_ids: Iterable[int]) -> None:
        """A finished output: learn it locally at once, queue it for the store."""
        tokens = list(token_ids)
        self.view.add_sequence(tokens)
        self._outbox.add_sequence(tokens)

    def poll(self) -> bool:
        if self.transport is None:
            return False
        swapped = self._collect()
        if self._inflight is None and self.clock() >= self._next_try:
            self._send()
            swapped = self._collect() or swapped  # an inline store has answered already
        return swapped

    def _collect(self) -> bool:
        """Take a finished exchange's answer; True when a newer snapshot became the view."""
        if self._inflight is None:
            return False
        handle, sent = self._inflight
        try:
            answer = self.transport.result(handle)
        except TransportError:
            self._fail(sent)
            return False
        if answer is None:
            return False
        self._inflight, self.failures = None, 0
        version, snapshot = answer
        if snapshot is None or version == self.version:
            return False
        view = CountTable.from_arrays(snapshot, self.bounds)
        view.merge(self._outbox)  # recorded while the exchange ran: not in the snapshot yet
        self.view, self.version = view, version  # one assignment: readers see old or new, never half
        return True

    def _send(self) -> None:
        self._next_try = self.clock() + self.interval_s
        sent, self._outbox = self._outbox, CountTable(self.bounds)
        try:
            handle = self.transport.submit(sent.to_arrays() if len(sent.bi) else None, self.version)
        except TransportError:
            self._fail(sent)
            return
        self._inflight = (handle, sent)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send what is queued and wait for the answer (shutdown, tests); False if it did not arrive."""
        self._next_try = 0.0
        deadline = time.monotonic() + timeout_s
        self.poll()
        while self._inflight is not None and time.monotonic() < deadline:
            time.sleep(0.01)
            self.poll()
        return self._inflight is None and self.failures == 0

    def _fail(self, sent: CountTable) -> None:
        """Keep the unsent counts (bounded) and back off; drafting goes on with the local view."""
        self._inflight = None
        self.failures += 1
        sent.merge(self._outbox)
        self._outbox = sent
        self._outbox._cap_if_overfull()
        self._next_try = self.clock() + min(self.interval_s * 2 ** min(self.failures, 6), 300.0)


class RayTransport:
    """The store as a named, detached Ray actor, created by the first replica that asks.

    Ray's own object transport carries the arrays. Import errors and every Ray failure (actor dead,
    cluster gone) become `TransportError`, so the client falls back to its local view.
    """

    def __init__(self, name: str = "aded-shared-state", namespace: str = "aded", **core_options) -> None:
        import ray

        self._ray = ray
        try:
            if not ray.is_initialized():
                ray.init(address="auto", namespace=namespace, ignore_reinit_error=True, log_to_driver=False)
            actor_class = ray.remote(num_cpus=0, max_restarts=-1)(SharedStateCore)
            self.actor = actor_class.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached").remote(**core_options)
        except (ray.exceptions.RayError, ConnectionError, ValueError) as error:
            raise TransportError(f"cannot reach the Ray shared state {name!r}: {error}") from error

    def submit(self, delta: dict[str, np.ndarray] | None, since_version: int) -> object:
        try:
            return self.actor.exchange.remote(delta, since_version)
        except self._ray.exceptions.RayError as error:
            raise TransportError(str(error)) from error

    def result(self, handle: object) -> tuple[int, dict[str, np.ndarray] | None] | None:
        ray = self._ray
        try:
            ready, _ = ray.wait([handle], timeout=0)
            return ray.get(ready[0]) if ready else None
        except ray.exceptions.RayError as error:
            raise TransportError(str(error)) from error


def _bump(table: dict, context, token: int, weight: float) -> None:
    followers = table.get(context)
    if followers is None:
        followers = table[context] = {}
    followers[token] = followers.get(token, 0.0) + weight


def _compacted(table: dict, bounds: Bounds) -> dict:
    kept = []
    for context, followers in table.items():
        top = sorted(((w, c) for c, w in followers.items() if w >= bounds.min_count), key=lambda x: (-x[0], x[1]))
        if top:
            top = top[: bounds.max_successors]
            kept.append((sum(w for w, _ in top), context, {c: w for w, c in top}))
    if len(kept) > bounds.max_contexts:
        kept.sort(key=lambda x: (-x[0], x[1]))
        kept = kept[: bounds.max_contexts]
    return {context: followers for _, context, followers in kept}
