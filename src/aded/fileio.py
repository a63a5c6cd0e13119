"""Writing files so that a crash at any moment leaves either the old file or the new one, and
hashing big files once: plain file chores that models, backends and the store all need, kept
here so none of them has to import another for them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "read_json_dict", "remembered", "file_sha256"]


def read_json_dict(path: str | os.PathLike) -> dict:
    """The JSON object in a cache file, or {} when it is missing, damaged or not an object: what a
    cache holds is measured again, never trusted."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remembered(path: str | os.PathLike, key: str, compute: Callable[[], Any], valid: Callable[[Any], bool]) -> Any:
    """`compute()`, kept under `key` in the JSON cache file `path` (one file, many keys) and taken
    from there next time while `valid` accepts what is stored: for measurements that take seconds.
    Returns a JSON value (from the file, or `compute()`'s)."""
    import json

    known = read_json_dict(path)
    if key in known and valid(known[key]):
        return known[key]
    known[key] = compute()
    write_atomic(path, json.dumps(known, indent=1))
    return known[key]


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files are hashed once."""
    import hashlib
    import json

    from aded.paths import cache_dir

    stat = path.stat()
    memo_path = cache_dir() / "hashes.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    memo[key] = digest.hexdigest()
    write_atomic(memo_path, json.dumps(memo, indent=0))
    return memo[key]
