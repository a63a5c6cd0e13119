"""The drafter's learned state on disk for the server: loaded at start, saved periodically and at
shutdown.

The file is the one learned-state format (`aded.drafters.state_file`), holding the drafter's
`state_dict()`; what is in it is the drafter's business (suffix: the global index over earlier
outputs and the calibration; aded: learned tri-grams and calibration; hybrid: its calibration and
its sources' state; none and pld learn nothing). A file that cannot be read, or whose arrays do
not load into the drafter, is renamed with a `.corrupt-<timestamp>` suffix and the server starts
fresh; a readable file made for another tokenizer or drafter is a configuration mistake and stops
the server with a clear message instead.
"""

from __future__ import annotations

import logging
import time

from aded.drafters import make_drafter
from aded.drafters.state_file import CorruptState, StateError, StateFile

__all__ = ["StateError", "CorruptState", "StateFile", "restore", "StateSaver"]

log = logging.getLogger("aded.server")


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
        lm.drafter.load_state_dict(arrays)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        aside = state_file.set_aside()
        log.error("%s: its arrays do not load (%s); moved it to %s and starting fresh",
                  state_file.path, exc, aside)
        _fresh_drafter(lm)
        return f"unloadable state set aside as {aside}; starting fresh{note}"
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header.get("saved_at", 0)))
    return f"loaded learned state from {state_file.path} (saved {saved}, {len(arrays)} arrays){note}"


def _fresh_drafter(lm) -> None:
    """Replace a drafter a failed load may have half-filled by a new one of the same kind."""
    drafter = make_drafter(lm.drafter.name, lm.tokenizer)
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
                arrays = self.engine.call(self.lm.drafter.state_dict).result(timeout=600)
            else:
                arrays = self.lm.drafter.state_dict()
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
