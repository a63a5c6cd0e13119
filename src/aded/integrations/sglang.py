"""An aded draft tree in SGLang's NGRAM format: flat tokens plus a tree mask per request.

SGLang's NGRAM speculative worker (`sglang/srt/speculative/ngram_worker.py`, its C++ cache's
`fillResult`) verifies, per request, exactly `draft_token_num` = n tokens laid out as

    tokens [n]     index 0 is the root (the last committed token), then the draft nodes in
                   breadth-first order; unused slots are padding token 0 hanging off the root
    mask   [n, n]  mask[i, j] = 1 when j is i itself or one of its ancestors (the root included)

and a batch is the concatenation: tokens [bs * n], mask [bs * n * n], flattened row-major.
SGLang derives positions and retrieve indices from the mask (`reconstruct_indices_from_tree_mask`),
so tokens and mask are the whole interface. A plugin algorithm that calls `to_ngram_batch` where
the worker calls `NgramCache.batch_get` verifies aded's trees unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aded.tree import DraftTree

__all__ = ["leaf_paths", "to_ngram_batch", "to_ngram_format"]

PAD_TOKEN = 0


def to_ngram_format(tree: DraftTree, root_id: int, draft_token_num: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] int64, mask [n, n] uint8) for one request; the tree is cut to its n - 1 best nodes.

    Drafters add nodes best first and parents before children, so the first n - 1 indices are the
    best parent-closed subtree; they are then laid out breadth first, as SGLang's cache does.
    """
    if draft_token_num < 1:
        raise ValueError(f"draft_token_num must be at least 1, got {draft_token_num}")
    kept = tree.subtree(range(min(len(tree), draft_token_num - 1)))
    order = sorted(range(len(kept)), key=lambda i: (int(kept.depths[i]), i))  # breadth first, stable
    row = {node: position for position, node in enumerate(order)}  # tree node -> node of the layout
    parents = np.array([row[p] if p >= 0 else -1 for p in kept.parents[order].tolist()], dtype=np.int64)
    layout = DraftTree(kept.token_ids[order], parents)
    n, m = draft_token_num, len(layout)
    tokens = np.full(n, PAD_TOKEN, dtype=np.int64)  # [n]
    tokens[0], tokens[1 : m + 1] = int(root_id), layout.token_ids
    mask = np.zeros((n, n), dtype=np.uint8)  # [n, n]
    mask[: m + 1, : m + 1] = layout.verify_mask  # (root, nodes): each row sees the root and its ancestors
    pads = np.arange(m + 1, n)  # padding hangs off the root
    mask[pads, 0] = 1
    mask[pads, pads] = 1
    return tokens, mask


def to_ngram_batch(trees: Sequence[DraftTree], root_ids: Sequence[int], draft_token_num: int) -> tuple[np.ndarray, np.ndarray]:
    """What `NgramCache.batch_get` returns: tokens [bs * n] and mask [bs * n * n], flat."""
    if len(trees) != len(root_ids):
        raise ValueError(f"{len(trees)} trees but {len(root_ids)} root tokens")
    if not trees:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    parts = [to_ngram_format(tree, root, draft_token_num) for tree, root in zip(trees, root_ids)]
    return np.concatenate([t for t, _ in parts]), np.concatenate([m.reshape(-1) for _, m in parts])


def leaf_paths(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Token paths (root first) of the rows that are no other row's ancestor: how SGLang reads a draft."""
    n = len(tokens)
    mask = np.asarray(mask).reshape(n, n).astype(bool)
    is_ancestor = mask.sum(axis=0) > 1  # column j set in some row other than j itself
    return [[int(tokens[j]) for j in np.flatnonzero(mask[i])] for i in range(n) if not is_ancestor[i]]
