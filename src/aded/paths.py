"""Where aded keeps what it makes once and reuses: one place, so every cache moves together when
$ADED_CACHE_DIR is set, and a low-level module so anything (budget, backends, store) may ask."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Where converted models, measured costs and built datastores live: $ADED_CACHE_DIR or
    ~/.cache/aded."""
    root = os.environ.get("ADED_CACHE_DIR") or Path.home() / ".cache" / "aded"
    return Path(root)
