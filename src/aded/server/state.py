"""The drafters' learned state on disk for the server: loaded at start, saved after each request.

The file is the one learned-state format (`aded.drafters.state_file`), holding a drafter's
`state_dict()`; what is in it is the drafter's business. Saving is coalesced and off the request
path: a finished request only raises a flag; the saver thread asks the engine to export what was
learned as soon as no request runs, then writes the files atomically. At most one save is in flight
and one more is pending, so a `kill -9` loses at most what the requests finished during the last
save taught. `min_interval` spaces saves further apart if wanted.

Loading (`aded.drafters.state_file.load_learned`) never crashes the server on a bad file: a file
that cannot be read (garbage, a `.npy`, no header, no tokenizer identity), or whose arrays do not
load into the drafter, is renamed with a `.corrupt-<timestamp>` suffix and the drafter starts fresh.
A readable file made for another tokenizer or drafter is a configuration mistake: `StateError`,
which the CLI reports in one line.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aded.drafters.state_file import CorruptState, StateError, StateFile, load_learned

__all__ = ["StateError", "CorruptState", "StateFile", "ModelStateFile", "load_learned", "StateSaver",
           "model_mismatch"]

log = logging.getLogger("aded.server")


class ModelStateFile(StateFile):
    """A state file that also records which model learned it (in its header's `meta`), so that a
    server given a file of another model can say which models they are (`model_mismatch`)."""

    def __init__(self, path, drafter_name: str, identity, model: str) -> None:
        super().__init__(path, drafter_name, identity)
        self.model = model

    def save(self, arrays: dict, meta: dict[str, Any] | None = None) -> None:
        super().save(arrays, {"model": self.model, **(meta or {})})

    def at(self, path: Path) -> ModelStateFile:
        """The same kind of file at `path` (a tenant's, beside the server's)."""
        return ModelStateFile(path, self.drafter_name, self.identity, self.model)


def model_mismatch(state_file: StateFile, model: str, exc: StateError) -> StateError:
    """`exc` (a file learned with another tokenizer) said in models: the one that learned the file
    (as its header records it, else its tokenizer's name, an HF cache path read as the repository
    it holds) and the one served."""
    try:
        with np.load(state_file.path, allow_pickle=False) as archive:
            header = json.loads(str(archive["__header__"]))
    except Exception:  # the original error says enough
        return exc
    tokenizer = header.get("tokenizer") if isinstance(header.get("tokenizer"), dict) else {}
    if header.get("drafter") != state_file.drafter_name:
        return exc  # a drafter mismatch: the message names the drafters
    meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
    theirs = meta.get("model") or _model_of(tokenizer.get("name"))
    return StateError(f"{state_file.path} holds what the {header.get('drafter')} drafter learned on the model "
                      f"{theirs!r}, not on {model!r}, which this server serves (their tokenizers differ); pass "
                      "another --state file, or serve that model")


def _model_of(tokenizer_name: Any) -> str:
    """A model's name from its tokenizer's `name_or_path` (a Hugging Face cache snapshot path names
    the repository it holds: models--Org--Name/snapshots/<hash>)."""
    text = str(tokenizer_name or "an unknown model")
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)
    return f"{cached.group(1)}/{cached.group(2)}" if cached else text


class StateSaver:
    """Saves what the drafters learned after requests finish (see the module's docstring).

    `export()` runs on the engine's worker between requests and returns the (file, arrays) pairs
    to write; `save_soon()` is called after each request that taught something. Every export is
    stamped on the worker, in the order the states were taken, and a file is never overwritten by
    an older stamp than it holds (`write_now`, used for a tenant dropped from memory, may overtake
    a save in flight).
    """

    def __init__(self, engine, export: Callable[[], list], min_interval: float = 0.0, metrics=None) -> None:
        if min_interval < 0:
            raise ValueError(f"the minimum interval between saves must be >= 0, got {min_interval}")
        self.engine = engine
        self.export = export
        self.min_interval = min_interval
        self.metrics = metrics
        self._wanted = threading.Event()  # one save pending
        self._stopping = threading.Event()
        self._last = 0.0
        self._stamps = itertools.count()  # taken on the worker only
        self._written: dict = {}  # path -> stamp of what it holds
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="aded-state", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def save_soon(self) -> None:
        self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                return
            self._wanted.clear()  # requests finishing from now on ask for the next save
            self._last = time.monotonic()
            try:
                stamp, files = self.engine.call(self._stamped_export).result(timeout=600)
            except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
                log.error("exporting the learned state failed: %s", exc)
                self._record(False)
                continue
            self._write(stamp, files)

    def _stamped_export(self) -> tuple[int, list]:
        return next(self._stamps), self.export()

    def write_now(self, files: list[tuple[StateFile, dict]]) -> None:
        """Write state exported just now on the worker, before the worker goes on."""
        self._write(next(self._stamps), files)

    def _write(self, stamp: int, files: list[tuple[StateFile, dict]]) -> None:
        with self._write_lock:
            for state_file, arrays in files:
                if self._written.get(state_file.path, -1) > stamp:
                    continue  # a newer state is already there
                try:
                    state_file.save(arrays)
                except (OSError, ValueError) as exc:
                    log.error("saving the learned state to %s failed: %s", state_file.path, exc)
                    self._record(False)
                else:
                    self._written[state_file.path] = stamp
                    self._record(True)

    def _record(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.record_save(ok)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and save what is left; call after the engine's worker has stopped. A
        save in flight is given `timeout` seconds (this last save is newer, and a file never takes
        an older state than it holds, so one still under way later cannot undo it)."""
        self._stopping.set()
        self._wanted.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self._write(*self._stamped_export())
