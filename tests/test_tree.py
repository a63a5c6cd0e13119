import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trees import tree_of

from aded.tree import DraftTree, TreeBuilder


def test_shared_prefixes_merge_and_the_layout_is_derived():
    tree = tree_of([[1, 2, 3], [1, 4], [5]])
    assert tree.token_ids.tolist() == [1, 2, 3, 4, 5]
    assert tree.parents.tolist() == [-1, 0, 1, 0, -1]
    assert tree.depths.tolist() == [1, 2, 3, 2, 1]
    assert tree.position_offsets.tolist() == [0, 1, 2, 3, 2, 1]
    assert tree.path_tokens(2) == [1, 2, 3]
    assert tree.paths == ((1,), (1, 2), (1, 2, 3), (1, 4), (5,))
    assert tree.leaves() == [2, 3, 4]
    assert not tree.is_chain
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 1],
    ], dtype=bool)
    assert (tree.verify_mask == expected).all()


def test_longest_match_and_chain():
    tree = tree_of([[1, 2, 3], [1, 4, 6]])
    assert tree.longest_match([1, 4, 7]) == [0, 3]
    assert tree.longest_match([9]) == []
    chain = DraftTree.chain([7, 8, 9])
    assert chain.is_chain and chain.depths.tolist() == [1, 2, 3]


@pytest.mark.parametrize("tokens,parents,message", [
    ([1, 2], [-1], "parents"),
    ([1, 2], [0, -1], "earlier"),
    ([1], [-2], "earlier"),
    ([1, 1], [-1, -1], "duplicate"),
    ([-3], [-1], "non-negative"),
])
def test_invalid_trees_are_rejected(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(np.array(tokens), np.array(parents))


def test_derived_buffers_are_read_only():
    tree = tree_of([[1, 2]])
    with pytest.raises(ValueError):
        tree.position_offsets[0] = 5


def test_builder_respects_budget_and_keeps_best_score():
    builder = TreeBuilder(max_nodes=3)
    assert builder.add_path([1, 2], scores=[0.5, 0.4], source="a") == 2
    assert builder.add_path([1, 3, 4], scores=[0.9, 0.3, 0.2], source="b") == 2
    tree = builder.build()
    assert len(tree) == 3
    assert tree.scores.tolist() == [0.9, 0.4, 0.3]
    assert tree.sources == ("a", "a", "b")


@st.composite
def trees(draw):
    n = draw(st.integers(0, 20))
    parents, tokens = [], []
    for i in range(n):
        parents.append(draw(st.integers(-1, i - 1)))
        tokens.append(draw(st.integers(0, 50)))
    builder = TreeBuilder()
    node_of = {}
    for i, (p, t) in enumerate(zip(parents, tokens)):
        node_of[i] = builder.add(node_of.get(p, -1) if p >= 0 else -1, t)
    return builder.build()


@given(trees(), st.data())
@settings(max_examples=80, deadline=None)
def test_subtree_and_masks_agree_with_paths(tree, data):
    for i in range(len(tree)):
        path = tree.path_to(i)
        assert set(np.flatnonzero(tree.ancestor_mask[i]).tolist()) == set(path)
        assert tree.depths[i] == len(path)
        assert tree.paths[i] == tuple(tree.path_tokens(i))
    if len(tree):
        keep_leaf = data.draw(st.integers(0, len(tree) - 1))
        keep = tree.path_to(keep_leaf)
        sub = tree.subtree(keep)
        assert sub.path_tokens(len(sub) - 1) == tree.path_tokens(keep_leaf)
