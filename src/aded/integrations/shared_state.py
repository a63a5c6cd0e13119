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
`max_successors`, decay at every merge) and the store saves and restores itself in the learned-state
file format (`aded.drafters.state_file`). The core (`CountTable`, `SharedStateCore`, `SharedStateClient`) has no Ray in it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from aded.drafters.counts import Bounds, CountTable

__all__ = ["CountTable", "InlineTransport", "RayTransport", "SharedStateClient", "SharedStateCore", "TransportError"]


class TransportError(RuntimeError):
    """The shared store could not be reached or answered with an error."""


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
        """Write the counts atomically, in the learned-state file format (kind `shared-counts`)."""
        target = path or self.path
        if target is None:
            raise ValueError("no path to save the shared state to")
        _state_file(target).save(self.table.to_arrays(), meta={"version": self.version})
        return str(target)

    def restore(self, path: str) -> None:
        header, arrays = _state_file(path).read()
        self.table = CountTable.from_arrays(arrays, self.table.bounds)
        # a restored store is newer than any replica's view
        self.version = int(header.get("meta", {}).get("version", 0)) + 1
        self._snapshot = None


def _state_file(path: str):
    from aded.drafters.state_file import StateFile

    return StateFile(path, "shared-counts", None)  # token ids of whatever model the replicas serve


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
        transport = self.transport
        if transport is None:
            return False
        swapped = self._collect(transport)
        if self._inflight is None and self.clock() >= self._next_try:
            self._send(transport)
            swapped = self._collect(transport) or swapped  # an inline store has answered already
        return swapped

    def _collect(self, transport: Transport) -> bool:
        """Take a finished exchange's answer; True when a newer snapshot became the view."""
        if self._inflight is None:
            return False
        handle, sent = self._inflight
        try:
            answer = transport.result(handle)
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

    def _send(self, transport: Transport) -> None:
        self._next_try = self.clock() + self.interval_s
        sent, self._outbox = self._outbox, CountTable(self.bounds)
        try:
            handle = transport.submit(sent.to_arrays() if len(sent.bi) else None, self.version)
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
        self._outbox.compact_if_overfull()
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
