"""The public ADED drafter (PyPI `draftretriever==0.1.1`, MIT) on our engine, as a peer to compare.

It indexes a tokenised corpus with the package's own writer and drafts the paths its `search`
returns (its own adaptive tri-gram matrix and MCTS; not seeded by us, so not reproducible). Only
its draft tokens are used: verification and acceptance are ours, hence lossless. The index is
built from the same corpus as our default datastore unless `index` or `corpus` says otherwise,
and cached under `$ADED_CACHE_DIR/reference`. Optional: `pip install draftretriever==0.1.1`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aded.drafters.base import Drafter
from aded.tree import DraftTree, TreeBuilder

__all__ = ["AdedReferenceDrafter"]


def _draftretriever():
    try:
        return importlib.import_module("draftretriever")
    except ImportError as exc:
        raise RuntimeError(
            "the aded-reference drafter needs the package draftretriever==0.1.1 "
            "(pip install draftretriever==0.1.1, or pip install 'aded[reference]'); "
            "it has binary wheels for CPython 3.11 on x86_64 Linux only"
        ) from exc


class AdedReferenceDrafter(Drafter):
    name = "aded-reference"
    needs_tokenizer = True  # to find (or build) and check its datastore
    expensive = True

    def __init__(
        self,
        index: str | os.PathLike | None = None,
        tokenizer: Any = None,
        corpus: Sequence[str | os.PathLike] | None = None,
        max_depth: int = 8,
    ) -> None:
        module = _draftretriever()
        if index is None:
            if tokenizer is None:
                raise ValueError("aded-reference needs an index file or a tokenizer to build one")
            index = build_reference_index(tokenizer, corpus)
        if not Path(index).is_file():
            raise ValueError(f"reference index {index} does not exist")
        self.reader = module.Reader(index_file_path=str(index))
        self.max_depth = max_depth

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        if max_nodes <= 0 or len(context_ids) == 0:
            return DraftTree.empty()
        result = self.reader.search([int(t) for t in context_ids], choices=max_nodes)
        paths = result[0] if result else []
        builder = TreeBuilder(max_nodes)
        for path in paths:
            tokens = [int(t) for t in path if t >= 0][: self.max_depth]
            builder.add_path(tokens, source=self.name)
            if builder.full:
                break
        return builder.build()


def build_reference_index(tokenizer: Any, corpus: Sequence[str | os.PathLike] | None = None,
                          cache: str | os.PathLike | None = None) -> Path:
    """Index the corpus (default: our default datastore's) with draftretriever's writer, once."""
    from aded.paths import cache_dir
    from aded.progress import status
    from aded.store.build import batch_encoder
    from aded.store.corpus import corpus_files, iter_documents
    from aded.store.datastore import tokenizer_identity
    from aded.store.default import default_corpus

    identity = tokenizer_identity(tokenizer)
    files = corpus_files(corpus) if corpus else default_corpus()
    tag = f"{len(files)}-{sum(f.size for f in files)}"
    path = Path(cache or cache_dir() / "reference") / f"{identity.vocab_hash[:16]}-{tag}.idx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = batch_encoder(tokenizer)
    partial = path.with_suffix(".partial")
    with status(f"Indexing {len(files)} corpus files for aded-reference into {path}"):
        writer = _draftretriever().Writer(file_path=str(partial), vocab_size=identity.vocab_size)
        for file in files:
            documents = list(iter_documents(file))
            for start in range(0, len(documents), 512):
                for ids in encode(documents[start : start + 512]):
                    if len(ids) >= 3:
                        writer.add_entry([int(t) for t in ids])
        writer.finalize()
    os.replace(partial, path)
    return path
