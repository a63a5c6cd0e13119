"""Benchmark questions: JSON Lines with `id`, `category`, `turns`, an optional `system` prompt and
an optional `reference`.

One question a line. `turns` is a list of messages the user side sends: a string is a user message,
an object `{"role": "user" | "tool", "content": "..."}` may also be a tool's result (an agent loop
feeds what its tools returned after the model's call). A multi-turn question is a session: the
model's own answer is fed back (through the chat template) before the next turn, so each turn's
prompt holds the conversation so far. Other fields (e.g. `source`) are kept out of the way, so any
file of the shared prompt-set shape loads. A bad line is an error naming the file and the line,
because a silently skipped question changes every number of the run.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Question", "QuestionError", "load_questions", "read_questions", "default_questions_path",
           "question_file", "take", "SHIPPED"]


class QuestionError(ValueError):
    """A question file that cannot be used, naming the file and line."""


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    source: str = ""  # the file's stem: ids are unique within a file, not across files
    roles: tuple[str, ...] = ()  # per turn, "user" or "tool" (empty: every turn is the user's)
    system: str | None = None  # a system prompt before the first turn

    def messages(self, index: int) -> list[dict[str, str]]:
        """The messages that open turn `index` (0-based) after the answers before it: the system
        prompt first, then the turn itself."""
        opening = [{"role": "system", "content": self.system}] if index == 0 and self.system else []
        role = self.roles[index] if self.roles else "user"
        return [*opening, {"role": role, "content": self.turns[index]}]

    @property
    def key(self) -> str:
        return f"{self.source}:{self.id}" if self.source else self.id


def default_questions_path() -> Path:
    """The small mixed question set shipped with the package (see data/SOURCES.md)."""
    return Path(str(resources.files("aded.bench") / "data" / "questions.jsonl"))


#: question sets shipped with the package, by the name `aded bench -q NAME` takes
SHIPPED = {"mixed": "questions.jsonl", "sessions": "sessions.jsonl"}


def question_file(spec: str | os.PathLike) -> Path:
    """A question file's path: a shipped set's name (`mixed`, `sessions`) or a path."""
    if str(spec) in SHIPPED and not Path(spec).exists():
        return Path(str(resources.files("aded.bench") / "data" / SHIPPED[str(spec)]))
    return Path(spec)


def read_questions(path: str | os.PathLike) -> list[Question]:
    """All questions of one file, in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise QuestionError(f"cannot read question file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise QuestionError(f"{path} is not UTF-8 text: {exc}") from exc
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse(line, f"{path}:{number}", path.stem)
        if question.id in seen:
            raise QuestionError(f"{path}:{number}: id {question.id!r} repeats line {seen[question.id]}")
        seen[question.id] = number
        questions.append(question)
    if not questions:
        raise QuestionError(f"{path} holds no questions")
    return questions


def _parse(line: str, where: str, source: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuestionError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise QuestionError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("id", "category", "turns") if k not in record]
    if missing:
        raise QuestionError(f"{where}: missing field(s) {', '.join(missing)}")
    qid, category, turns = record["id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
        raise QuestionError(f"{where}: id must be a non-empty string or an integer, got {qid!r}")
    if not isinstance(category, str) or not category.strip() or category == "all":
        raise QuestionError(f"{where}: category must be a non-empty string other than 'all', got {category!r}")
    if isinstance(turns, str) or not isinstance(turns, list) or not turns:
        raise QuestionError(f"{where}: turns must be a non-empty list of strings")
    texts, roles = [], []
    for number, turn in enumerate(turns, start=1):
        role = "user"
        if isinstance(turn, dict):
            role, turn = turn.get("role", "user"), turn.get("content")
            if role not in ("user", "tool"):
                raise QuestionError(f"{where}: turn {number} has role {role!r}; a turn is the user's or a tool's")
        if not isinstance(turn, str) or not turn.strip():
            raise QuestionError(f"{where}: turn {number} must be a non-empty string "
                                "(or an object with a role and a non-empty content)")
        texts.append(turn)
        roles.append(role)
    if roles[0] == "tool":
        raise QuestionError(f"{where}: the first turn is a tool's result, but no call came before it")
    system = record.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise QuestionError(f"{where}: system must be a non-empty string")
    reference = record.get("reference")
    if reference is not None:
        if isinstance(reference, str):
            reference = [reference]
        if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
            raise QuestionError(f"{where}: reference must be a string or a list of strings")
        reference = tuple(reference)
    return Question(str(qid), category.strip(), tuple(texts), reference, source,
                    tuple(roles) if "tool" in roles else (), system)


def take(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """At most `limit` questions, taken round-robin over categories (in order of first appearance),
    so a small limit still covers every task instead of only the first file's."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    by_category: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_category[question.category].append(question)
    queues = [list(reversed(group)) for group in by_category.values()]
    chosen: set[int] = set()
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.add(id(queue.pop()))
    return [q for q in questions if id(q) in chosen]  # the files' order, so runs are comparable


def load_questions(paths: Iterable[str | os.PathLike] | None = None,
                   limit: int | None = None) -> list[Question]:
    """Questions from the given files (default: the shipped set), optionally limited."""
    files = [question_file(p) for p in paths or []] or [default_questions_path()]
    questions: list[Question] = []
    keys: set[str] = set()
    for path in files:
        for question in read_questions(path):
            if question.key in keys:
                raise QuestionError(f"{path}: question {question.key!r} is given twice (same file twice?)")
            keys.add(question.key)
            questions.append(question)
    return take(questions, limit)
