"""The one file format for learned drafter state (the server's `--state`, `AdedDrafter(learned=)`,
the replicas' shared counts).

A NumPy `.npz` archive without any pickled object: the array `__header__` holds a JSON string
{"format", "version", "drafter", "tokenizer", "saved_at", "keys", "meta"}; every other array is one
of the drafter's `state_dict()` arrays. It is read with `allow_pickle=False`, written through
`aded.fileio.write_atomic` (temporary file, fsync, rename), so a crash at any moment leaves either
the previous file or the new one.

A file that cannot be read (truncated, garbage, wrong format or version) raises `CorruptState`; a
readable file made for another drafter or tokenizer raises `StateError`, a configuration mistake.
`load_learned` is how every holder loads one (the server, its tenants, `Aded.load_learned`): a bad
file is set aside with a `.corrupt-<timestamp>` suffix and the drafter starts fresh.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aded.drafters.base import Drafter, load_state
from aded.fileio import write_atomic
from aded.store.datastore import TokenizerIdentity

__all__ = ["STATE_FORMAT", "STATE_VERSION", "StateError", "CorruptState", "StateFile", "load_learned"]

log = logging.getLogger("aded.state")

STATE_FORMAT = "aded-learned-state"
STATE_VERSION = 2
_HEADER = "__header__"


class StateError(ValueError):
    """A readable state file that does not belong to this model or drafter."""


class CorruptState(ValueError):
    """A file that cannot be read as learned drafter state."""


class StateFile:
    """One state file for one drafter kind and tokenizer (`identity`: None when unknown)."""

    def __init__(self, path: str | os.PathLike, drafter_name: str, identity: TokenizerIdentity | None) -> None:
        self.path = Path(path)
        self.drafter_name = drafter_name
        self.identity = identity

    def encode(self, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
        bad = [k for k, v in arrays.items() if np.asarray(v).dtype == object]
        if bad:
            raise ValueError(f"learned arrays {bad} hold Python objects; refusing to pickle them")
        if _HEADER in arrays:
            raise ValueError(f"{_HEADER!r} is reserved for the file's header")
        header = {"format": STATE_FORMAT, "version": STATE_VERSION, "drafter": self.drafter_name,
                  "tokenizer": self.identity.to_json() if self.identity is not None else None,
                  "saved_at": time.time(), "keys": sorted(arrays), "meta": meta or {}}
        buffer = io.BytesIO()
        # allow_pickle=False: object arrays are refused above, so this writes the same bytes; named,
        # it also keeps an array called "allow_pickle" from being taken for the flag
        np.savez(buffer, allow_pickle=False, **{_HEADER: np.array(json.dumps(header))}, **arrays)
        return buffer.getvalue()

    def save(self, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        write_atomic(self.path, self.encode(arrays, meta))

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(header, arrays); `CorruptState` if unreadable, `StateError` if it is someone else's."""
        try:
            loaded = np.load(self.path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive of learned arrays")
            with loaded as archive:
                arrays = {key: archive[key] for key in archive.files}  # reads (and CRC-checks) all
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            # numpy's words for a file that is no archive ("... when allow_pickle=False") read like
            # advice to unpickle it; a state file never needs that, so they are not passed on
            why = ("not an .npz archive of arrays" if "pickle" in str(exc).lower()
                   else f"{type(exc).__name__}: {exc}")
            raise CorruptState(f"{self.path}: not a readable state file ({why})") from exc
        try:
            header = json.loads(str(arrays.pop(_HEADER)))
            kind = (header["format"], header["version"])
            drafter, tokenizer, keys = header["drafter"], header["tokenizer"], header["keys"]
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptState(f"{self.path}: missing or unreadable header ({exc})") from exc
        if kind != (STATE_FORMAT, STATE_VERSION):
            raise CorruptState(f"{self.path}: format {kind[0]!r} version {kind[1]!r}, "
                               f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
        if sorted(arrays) != sorted(keys):
            raise CorruptState(f"{self.path}: arrays {sorted(arrays)} do not match the header's {sorted(keys)}")
        if drafter != self.drafter_name:
            raise StateError(f"{self.path} holds state of the {drafter!r} drafter, not {self.drafter_name!r}; "
                             "pass another state file or the matching drafter")
        found = tokenizer.get("vocab_hash") if isinstance(tokenizer, dict) else None
        expected = self.identity.vocab_hash if self.identity is not None else None
        if found != expected:
            name = tokenizer.get("name") if isinstance(tokenizer, dict) else None
            raise StateError(f"{self.path} was learned with tokenizer {name!r}, not "
                             f"{self.identity.name if self.identity else None!r}; pass another state file")
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


def load_learned(drafter: Drafter, state_file: StateFile, fresh: Callable[[], Drafter],
                 mismatch_is_fatal: bool = True) -> tuple[Drafter, str]:
    """`drafter` with what `state_file` holds (or `fresh()` if a failed load may have half-filled
    it), and what happened, for /health: the file's name only, never its directory."""
    name = state_file.path.name
    removed = state_file.remove_stale_temporaries()
    note = f" (removed {removed} temporary file(s) of interrupted saves)" if removed else ""
    if not state_file.path.exists():
        return drafter, f"no state in {name} yet; starting fresh{note}"
    try:
        header, arrays = state_file.read()
    except CorruptState as exc:
        return drafter, _set_aside(state_file, f"{exc}", "corrupt") + note
    except StateError as exc:
        if mismatch_is_fatal and not _lacks_tokenizer(state_file):
            raise
        return drafter, _set_aside(state_file, f"{exc}", "unusable") + note
    try:
        load_state(drafter, arrays)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return fresh(), _set_aside(state_file, f"its arrays do not load ({exc})", "unloadable") + note
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header.get("saved_at", 0)))
    return drafter, f"loaded learned state from {name} (saved {saved}, {len(arrays)} arrays){note}"


def _lacks_tokenizer(state_file: StateFile) -> bool:
    """Whether the file records no tokenizer at all (it then reads without an identity): such a
    file cannot be checked against this model, so it is set aside rather than trusted."""
    try:
        StateFile(state_file.path, state_file.drafter_name, None).read()
    except ValueError:
        return False
    return True


def _set_aside(state_file: StateFile, why: str, kind: str) -> str:
    aside = state_file.set_aside()
    log.error("%s: %s; moved it to %s and starting fresh", state_file.path, why, aside)
    return f"{kind} state set aside as {aside.name}; starting fresh"
