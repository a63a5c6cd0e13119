"""The drafter's learned state on disk: loaded at start, saved periodically and at shutdown.

File format (our own, version 1): a NumPy `.npz` archive without any pickled object; the array
`__header__` holds a JSON string {"format", "version", "drafter", "tokenizer", "saved_at", "keys"},
every other array is one of the drafter's learned arrays. It is loaded with `allow_pickle=False`.
Writes go through `aded.fileio.write_atomic` (temporary file, fsync, rename), so a crash or
`kill -9` at any moment leaves either the previous file or the new one.

What is persisted, per drafter:
- suffix: the global suffix index over earlier outputs and its calibration (`state_arrays`);
- hybrid: its calibration and each source's state (`state_arrays`), plus the aded source's
  learned layer through the adapter below when that source has no `state_arrays` of its own;
- aded: the representative's learned tri-/bigrams and the acceptance calibration
  (`Representative.export_learned/import_learned`, `Calibrator.arrays/load`);
- none, pld: nothing (they learn nothing across requests).

A file that cannot be read (truncated, garbage, wrong format or version) is reported, renamed with
a `.corrupt-<timestamp>` suffix and the server starts fresh. A readable file made for another
tokenizer or drafter is a configuration mistake and stops the server with a clear message instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aded.fileio import write_atomic

__all__ = ["STATE_FORMAT", "STATE_VERSION", "StateError", "CorruptState", "StateFile",
           "export_state", "import_state", "persisted_parts", "restore", "StateSaver"]

log = logging.getLogger("aded.server")

STATE_FORMAT = "aded-server-state"
STATE_VERSION = 1
_HEADER = "__header__"


class StateError(ValueError):
    """A readable state file that does not belong to this model or drafter."""


class CorruptState(ValueError):
    """A state file that cannot be read as one written by this server."""


# ---------------------------------------------------------------------------- drafter adapters
@dataclass(frozen=True)
class _Part:
    prefix: str
    export: Callable[[], dict[str, np.ndarray]]
    load: Callable[[dict[str, np.ndarray]], None]
    what: str


def _learned_layer(drafter: Any) -> bool:
    """The ADED drafter's state API: a representative with learned counts and a calibrator."""
    rep, calib = getattr(drafter, "rep", None), getattr(drafter, "calibrator", None)
    return hasattr(rep, "export_learned") and hasattr(calib, "arrays") and hasattr(calib, "load")


def _aded_part(drafter: Any, prefix: str) -> _Part:
    def export() -> dict[str, np.ndarray]:
        arrays = dict(drafter.rep.export_learned())
        arrays.update({k: np.array(v, copy=True) for k, v in drafter.calibrator.arrays().items()})
        return arrays

    def load(arrays: dict[str, np.ndarray]) -> None:
        drafter.calibrator.load(arrays)
        drafter.rep.import_learned(arrays)

    return _Part(prefix, export, load, f"{prefix or ''}learned tri-grams and calibration")


def persisted_parts(drafter: Any) -> list[_Part]:
    """How each piece of a drafter's learned state is exported and restored (may be empty)."""
    parts: list[_Part] = []
    if hasattr(drafter, "state_arrays") and hasattr(drafter, "load_state_arrays"):
        parts.append(_Part("", drafter.state_arrays, drafter.load_state_arrays, f"{drafter.name} state arrays"))
        for source in getattr(drafter, "sources", ()):  # hybrid: sources it cannot export itself
            if not hasattr(source, "state_arrays") and _learned_layer(source):
                parts.append(_aded_part(source, f"{source.name}/"))
    elif _learned_layer(drafter):
        parts.append(_aded_part(drafter, ""))
    return parts


def export_state(drafter: Any) -> dict[str, np.ndarray]:
    """All learned arrays of `drafter`, copied (call it between requests)."""
    arrays: dict[str, np.ndarray] = {}
    for part in persisted_parts(drafter):
        for key, value in part.export().items():
            arrays[part.prefix + key] = np.array(value, copy=True)
    return arrays


def import_state(drafter: Any, arrays: dict[str, np.ndarray]) -> None:
    parts = persisted_parts(drafter)
    claimed = [p.prefix for p in parts if p.prefix]
    for part in parts:
        if part.prefix:
            mine = {k[len(part.prefix):]: v for k, v in arrays.items() if k.startswith(part.prefix)}
        else:  # the drafter's own arrays: everything an adapter below does not claim
            mine = {k: v for k, v in arrays.items() if not any(k.startswith(c) for c in claimed)}
        if mine:
            part.load(mine)


# ---------------------------------------------------------------------------- the file
class StateFile:
    """One state file for one drafter of one tokenizer (`identity`: a `TokenizerIdentity`)."""

    def __init__(self, path: str | os.PathLike, drafter_name: str, identity) -> None:
        self.path = Path(path)
        self.drafter_name = drafter_name
        self.identity = identity

    def encode(self, arrays: dict[str, np.ndarray]) -> bytes:
        bad = [k for k, v in arrays.items() if v.dtype == object]
        if bad:
            raise ValueError(f"learned arrays {bad} hold Python objects; refusing to pickle them")
        header = {"format": STATE_FORMAT, "version": STATE_VERSION, "drafter": self.drafter_name,
                  "tokenizer": self.identity.to_json(), "saved_at": time.time(), "keys": sorted(arrays)}
        buffer = io.BytesIO()
        np.savez(buffer, **{_HEADER: np.array(json.dumps(header))}, **arrays)
        return buffer.getvalue()

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        write_atomic(self.path, self.encode(arrays))

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(header, arrays); `CorruptState` if unreadable, `StateError` if it is someone else's."""
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}  # reads (and CRC-checks) all
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise CorruptState(f"{self.path}: not a readable state file ({type(exc).__name__}: {exc})") from exc
        try:
            header = json.loads(str(arrays.pop(_HEADER)))
            format_, version = header["format"], header["version"]
            drafter, tokenizer = header["drafter"], header["tokenizer"]
            keys = header["keys"]
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptState(f"{self.path}: missing or unreadable header ({exc})") from exc
        if format_ != STATE_FORMAT or version != STATE_VERSION:
            raise CorruptState(f"{self.path}: format {format_!r} version {version!r}, "
                               f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
        if sorted(arrays) != sorted(keys):
            raise CorruptState(f"{self.path}: arrays {sorted(arrays)} do not match the header's {sorted(keys)}")
        if drafter != self.drafter_name:
            raise StateError(f"{self.path} holds state of the {drafter!r} drafter, not {self.drafter_name!r}; "
                             "pass another --state file or the matching --drafter")
        if tokenizer.get("vocab_hash") != self.identity.vocab_hash:
            raise StateError(f"{self.path} was learned with tokenizer {tokenizer.get('name')!r}, "
                             f"not this model's {self.identity.name!r}; pass another --state file")
        return header, arrays

    def set_aside(self) -> Path:
        """Rename the file out of the way, keeping it for inspection."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        return target

    def remove_stale_temporaries(self) -> int:
        """Temporary files of saves a crash interrupted (never renamed, so never the state)."""
        removed = 0
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            try:
                tmp.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove stale temporary %s: %s", tmp, exc)
        return removed


# ---------------------------------------------------------------------------- keeping it
def restore(lm, state_file: StateFile) -> str:
    """Load `state_file` into `lm.drafter` before serving; returns what happened, for the log."""
    removed = state_file.remove_stale_temporaries()
    note = f" (removed {removed} temporary file(s) of interrupted saves)" if removed else ""
    if not state_file.path.exists():
        return f"no state at {state_file.path} yet; starting fresh{note}"
    try:
        header, arrays = state_file.read()
    except CorruptState as exc:
        aside = state_file.set_aside()
        log.error("%s; moved it to %s and starting fresh", exc, aside)
        return f"corrupt state set aside as {aside}; starting fresh{note}"
    try:
        import_state(lm.drafter, arrays)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        aside = state_file.set_aside()
        log.error("%s: its arrays do not load (%s); moved it to %s and starting fresh",
                  state_file.path, exc, aside)
        _fresh_drafter(lm)
        return f"unloadable state set aside as {aside}; starting fresh{note}"
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header.get("saved_at", 0)))
    return f"loaded learned state from {state_file.path} (saved {saved}, {len(arrays)} arrays){note}"


def _fresh_drafter(lm) -> None:
    """Replace a drafter a failed import may have half-filled by a new one of the same kind."""
    from aded.api import _drafter_context
    from aded.drafters import make_drafter

    name = lm.drafter.name
    drafter = make_drafter(name, **_drafter_context(name, lm.tokenizer, {}))
    lm.drafter = drafter
    lm.decoder.drafter = drafter


class StateSaver:
    """Saves the drafter's learned state every `interval` seconds when requests taught it
    something, and once more at shutdown. Arrays are exported on the engine's worker between
    requests (the drafter is never read while it learns); the file is written here."""

    def __init__(self, lm, engine, state_file: StateFile, interval: float, metrics=None) -> None:
        if interval <= 0:
            raise ValueError(f"the save interval must be positive, got {interval}")
        import threading

        self.lm = lm
        self.engine = engine
        self.state_file = state_file
        self.interval = interval
        self.metrics = metrics
        self._saved_at_count = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aded-state", daemon=True)

    def start(self) -> None:
        self._saved_at_count = self.engine.completed
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.engine.completed != self._saved_at_count:
                self.save(via_engine=True)

    def save(self, via_engine: bool) -> bool:
        count = self.engine.completed
        try:
            if via_engine:
                arrays = self.engine.call(lambda: export_state(self.lm.drafter)).result(timeout=600)
            else:
                arrays = export_state(self.lm.drafter)
            self.state_file.save(arrays)
        except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
            log.error("saving the learned state to %s failed: %s", self.state_file.path, exc)
            if self.metrics is not None:
                self.metrics.record_save(False)
            return False
        self._saved_at_count = count
        if self.metrics is not None:
            self.metrics.record_save(True)
        return True

    def stop(self) -> None:
        """Stop the timer and save once more; call after the engine's worker has stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        if self.engine.completed != self._saved_at_count:
            self.save(via_engine=False)
            log.info("saved the learned state to %s", self.state_file.path)
