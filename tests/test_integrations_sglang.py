"""aded trees in SGLang's NGRAM layout (flat tokens + tree mask), checked against its documented rules."""

from __future__ import annotations

import numpy as np
import pytest

from aded.integrations.sglang import leaf_paths, to_ngram_batch, to_ngram_format
from aded.tree import DraftTree


def sample_tree() -> DraftTree:
    # drafts "a b c" and "a d" and "e": a=1 b=2 c=3 d=4 e=5
    return DraftTree(np.array([1, 2, 3, 4, 5]), np.array([-1, 0, 1, 0, -1]))


def test_layout_is_root_then_breadth_first_with_ancestor_mask():
    tokens, mask = to_ngram_format(sample_tree(), root_id=99, draft_token_num=8)
    assert tokens.tolist() == [99, 1, 5, 2, 4, 3, 0, 0]  # depth 1: a e; depth 2: b d; depth 3: c; padding
    assert mask.shape == (8, 8) and mask[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert (mask[:, 0] == 1).all() and (np.diag(mask) == 1).all()  # everyone sees the root and itself
    assert mask[5].tolist() == [1, 1, 0, 1, 0, 1, 0, 0]  # c sees root, a, b, itself
    assert mask[6].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]  # padding hangs off the root
    # depth (what SGLang derives positions from) = row sum - 1
    assert (mask.sum(axis=1) - 1).tolist() == [0, 1, 1, 2, 2, 3, 1, 1]


def test_leaf_paths_recover_the_tree():
    tokens, mask = to_ngram_format(sample_tree(), root_id=99, draft_token_num=6)
    assert sorted(leaf_paths(tokens, mask)) == sorted([[99, 5], [99, 1, 2, 3], [99, 1, 4]])


def test_large_trees_are_cut_to_their_best_parent_closed_nodes():
    tokens, mask = to_ngram_format(sample_tree(), root_id=7, draft_token_num=4)
    assert tokens.tolist() == [7, 1, 2, 3]  # the first three nodes: a b c (parents come first)
    assert leaf_paths(tokens, mask) == [[7, 1, 2, 3]]


def test_batch_is_flat_and_an_empty_tree_is_all_padding():
    tokens, mask = to_ngram_batch([sample_tree(), DraftTree.empty()], [99, 42], draft_token_num=4)
    assert tokens.shape == (8,) and mask.shape == (32,)
    assert tokens[4:].tolist() == [42, 0, 0, 0]
    assert mask.reshape(2, 4, 4)[1].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    with pytest.raises(ValueError):
        to_ngram_batch([sample_tree()], [], 4)
    with pytest.raises(ValueError):
        to_ngram_format(sample_tree(), 1, 0)
