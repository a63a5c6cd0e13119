"""What a person watching `aded bench` sees: question, method, running tokens/s, as a live bar on
a terminal and one line per question otherwise (logs, CI), so long runs still show where they are
without flooding. Kept with the benchmark because it knows benchmark results; `aded.progress`
below it stays generic, so the whole library may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape

from aded.progress import console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from aded.bench.methods import TurnResult

__all__ = ["BenchProgress"]


class BenchProgress:
    def __init__(self) -> None:
        self.console = console
        self._decoded: dict[str, int] = {}
        self._seconds: dict[str, float] = {}
        self._bar: Progress | None = None  # with its one task, on a terminal
        self._task: TaskID | None = None
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
            assert self._task is not None  # added with the bar
            self._bar.update(self._task, completed=index,
                             description=escape(f"{question.key} [{question.category}] · {method}"),
                             rates=self.rates())
        elif index != self._last_index:
            if self._last_index >= 0:
                self.console.print(f"[dim]{self.rates()}[/dim]")
            self.console.print(f"question {index + 1}: {question.key} [{question.category}]", markup=False)
            self._last_index = index

    def record(self, method: str, result: TurnResult) -> None:
        self._decoded[method] = self._decoded.get(method, 0) + result.decode_tokens
        self._seconds[method] = self._seconds.get(method, 0.0) + result.decode_s

    def stop(self) -> None:
        if self._bar is not None:
            assert self._task is not None  # added with the bar
            self._bar.update(self._task, completed=self._bar.tasks[0].total, description="done",
                             rates=self.rates())
            self._bar.stop()
        else:
            self.console.print(f"[dim]{self.rates()}[/dim]")
