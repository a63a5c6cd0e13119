"""SuffixIndex against a brute-force suffix trie on random token sequences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aded.drafters.suffix_index import SuffixIndex

tokens = st.lists(st.integers(0, 3), min_size=0, max_size=60)


def brute_match(sequences: list[list[int]], query: list[int], max_depth: int):
    """(length, count, {child token: (count, child count)}) of the longest matching query suffix."""
    for length in range(min(max_depth, len(query)), 0, -1):
        pattern = query[-length:]
        follow = [
            seq[i + length : i + length + 2]
            for seq in sequences
            for i in range(len(seq) - length)
            if seq[i : i + length] == pattern
        ]
        if follow:
            children = {}
            for token in {f[0] for f in follow}:
                children[token] = (
                    sum(f[0] == token for f in follow),
                    sum(f[0] == token and len(f) == 2 for f in follow),
                )
            return length, len(follow), children
    return None


def index_match(index: SuffixIndex, query: list[int]):
    match = index.match(query)
    if match is None:
        return None
    children = {c.token: (c.count, len(c.ends)) for c in index.children(match.ends)}
    return match.length, match.count, children


@settings(max_examples=200, deadline=None)
@given(
    sequences=st.lists(tokens, min_size=1, max_size=3),
    query=tokens,
    max_depth=st.sampled_from([8, 12, 20]),
)
def test_match_equals_brute_force(sequences, query, max_depth):
    index = SuffixIndex(max_depth=max_depth)
    for seq in sequences:
        index.add_sequence(seq)
    assert index_match(index, query) == brute_match(sequences, query, max_depth)


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.integers(0, 2), min_size=1, max_size=80))
def test_self_match_is_longest_repeat_with_continuation(text):
    """The per-request use: the context is the indexed text itself, its own end never matches."""
    index = SuffixIndex(max_depth=16)
    index.extend(text)
    assert index_match(index, text) == brute_match([text], text, 16)


@settings(max_examples=50, deadline=None)
@given(text=st.lists(st.integers(0, 3), min_size=2, max_size=80), cut=st.integers(1, 79))
def test_incremental_updates_equal_rebuild(text, cut):
    cut = min(cut, len(text) - 1)
    grown = SuffixIndex(max_depth=12)
    grown.extend(text[:cut])
    grown.match(text[:cut])  # queries in between must not disturb anything
    grown.extend(text[cut:])
    rebuilt = SuffixIndex(max_depth=12)
    rebuilt.extend(text)
    for end in range(1, len(text) + 1):
        assert index_match(grown, text[:end]) == index_match(rebuilt, text[:end])
    assert grown._index == rebuilt._index


def test_worked_example_from_docstring():
    a, b, c, d = 0, 1, 2, 3
    index = SuffixIndex(max_depth=8)
    index.extend([a, b, c, a, b, d, a, b])
    match = index.match([a, b, c, a, b, d, a, b])
    assert match.length == 2 and match.ends.tolist() == [2, 5]
    children = index.children(match.ends)
    assert [(x.token, x.count, x.ends.tolist()) for x in children] == [(d, 1, [6]), (c, 1, [3])]


def test_eviction_keeps_the_newest_sequences_and_no_stale_entries():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 5, size=int(rng.integers(5, 40))).tolist() for _ in range(30)]
    index = SuffixIndex(max_depth=10, max_tokens=100)
    for seq in sequences:
        index.add_sequence(seq)
        assert len(index) <= 100 or len(index.sequences()) == 1
    live = [s.tolist() for s in index.sequences()]
    assert live == sequences[-len(live) :]
    assert sum(map(len, live)) <= 100 < sum(map(len, sequences[-len(live) - 1 :]))
    fresh = SuffixIndex(max_depth=10)
    for seq in live:
        fresh.add_sequence(seq)
    assert entries(index) == entries(fresh)  # evicted n-grams left the lists, nothing stale
    for _ in range(200):
        query = rng.integers(0, 5, size=12).tolist()
        assert index_match(index, query) == brute_match(live, query, 10)


def entries(index: SuffixIndex) -> dict[int, list[int]]:
    """The n-gram lists with positions relative to the first live sequence."""
    first = index._spans[0][0]
    return {
        key: [p - first for p in ([found] if isinstance(found, int) else found)]
        for key, found in index._index.items()
    }


def test_state_arrays_round_trip():
    index = SuffixIndex(max_depth=10, max_tokens=50)
    for seq in ([1, 2, 3, 1, 2, 4], [5, 1, 2, 3], [7, 7, 7]):
        index.add_sequence(seq)
    state = index.state_arrays()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    loaded = SuffixIndex.from_state_arrays(state)
    assert [s.tolist() for s in loaded.sequences()] == [s.tolist() for s in index.sequences()]
    assert loaded.max_tokens == 50 and loaded.max_depth == 10
    for query in ([1, 2], [9, 1, 2, 3], [7, 7]):
        assert index_match(loaded, query) == index_match(index, query)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="ngram_sizes"):
        SuffixIndex(ngram_sizes=(2, 4))
    with pytest.raises(ValueError, match="max_depth 3"):
        SuffixIndex(max_depth=3)
    with pytest.raises(ValueError, match="-2"):
        SuffixIndex().append(-2)
    with pytest.raises(ValueError, match="lacks"):
        SuffixIndex.from_state_arrays({"tokens": np.zeros(1)})
