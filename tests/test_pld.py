import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aded.drafters.pld import PromptLookupDrafter


def test_drafts_what_followed_the_longest_match():
    drafter = PromptLookupDrafter(max_ngram=3, max_depth=4)
    context = [1, 2, 3, 4, 5, 6, 9, 2, 3]
    tree = drafter.propose(context, 10)
    assert tree.path_tokens(len(tree) - 1) == [4, 5, 6, 9]
    assert tree.is_chain


def test_different_continuations_become_branches_best_supported_first():
    drafter = PromptLookupDrafter(max_ngram=2, max_depth=2)
    context = [7, 8, 1, 1, 7, 8, 2, 2, 7, 8, 1, 3, 7, 8]
    tree = drafter.propose(context, 10)
    first_level = {int(tree.token_ids[i]): float(tree.scores[i]) for i in range(len(tree))
                   if tree.parents[i] == -1}
    assert first_level == {1: 2 / 3, 2: 1 / 3}
    assert tree.token_ids[0] == 1  # the continuation two occurrences agree on comes first


def test_budget_and_no_match():
    drafter = PromptLookupDrafter()
    assert len(drafter.propose([1, 2, 3, 4], 8)) == 0
    context = list(range(20)) * 3
    assert len(drafter.propose(context, 3)) == 3
    assert len(drafter.propose(context, 0)) == 0


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 59))
@settings(max_examples=60, deadline=None)
def test_incremental_index_equals_a_fresh_one(tokens, split):
    split = min(split, len(tokens))
    incremental = PromptLookupDrafter()
    incremental.begin(tokens[:split])
    incremental.propose(tokens[:split], 8)
    grown = incremental.propose(tokens, 8)
    fresh = PromptLookupDrafter().propose(tokens, 8)
    assert grown.token_ids.tolist() == fresh.token_ids.tolist()
    assert grown.parents.tolist() == fresh.parents.tolist()


@given(st.lists(st.integers(0, 4), min_size=2, max_size=40))
@settings(max_examples=60, deadline=None)
def test_every_draft_path_really_followed_a_match(tokens):
    drafter = PromptLookupDrafter(max_ngram=3, min_ngram=1, max_depth=5)
    tree = drafter.propose(tokens, 16)
    text = np.asarray(tokens)
    for leaf in tree.leaves():
        path = tree.path_tokens(leaf)
        # the path follows some earlier occurrence of the context's last token
        windows = [tokens[i + 1 : i + 1 + len(path)] for i in range(len(tokens) - 1)
                   if tokens[i] == tokens[-1]]
        assert any(w[: len(path)] == path for w in windows), (tokens, path)
    assert len(text) == len(tokens)
