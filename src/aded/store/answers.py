"""A corpus of the model's own answers: the closest text to what it will say next.

The aded drafter's representative starts from corpus statistics; statistics of the target model's
own greedy answers match its phrasing (its greetings, list markers, code style) far better than any
human corpus. This module writes such a corpus: a few hundred varied prompts (`answer_prompts`,
built from text every machine has, never from the benchmark's question files), each answered
greedily by the model (`write_answers`), as JSON Lines:

    {"format": "aded-answers", "version": 1, "model": ..., "tokenizer": {...}, "max_new_tokens": N}
    {"id": "chat-0", "category": "chat", "prompt": "...", "text": "<the model's answer>"}

The header names the tokenizer the answers were made with; the default datastore includes an
answers file only for that tokenizer (`answers_for`). A file is written atomically after every few
answers, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aded.fileio import write_atomic
from aded.paths import cache_dir
from aded.store.corpus import chitchat_file
from aded.store.datastore import TokenizerIdentity

__all__ = ["ANSWERS_FORMAT", "answer_prompts", "write_answers", "read_answers_header", "answers_for",
           "packaged_answers_dir", "cached_answers_file"]

ANSWERS_FORMAT, ANSWERS_VERSION = "aded-answers", 1

_CATEGORIES = {  # category -> share of the prompts (they sum to 1)
    "chat": 0.18, "code-explain": 0.12, "code-edit": 0.16, "summarization": 0.10, "rag": 0.10,
    "writing": 0.10, "math": 0.10, "translation": 0.06, "data-edit": 0.08,
}  # fmt: skip


# ---------------------------------------------------------------------------- prompts
def _functions(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(name, source) of short, documented standard-library functions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith(("_", "test")))
    found: list[tuple[str, str]] = []
    for path in rng.sample(modules, len(modules)):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                text = ast.get_source_segment(source, node) or ""
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
                if 4 <= text.count("\n") <= 18 and doc:
                    found.append((node.name, text))
                    break  # one per module: variety
        if len(found) >= count:
            break
    return found


def _module_docs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(module name, its docstring) of standard-library modules with a paragraph or more."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if 200 <= len(doc) <= 2500:
            docs.append((path.stem, doc.strip()))
    return rng.sample(docs, min(count, len(docs)))


def _chat_openers(rng: random.Random, count: int) -> list[str]:
    """First messages of chitchat-dataset conversations (when installed), else built-in ones."""
    path = chitchat_file()
    lines: list[str] = []
    if path is not None:
        for convo in json.loads(path.read_text(encoding="utf-8")).values():
            turns = [m.get("text", "") for group in convo.get("messages", []) for m in group]
            first = " ".join(t for t in turns[:2] if t).strip()
            if 20 <= len(first) <= 200:
                lines.append(first)
    if not lines:
        lines = ["hi! how was your weekend?", "do you have any pets?", "what music do you like?",
                 "I just got back from a trip to the mountains.", "what's your favourite book?"]
    return rng.sample(lines, min(count, len(lines)))


def _rename_target(rng: random.Random, source: str) -> tuple[str, str] | None:
    import re

    names = sorted({n for n in re.findall(r"\b[a-z_][a-z0-9_]{2,}\b", source)
                    if n not in {"self", "return", "def", "for", "not", "and", "none", "true", "false",
                                 "while", "with", "try", "except", "else", "elif", "import", "from", "raise",
                                 "lambda", "pass", "yield", "global", "class", "break", "continue"}})
    if not names:
        return None
    old = rng.choice(names)
    return old, rng.choice(["value", "item", "result", "data", "entry", "count", "node", "buffer", "text"]) + "_"


def answer_prompts(count: int = 320, seed: int = 0) -> list[dict[str, str]]:
    """About `count` varied prompts (fewer if the sources run short) ({"id", "category", "prompt"}), the same for the same arguments on the
    same Python: chat openers, code to explain and edit, passages to summarise or answer from,
    writing tasks, arithmetic word problems, translations and data edits."""
    rng = random.Random(seed)
    want = {c: max(1, round(share * count)) for c, share in _CATEGORIES.items()}
    functions = _functions(rng, want["code-explain"] + want["code-edit"] + want["rag"])
    docs = _module_docs(rng, want["summarization"] + want["rag"])
    openers = _chat_openers(rng, want["chat"] + want["translation"])
    prompts: list[tuple[str, str]] = []
    prompts += [("chat", line) for line in openers[: want["chat"]]]
    for _, source in functions[: want["code-explain"]]:
        prompts.append(("code-explain", f"Explain what this Python function does:\n\n```python\n{source}\n```"))
    edits = ["Add type hints to this function and return the whole function.",
             "Add a docstring to this function and return the whole function.",
             "Rewrite this function to be easier to read, keeping its behaviour. Return the whole function."]
    for _, source in functions[want["code-explain"]: want["code-explain"] + want["code-edit"]]:
        rename = _rename_target(rng, source)
        task = rng.choice(edits) if rename is None or rng.random() < 0.4 else (
            f"Rename `{rename[0]}` to `{rename[1]}` in this function and return the whole function.")
        prompts.append(("code-edit", f"{task}\n\n```python\n{source}\n```"))
    for _module, doc in docs[: want["summarization"]]:
        prompts.append(("summarization", f"Summarise this text in two or three sentences:\n\n{doc}"))
    rag_functions = functions[want["code-explain"] + want["code-edit"]:]
    for i, (module, doc) in enumerate(docs[want["summarization"]:]):
        question = (f"What does `{rag_functions[i][0]}` do?" if i < len(rag_functions) and i % 2
                    else f"What is the `{module}` module for?")
        prompts.append(("rag", f"Answer using only the text below.\n\nText:\n{doc}\n\nQuestion: {question}"))
    subjects = ["a team meeting moved to Friday", "a late delivery", "a new office opening", "a birthday party",
                "a thank-you for a job interview", "a request for feedback on a report", "a cancelled flight",
                "a volunteer day at the park", "a broken printer", "a product launch"]
    forms = ["Write a short email about {}.", "Write a four-line poem about {}.", "Write a tweet about {}.",
             "Write a short story opening about {}.", "Write a polite complaint about {}."]
    prompts += [("writing", rng.choice(forms).format(rng.choice(subjects))) for _ in range(want["writing"])]
    for _ in range(want["math"]):
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
        item = rng.choice(["apples", "books", "marbles", "tickets", "pencils", "cookies"])
        prompts.append(("math", f"Sam has {a} {item}. He buys {b} more, then gives away a {c}th of what he has, "
                                f"rounded down. How many {item} does he have left? Explain step by step."))
    language = ["French", "Spanish", "German", "Italian"]
    for line in openers[want["chat"]:]:
        prompts.append(("translation", f"Translate into {rng.choice(language)}:\n\n{line}"))
    keys = ["host", "port", "timeout", "retries", "user", "debug", "level", "path", "mode", "cache"]
    for _ in range(want["data-edit"]):
        chosen = rng.sample(keys, 5)
        data = {k: rng.choice([rng.randint(1, 9000), rng.choice(["on", "off", "auto"]), rng.random() < 0.5])
                for k in chosen}
        key = rng.choice(chosen)
        prompts.append(("data-edit", f"Set `{key}` to {json.dumps('new-' + key)} in this JSON and return the "
                                     f"whole JSON:\n\n```json\n{json.dumps(data, indent=2)}\n```"))
    rng.shuffle(prompts)
    seen: dict[str, int] = {}
    out = []
    for category, prompt in prompts[:count]:
        seen[category] = seen.get(category, -1) + 1
        out.append({"id": f"{category}-{seen[category]}", "category": category, "prompt": prompt})
    return out


# ---------------------------------------------------------------------------- files
def read_answers_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of an answers file; ValueError when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not an aded answers file: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != ANSWERS_FORMAT:
        raise ValueError(f"{path} is not an aded answers file (no {ANSWERS_FORMAT!r} header)")
    if header.get("version") != ANSWERS_VERSION:
        raise ValueError(f"{path} is answers format version {header.get('version')}; this aded reads "
                         f"{ANSWERS_VERSION}")
    return header


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        f.readline()
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_answers(generate: Callable[[str], str], prompts: list[dict[str, str]], out: str | os.PathLike,
                  header: dict[str, Any], on_answer: Callable[[dict], None] | None = None,
                  save_every: int = 8) -> int:
    """Answer every prompt with `generate(prompt) -> text` into `out` (see the module docstring);
    answers already in `out` under the same header are kept, not asked again. Returns how many
    were generated now."""
    path = Path(out)
    header = {"format": ANSWERS_FORMAT, "version": ANSWERS_VERSION, **header}
    done: dict[str, dict] = {}
    if path.is_file():
        old = read_answers_header(path)
        if {k: old.get(k) for k in header} == header:
            done = {r["id"]: r for r in _records(path)}

    def save() -> None:
        lines = [json.dumps(header)] + [json.dumps(r, ensure_ascii=False) for r in done.values()]
        write_atomic(path, "\n".join(lines) + "\n")

    made = 0
    for prompt in prompts:
        if prompt["id"] in done:
            continue
        record = {**prompt, "text": generate(prompt["prompt"])}
        done[prompt["id"]] = record
        made += 1
        if on_answer is not None:
            on_answer(record)
        if made % save_every == 0:
            save()
    save()
    return made


def packaged_answers_dir() -> Path:
    return Path(__file__).parent / "data"


def cached_answers_file(identity: TokenizerIdentity) -> Path:
    """Where `aded datastore answers` writes a model's answers unless told otherwise."""
    return cache_dir() / "answers" / f"answers-{identity.vocab_hash[:16]}.jsonl"


def answers_for(identity: TokenizerIdentity) -> Path | None:
    """The answers file made with this tokenizer: the user's own (cache) first, then a packaged one."""
    for path in (cached_answers_file(identity),
                 packaged_answers_dir() / f"answers-{identity.vocab_hash[:16]}.jsonl"):
        if path.is_file():
            try:
                made_with = read_answers_header(path).get("tokenizer", {}).get("vocab_hash")
            except ValueError:
                continue
            if made_with == identity.vocab_hash:
                return path
    return None
