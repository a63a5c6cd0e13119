"""Draft trees for tests, written as the token paths they hold."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aded.tree import DraftTree, TreeBuilder


def tree_of(paths: Iterable[Sequence[int]]) -> DraftTree:
    """Merge token paths into a trie, in the given order (a shared prefix is one set of nodes)."""
    builder = TreeBuilder()
    for path in paths:
        builder.add_path(path)
    return builder.build()
