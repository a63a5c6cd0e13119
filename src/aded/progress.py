"""Progress shown to people on stderr (never on stdout, which carries results and JSON).

`status` wraps slow one-off work (a spinner, then its time); `BenchProgress` is what a person
watching `aded bench` sees: question, method, running tokens/s, as a live bar on a terminal and one
line per question otherwise (logs, CI), so long runs still show where they are without flooding.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Iterator

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from aded.bench.methods import TurnResult

__all__ = ["console", "status", "BenchProgress"]

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


class BenchProgress:
    def __init__(self) -> None:
        self.console = console
        self._decoded: dict[str, int] = {}
        self._seconds: dict[str, float] = {}
        self._bar = None
        self._task = None
        self._last_index = -1

    def start(self, num_questions: int, methods: list[str]) -> None:
        self._decoded = {m: 0 for m in methods}
        self._seconds = {m: 0.0 for m in methods}
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("\n  [dim]{task.fields[rates]}[/dim]"),
                                 console=self.console, transient=False)
            self._task = self._bar.add_task("starting", total=num_questions, rates="")
            self._bar.start()

    def rates(self) -> str:
        parts = []
        for method, decoded in self._decoded.items():
            seconds = self._seconds[method]
            parts.append(f"{method} {decoded / seconds:.1f}" if seconds > 0 else f"{method} -")
        return "tok/s: " + " · ".join(parts)

    def update(self, index: int, question, method: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=index,
                             description=escape(f"{question.key} [{question.category}] · {method}"),
                             rates=self.rates())
        elif index != self._last_index:
            if self._last_index >= 0:
                self.console.print(f"[dim]{self.rates()}[/dim]")
            self.console.print(f"question {index + 1}: {question.key} [{question.category}]", markup=False)
            self._last_index = index

    def record(self, method: str, result: "TurnResult") -> None:
        self._decoded[method] = self._decoded.get(method, 0) + result.decode_tokens
        self._seconds[method] = self._seconds.get(method, 0.0) + result.decode_s

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self._bar.tasks[0].total, description="done",
                             rates=self.rates())
            self._bar.stop()
        else:
            self.console.print(f"[dim]{self.rates()}[/dim]")
