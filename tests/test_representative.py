"""The layered representative: request, model evidence, learned and corpus layers; bounds; state files."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aded.drafters.counts import CountTable
from aded.drafters.representative import LEVELS, Representative, RepresentativeConfig
from aded.store.build import NgramCounter
from aded.store.datastore import Datastore, TokenizerIdentity

V = 20
IDENTITY = TokenizerIdentity("t", V, "vocab")


def corpus_store(*docs: list[int]) -> Datastore:
    counter = NgramCounter(V)
    for doc in docs:
        counter.add(doc)
    return Datastore(counter.finish(), IDENTITY)


def probs(rep: Representative, tail) -> dict[int, float]:
    return {c.token: c.prob for c in rep.candidates(tail, limit=20)}


def test_request_layer_copies_from_the_prompt():
    rep = Representative()
    rep.begin([1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 9])
    best = rep.candidates([7, 2, 3, 4])[0]  # (2, 3, 4) occurs twice in the prompt
    assert LEVELS[best.level] == "request-3" and best.supported and best.token in (5, 6)
    top = rep.candidates([1, 2, 3, 4])  # longest match: both followers, equally often
    assert {c.token for c in top[:2]} == {5, 6} and top[0].prob == pytest.approx(top[1].prob)


def test_longer_context_beats_shorter():
    rep = Representative()
    rep.begin([8, 1, 2, 5, 9, 1, 2, 6, 9, 1, 2, 6])
    assert rep.candidates([8, 1, 2])[0].token == 5  # order 3 knows (8, 1, 2) -> 5
    rep.begin([7, 8, 1, 2, 5, 3, 8, 1, 2, 6, 3, 8, 1, 2, 6])
    long = rep.candidates([7, 8, 1, 2])[0]
    assert long.token == 5 and LEVELS[long.level] == "request-long"  # order 4 beats order 3
    assert rep.candidates([0, 1, 2])[0].token == 6  # order 2 only: 6 is more frequent


def test_corpus_tri_gram_then_bigram_back_off():
    rep = Representative(corpus_store([1, 2, 3, 1, 2, 3, 1, 2, 4, 7, 2, 5]))
    rep.begin([])
    top = rep.candidates([1, 2])
    assert top[0].token == 3 and LEVELS[top[0].level] == "corpus"
    # (1, 2) -> 3 twice in 3; below it the bigram 2 -> 3 (twice in 4), each level escaping with beta 2
    assert top[0].prob == pytest.approx((2 + 2.0 * (2 / (4 + 2.0))) / (3 + 2.0))
    backed = rep.candidates([9, 2])  # (9, 2) never occurs: bigram back-off on 2
    assert LEVELS[backed[0].level] == "bigram" and {c.token for c in backed} == {3, 4, 5}
    assert rep.candidates([]) == [] and rep.candidates([19, 19]) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, V - 1), max_size=60), st.lists(st.integers(0, V - 1), min_size=1, max_size=5))
def test_probabilities_are_a_sub_distribution(history, tail):
    rep = Representative(corpus_store(history[::-1]))
    rep.begin(history)
    found = rep.candidates(tail, limit=V)
    assert all(0.0 < c.prob <= 1.0 for c in found)
    assert sum(c.prob for c in found) <= 1.0 + 1e-9
    assert [c.prob for c in found] == sorted((c.prob for c in found), reverse=True)


def test_model_topk_evidence_and_rejections():
    rep = Representative()
    rep.begin([1, 2, 3])
    for _ in range(2):  # the model said 7 after (1, 2) twice; rank 2 unknown, rank 3 is 4
        rep.add_model_topk([5, 1, 2], [7, -1, 4])
    got = probs(rep, [0, 1, 2])
    assert got[7] > got[3] > got[4] > 0
    rep.reject([1, 2], 7)
    rep.reject([1, 2], 7)
    assert probs(rep, [0, 1, 2])[7] == pytest.approx(got[7] * 0.25)


def test_learning_across_requests_with_decay():
    config = RepresentativeConfig(decay=0.5, min_count=0.2)
    rep = Representative(config=config)
    rep.begin([8, 9, 9])
    rep.sync([8, 9, 9, 1, 2, 3, 1, 2, 3])  # the output
    rep.end()
    rep.begin([])
    top = rep.candidates([1, 2])
    assert top[0].token == 3 and LEVELS[top[0].level] == "learned"
    assert rep.learned.followers((1, 2)) == pytest.approx({3: 1.0})  # 2 occurrences, decayed once by 0.5
    assert rep.learned.followers(2) == pytest.approx({3: 1.0})
    assert (8, 9) not in rep.learned.tri and (9, 9) in rep.learned.tri  # only what the model said
    for _ in range(3):
        rep.end()
    assert rep.learned.followers((1, 2)) == pytest.approx({3: 0.125})
    rep.compact()  # 0.125 < min_count: dropped
    assert rep.learned.tri == {} and rep.learned.bi == {}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, V - 1), max_size=40), min_size=1, max_size=6))
def test_learned_memory_is_bounded(requests):
    config = RepresentativeConfig(max_contexts=7, max_successors=2, decay=0.9, compact_every=3)
    rep = Representative(config=config)
    for output in requests:
        rep.begin([0])
        rep.sync([0] + output)
        rep.add_model_topk(output[-2:], list(range(6)))
        rep.end()
        assert len(rep.learned.tri) <= 1.25 * 7 and len(rep.learned.bi) <= 1.25 * 7
        if rep._pending == 0:  # just compacted (every 3 requests, or earlier when overfull)
            assert len(rep.learned.tri) <= 7 and all(len(f) <= 2 for f in rep.learned.tri.values())


def test_deterministic():
    def feed() -> list:
        rep = Representative(corpus_store([3, 4, 5, 3, 4, 6]))
        rep.begin([1, 2, 3, 4, 5])
        rep.sync([1, 2, 3, 4, 5, 3, 4, 7])
        rep.add_model_topk([4, 7], [1, 2, 3])
        rep.end()
        return [rep.candidates(t) for t in ([3, 4], [4, 7], [1, 2], [5])]

    assert feed() == feed()


def test_sync_restarts_on_a_different_context():
    rep = Representative()
    rep.begin([1, 2, 3])
    rep.sync([1, 2, 3, 4])
    assert rep.history == [1, 2, 3, 4]
    rep.sync([5, 6])
    assert rep.history == [5, 6]


def test_learned_counts_round_trip_as_arrays():
    rep = Representative()
    rep.begin([0])
    rep.sync([0, 1, 2, 3, 1, 2, 3])
    rep.end()
    other = Representative()
    other.learned.load_arrays(rep.learned.to_arrays())
    for context in [(1, 2), (2, 3), 2, 3]:
        assert other.learned.followers(context) == pytest.approx(rep.learned.followers(context))
    assert other.candidates([1, 2]) == rep.candidates([1, 2])


def test_shared_learned_table_is_one_object():
    shared = CountTable()
    first, second = Representative(learned=shared), Representative(learned=shared)
    first.begin([0])
    first.sync([0, 4, 5, 6, 4, 5, 6])
    first.end()
    second.begin([0])
    assert second.candidates([4, 5])[0].token == 6  # learned by the first, read by the second


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_order"):
        RepresentativeConfig(max_order=1)
    with pytest.raises(ValueError, match="decay"):
        RepresentativeConfig(decay=0.0)


@given(st.lists(st.tuples(st.dictionaries(st.integers(0, 9), st.floats(0.5, 50), max_size=6),
                          st.floats(0.1, 5), st.one_of(st.none(), st.floats(60, 200))), max_size=6))
@settings(max_examples=200, deadline=None)
def test_interpolation_in_one_pass_equals_the_recursive_blend(levels):
    """p = (n(c) + beta * p_below(c)) / (N + beta), most specific level first, computed the slow way."""
    from aded.drafters.representative import _interpolate

    expected: dict[int, float] = {}
    for counts, beta, total in reversed(levels):
        if not counts:
            continue
        norm = (total if total else sum(counts.values())) + beta
        expected = {c: (counts.get(c, 0.0) + beta * expected.get(c, 0.0)) / norm for c in set(expected) | set(counts)}
    got = _interpolate(levels)
    assert set(got) == set(expected)
    assert all(abs(got[c] - expected[c]) <= 1e-12 + 1e-9 * expected[c] for c in got)
