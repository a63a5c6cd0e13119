"""Corpus readers: turn files into a stream of documents (strings), never holding a corpus whole.

Accepted inputs, chosen by suffix (folders are walked recursively, in sorted order):
- plain text (`.txt`, `.md`, `.rst`, `.py`, ... and anything else that decodes as UTF-8): read in
  blocks of about 1 MB cut at line ends, one document per block;
- JSON Lines (`.jsonl`): one record a line, its `text_field` (default "text") or, failing that,
  every conversation turn found in it;
- JSON (`.json`): a list or an object whose items are conversations; parsed item by item, so a
  big file streams. A conversation is a list of turns: strings, `{"role", "content"}`,
  `{"from", "value"}`, `{"text"}` dicts, or chitchat-dataset's `{"messages": [[{"text",
  "sender"}, ...], ...]}`; each turn is one document (tri-grams never span two speakers).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CorpusError", "CorpusFile", "corpus_files", "iter_documents", "documents_of", "chitchat_file"]

TEXT_KEYS = ("text", "content", "value")
CONTAINER_KEYS = ("messages", "conversations", "conversation", "turns", "dialog")
_SKIP_SUFFIXES = {".pyc", ".so", ".gz", ".zip", ".png", ".jpg", ".gif", ".bin", ".gguf", ".whl",
                  ".npy", ".aded", ".pdf", ".exe", ".dll", ".tar", ".bz2", ".xz", ".ico", ".pkl"}  # fmt: skip
_BLOCK = 1 << 20


class CorpusError(ValueError):
    """A corpus path that cannot be read as text, JSON Lines or conversation JSON."""


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int  # bytes, for progress


def chitchat_file() -> Path | None:
    """chitchat-dataset's conversations (`dataset.json`) when the package is installed: beside the
    readers that know its shape, so the default corpus and the answer prompts both find it here."""
    spec = importlib.util.find_spec("chitchat_dataset")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    chat = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    return chat if chat.is_file() else None


def corpus_files(paths: Iterable[str | os.PathLike]) -> list[CorpusFile]:
    """Every readable file under `paths` (files as given, folders walked), in a stable order."""
    files = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(CorpusFile(path, path.stat().st_size))
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                for name in sorted(names):
                    child = Path(root) / name
                    if child.suffix.lower() not in _SKIP_SUFFIXES and not name.startswith(".") and child.is_file():
                        files.append(CorpusFile(child, child.stat().st_size))
        else:
            raise CorpusError(f"corpus path {path} does not exist")
    return files


def iter_documents(file: CorpusFile | Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one corpus file, streamed."""
    path = file.path if isinstance(file, CorpusFile) else Path(file)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path, text_field)
    elif suffix == ".json":
        yield from _json_items(path)
    else:
        yield from _text_blocks(path)


def _text_blocks(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(4096)
        if b"\x00" in head:
            return  # binary: not a corpus file
        f.seek(0)
        rest = b""
        while block := f.read(_BLOCK):
            block = rest + block
            cut = block.rfind(b"\n") + 1 or len(block)
            rest = block[cut:]
            yield block[:cut].decode("utf-8", errors="replace")
        if rest:
            yield rest.decode("utf-8", errors="replace")


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if isinstance(record, dict) and isinstance(record.get(text_field), str):
                yield record[text_field]
            else:
                yield from documents_of(record)


def documents_of(item: Any) -> Iterator[str]:
    """The turns of a conversation-shaped JSON value, one document each."""
    if isinstance(item, str):
        if item.strip():
            yield item
    elif isinstance(item, dict):
        for key in TEXT_KEYS:
            if isinstance(item.get(key), str):
                yield from documents_of(item[key])
                return
        for key in CONTAINER_KEYS:
            if key in item:
                yield from documents_of(item[key])
                return
    elif isinstance(item, list):
        senders = {m.get("sender") for m in item if isinstance(m, dict)}
        if item and all(isinstance(m, dict) for m in item) and len(senders) == 1 and None not in senders:
            # one speaker's consecutive messages (chitchat-dataset): one turn
            yield "\n".join(doc for m in item for doc in documents_of(m))
            return
        for element in item:
            yield from documents_of(element)


def _json_items(path: Path) -> Iterator[str]:
    """Stream the items of a top-level JSON list (or the values of an object) one at a time."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buffer, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buffer, pos, eof
            chunk = f.read(_BLOCK)
            eof = not chunk
            buffer, pos = buffer[pos:] + chunk, 0
            return bool(chunk)

        def skip(chars: str) -> str:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in chars:
                    pos += 1
                if pos < len(buffer) or not more():
                    return buffer[pos] if pos < len(buffer) else ""

        def value() -> Any:
            nonlocal pos
            while True:
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                    if end < len(buffer) or eof:  # a number may continue in the next block
                        pos = end
                        return item
                except json.JSONDecodeError as exc:
                    if eof:
                        raise CorpusError(f"{path}: invalid JSON ({exc.msg})") from None
                if not more() and eof and pos >= len(buffer):
                    raise CorpusError(f"{path}: JSON ends early")

        opener = skip(" \t\r\n")
        if opener not in "[{" or not opener:
            raise CorpusError(f"{path}: expected a JSON list or object of conversations")
        pos += 1
        while True:
            char = skip(" \t\r\n,")
            if char in "]}" or not char:
                return
            if opener == "{":
                value()  # the key
                if skip(" \t\r\n") != ":":
                    raise CorpusError(f"{path}: invalid JSON object")
                pos += 1
                skip(" \t\r\n")
            yield from documents_of(value())
