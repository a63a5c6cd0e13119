"""Progress shown to people on stderr (never on stdout, which carries results and JSON).

`status` wraps slow one-off work (a spinner, then its time). Only generic helpers live here, at
the bottom of the package, so that any module may report progress without importing the layers
above it; the benchmark's own progress display is `aded.bench.progress`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console

__all__ = ["console", "status"]

console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message while slow one-off work runs, then the time it took."""
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        print(message + " ...", file=sys.stderr, flush=True)
        yield
    console.print(f"[dim]{message}: done in {time.perf_counter() - start:.1f} s[/dim]")
