"""The default datastore: built on first use from corpora every machine has, then cached.

Sources, in order (each only if present): the Python standard library's sources (always there;
code and English docstrings, PSF licence), the chitchat-dataset conversations (PyPI
`chitchat-dataset`, MIT, installed with the `corpus` extra; everyday English dialogue) and the
model's own answers to a few hundred prompts (`aded.store.answers`: shipped for the default model,
made for any other by `aded datastore answers`), counted `ANSWERS_WEIGHT` times because they are
what the model will say. Nothing is downloaded. Building takes about 35 s on two cores (6M tokens); the ~18 MB file lands in
`$ADED_CACHE_DIR/datastores` (default `~/.cache/aded/datastores`), named by the tokenizer's
vocabulary hash, so each tokenizer gets its own.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

from aded.paths import cache_dir
from aded.store.answers import answers_for
from aded.store.build import BuildParams
from aded.store.corpus import CorpusFile, chitchat_file
from aded.store.datastore import TokenizerIdentity, tokenizer_identity

__all__ = ["ANSWERS_WEIGHT", "default_corpus", "default_datastore_file", "default_datastore_path", "DEFAULT_CORPUS_VERSION", "DEFAULT_PARAMS"]

DEFAULT_CORPUS_VERSION = 2  # bump when the recipe changes, so caches rebuild
#: the model's own answers are a small corpus (~40k tokens against ~6M); counted this many times
#: their successors win in the contexts they share with code and chat
ANSWERS_WEIGHT = 8
#: contexts seen once are dropped: 18 instead of 31 MB, and no measurable loss in replay
DEFAULT_PARAMS = BuildParams(min_count=2)
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "turtledemo", "__pycache__",
              "ensurepip", "lib2to3", "tkinter", "pydoc_data"}  # fmt: skip




def default_corpus(identity: TokenizerIdentity | None = None) -> list[CorpusFile]:
    """The files the default datastore is built from, in a stable order; the answers of the model
    with tokenizer `identity` when there are some (repeated `ANSWERS_WEIGHT` times)."""
    files: list[CorpusFile] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(names):
            if name.endswith(".py"):
                path = Path(root) / name
                files.append(CorpusFile(path, path.stat().st_size))
    chat = chitchat_file()
    if chat is not None:
        files.append(CorpusFile(chat, chat.stat().st_size))
    answers = answers_for(identity) if identity is not None else None
    if answers is not None:
        files += [CorpusFile(answers, answers.stat().st_size)] * ANSWERS_WEIGHT
    return files


def default_datastore_file(identity: TokenizerIdentity, files: list[CorpusFile] | None = None) -> Path:
    """Where the default datastore of a tokenizer lives (named by the corpora present)."""
    files = default_corpus(identity) if files is None else files
    tag = "c" if any(f.path.name == "dataset.json" for f in files) else "s"
    answers = answers_for(identity)
    if answers is not None and any(f.path == answers for f in files):  # new answers, a new datastore
        tag += "a" + hashlib.sha256(answers.read_bytes()).hexdigest()[:8]
    return cache_dir() / "datastores" / f"default-v{DEFAULT_CORPUS_VERSION}{tag}-{identity.vocab_hash[:16]}.aded"


def default_datastore_path(tokenizer: Any) -> Path:
    """The default datastore for `tokenizer`, building it (with progress) the first time."""
    identity = tokenizer_identity(tokenizer)
    files = default_corpus(identity)
    path = default_datastore_file(identity, files)
    if not path.is_file():
        from aded.progress import console
        from aded.store.build import build_datastore

        console.print(f"Building the default aded datastore once ({len(files)} files) into {path}")
        build_datastore(files, tokenizer, path, DEFAULT_PARAMS, identity=identity)
    return path
