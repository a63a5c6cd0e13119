"""One model, one worker thread, one request at a time.

Why serial: the drafter and the budget policy keep learned state in one object, and the decoding
loop owns one KV cache per request; running requests one after another is the simplest way to
guarantee that every client gets exactly the output it would get alone (greedy decoding is
lossless whatever the drafter has learned, so the order of requests never changes a greedy answer).
The event loop only validates, queues and relays; all model and drafter work happens here.

A request holds one of `max_queue` slots from the moment it is admitted (once its body is in,
before it is parsed, so parsing counts against the queue but a stalled upload does not) until its
job finishes: `admit()` returns a `Ticket`, `submit(request, ticket)` hands the slot to the job,
`ticket.release()` frees a slot that never became a job. `begin_stop` (at SIGTERM) ends the running
job and the queued ones with a 503 at once.

A job runs its request `n` times (its choices, one after another; sampled ones each with a seed
of its own, `choice_seed`). Its events reach its handler through an asyncio queue:
("piece", (choice, text, logprobs)) while streaming (logprobs: those of the ids committed since
the previous piece, or None), ("done", (choice, Completion)) for each choice, or ("error",
exception). The text is the library's, or rebuilt by `OutputText` where the request's output fields
(output.py) ask for another. A handler whose client went away calls `cancel()`; the worker then
closes the stream (the drafter's request ends cleanly) and takes the next job.
Work that must not overlap a request (exporting the drafter's learned state) is queued with `call`
and runs before any queued job, i.e. as soon as the running one ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aded.server.errors import RequestError
from aded.server.output import OutputRules, OutputText

__all__ = ["RequestError", "GenerationRequest", "Job", "Ticket", "Engine", "choice_seed"]

log = logging.getLogger("aded.server")

_CALL, _JOB = 0, 1  # queue priorities: maintenance calls go before queued jobs
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    generation: dict[str, Any]  # keyword arguments of `Aded.stream` (already validated)
    stop: tuple[str, ...] = ()
    stream: bool = False  # relay text pieces as they are accepted
    tenant: str | None = None  # whose learned state drafts it (None: the shared one)
    #: whose kept prompt cells it may start from (None: anyone's, on a server without keys or tenants)
    cache_owner: str | None = None
    client: str | None = None  # who sent it (an API key's hash; None without keys), for its metrics
    n: int = 1  # choices: generations of the same request
    output: OutputRules = field(default_factory=OutputRules)

    def choice(self, index: int) -> dict[str, Any]:
        """`Aded.stream` keywords of choice `index` (its own seed when sampled; ids in the logprobs
        when the output rules read them)."""
        generation = dict(self.generation)
        if index and generation.get("seed") is not None:
            generation["seed"] = choice_seed(generation["seed"], index)
        if self.output.needs_ids and not generation.get("logprobs"):
            generation["logprobs"] = True
        return generation


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded `seed` (choice 0 keeps it, so n=1 is unchanged)."""
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False  # the worker began generating it (so the drafter may have learned)

    def cancel(self) -> None:
        """The client went away: stop generating (or never start) and free the slot."""
        self.cancelled.set()

    def emit(self, kind: str, value: Any) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    async def next_event(self) -> tuple[str, Any]:
        return await self.events.get()


class Ticket:
    """One admitted request's queue slot, until `submit` hands it to a job or `release` frees it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._held = True

    def hand_over(self) -> None:
        self._held = False  # the job now holds the slot; the worker frees it

    def release(self) -> None:
        """Free the slot if no job took it (idempotent: call it in a `finally`)."""
        if self._held:
            self._held = False
            self._engine._free_slot()


class Engine:
    """Runs generation jobs and maintenance calls one at a time on a worker thread.

    `on_start(job)` is called on the worker before a job runs (e.g. to choose its drafter), and
    `on_finish(job, completion)` after each finished or cancelled job (completion is None when the
    job failed or never started), e.g. to update metrics and save what the drafter learned.
    """

    def __init__(self, lm, max_queue: int = 64, on_finish: Callable[[Job, Any], None] | None = None,
                 on_start: Callable[[Job], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.lm = lm
        self.max_queue = max_queue
        self.on_finish = on_finish
        self.on_start = on_start
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO within a priority
        self._pending = 0  # requests admitted: being parsed, queued or running
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._current: Job | None = None
        self._abandoned: list = []  # streams cut by a shutdown, never closed (their drafter is not told)
        self.completed = 0  # jobs that ran (finished or cancelled mid-way): the drafter learned

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="aded-engine", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Refuse new jobs, cancel the running one (its handler is told the server is shutting
        down) and, as the worker reaches them, the queued ones; returns at once."""
        self._accepting = False
        current = self._current
        if current is not None:
            current.cancel()

    def stop(self, timeout: float = 5.0) -> bool:
        """`begin_stop`, then wait up to `timeout` seconds for the worker; False when it is still
        busy (a long prompt's prefill cannot be interrupted): it then touches no drafter again."""
        self.begin_stop()
        self._put(_CALL, None)
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def idle(self) -> bool:
        """No worker thread is running (never started, or stopped)."""
        return self._thread is None or not self._thread.is_alive()

    # ------------------------------------------------------------------ submitting
    def admit(self) -> Ticket:
        """A queue slot for a request about to be read and parsed; 429 when all are taken."""
        with self._lock:
            if not self._accepting:
                raise RequestError("the server is shutting down", 503, type_="server_error")
            if self._pending >= self.max_queue:
                raise RequestError(f"the server is busy ({self._pending} requests queued); retry later",
                                   429, type_="rate_limit_error", code="queue_full",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            self._pending += 1
        return Ticket(self)

    def submit(self, request: GenerationRequest, ticket: Ticket) -> Job:
        """Queue a job in the slot of `ticket` (from `admit`)."""
        if not self._accepting:
            raise RequestError("the server is shutting down", 503, type_="server_error")
        job = Job(request, asyncio.get_running_loop())
        ticket.hand_over()
        self._put(_JOB, job)
        return job

    def call(self, func: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `func` on the worker as soon as no request runs; its result arrives in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(RuntimeError("the engine is not running"))
            return future
        self._put(_CALL, (func, future))
        return future

    def _put(self, priority: int, item: Any) -> None:
        self._queue.put((priority, next(self._order), item))

    def _free_slot(self) -> None:
        with self._lock:
            self._pending -= 1

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                break
            if isinstance(item, tuple):
                _run_call(*item)
                continue
            self._current = item
            try:
                self._run(item)
            finally:
                self._current = None
                self._free_slot()
        self._drain()

    def _drain(self) -> None:
        """After stop: tell queued jobs they will not run; run queued maintenance calls."""
        while True:
            try:
                _, _, item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                _run_call(*item)
            elif item is not None:
                item.emit("error", RequestError("the server is shutting down", 503, type_="server_error"))
                self._free_slot()

    def _run(self, job: Job) -> None:
        if not self._accepting:  # stopping: queued jobs are refused, not run
            job.emit("error", RequestError("the server is shutting down", 503, type_="server_error"))
            return
        if job.cancelled.is_set():  # the client left while queued
            self._finished(job, None)
            return
        request = job.request
        if self.on_start is not None:
            try:
                self.on_start(job)
            except Exception as exc:  # e.g. a tenant's state that cannot be loaded
                log.exception("preparing the request failed")
                job.emit("error", RequestError(f"preparing the request failed: {exc}", 500, type_="server_error"))
                self._finished(job, None)
                return
        job.started = True
        for index in range(request.n):
            if not self._run_choice(job, index):
                return

    def _run_choice(self, job: Job, index: int) -> bool:
        """Generate choice `index` of `job`; False when it did not finish (cancelled or failed)."""
        request = job.request
        rules = request.output
        completion = None
        try:
            stream = self.lm.stream(request.prompt_ids, stop=request.stop, **request.choice(index))
        except ValueError as exc:
            job.emit("error", RequestError(str(exc)))
            self._finished(job, None)
            return False
        text = OutputText(self.lm.tokenizer, rules) if rules.shapes_text else None
        num_sent = 0  # logprobs relayed with earlier pieces
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    if not self._accepting:
                        job.emit("error", RequestError("the server is shutting down", 503, type_="server_error"))
                    break
                if request.stream:
                    logprobs = stream.logprobs  # those of the ids committed so far, when asked for
                    entries = logprobs[num_sent:] if logprobs is not None else None
                    num_sent = len(logprobs or ())
                    if text is not None:
                        piece = text.piece(piece, entries)
                    if piece or (entries and rules.logprobs_wanted):
                        job.emit("piece", (index, piece, entries if rules.logprobs_wanted else None))
            else:
                completion = stream.completion
                if text is not None:
                    completion, rest = text.finish(completion)
                    if rest and request.stream:
                        job.emit("piece", (index, rest, None))
                if not rules.logprobs_wanted and completion.logprobs is not None:
                    completion = replace(completion, logprobs=None)
                completion = rules.finish_calls(completion)
                job.emit("done", (index, completion))
        except Exception as exc:  # one broken request must not stop the server
            log.exception("generation failed")
            job.emit("error", RequestError(f"generation failed: {exc}", 500, type_="server_error"))
        finally:
            if completion is None and not self._accepting:
                # shutting down: the learned state may be being saved from another thread now, so
                # this request's drafter is not told it ended (the stream is kept from the collector)
                self._abandoned.append(stream)
            elif completion is None:
                stream.close()  # ends the drafter's request; the KV cache is dropped
            self.completed += 1
            self._finished(job, completion)
        return completion is not None

    def _finished(self, job: Job, completion) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(job, completion)
            except Exception:  # metrics must never take the worker down
                log.exception("on_finish hook failed")


def _run_call(func: Callable[[], Any], future: concurrent.futures.Future) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(func())
        except Exception as exc:  # handed to the caller, who reports it
            future.set_exception(exc)
