"""The ADED drafter: MCTS finds the best tree, scores, budgets, determinism, learning, defaults."""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest

from aded.drafters import make_drafter
from aded.drafters.aded import AdedDrafter, ProbabilityCalibrator
from aded.drafters.base import StepFeedback
from aded.drafters.representative import Representative
from aded.drafters.state_file import StateError, StateFile
from aded.replay import Recorded, replay
from aded.store.build import NgramCounter
from aded.store.datastore import Datastore, TokenizerIdentity

V = 16
IDENTITY = TokenizerIdentity("t", V, "vocab")


def store_from(*docs: list[int]) -> Datastore:
    counter = NgramCounter(V)
    for doc in docs:
        counter.add(doc)
    return Datastore(counter.finish(), IDENTITY)


def best_tree_paths(rep: Representative, context: list[int], max_nodes: int, max_depth: int) -> dict:
    """Exhaustive best-first over the representative: the optimal tree for raw probabilities."""
    heap = [(-c.prob, (c.token,)) for c in rep.candidates(context[-4:], 6)]
    heapq.heapify(heap)
    chosen = {}
    while heap and len(chosen) < max_nodes:
        neg, path = heapq.heappop(heap)
        chosen[path] = -neg
        if len(path) < max_depth:
            for c in rep.candidates((context + list(path))[-4:], 6):
                heapq.heappush(heap, (neg * c.prob, path + (c.token,)))
    return chosen


def tree_paths(tree) -> dict:
    return {tuple(tree.path_tokens(i)): float(tree.scores[i]) for i in range(len(tree))}


@pytest.fixture
def branching_store() -> Datastore:
    # after (1, 2): 3 (x6), 4 (x4), 5 (x1); after (2, 3): 6 (x5), 7 (x1); after (2, 4): 8 (x3), 9; ...
    docs = [[1, 2, 3, 6, 9]] * 5 + [[1, 2, 3, 7, 10], [1, 2, 4, 8, 11], [1, 2, 4, 8, 11], [1, 2, 4, 8, 12],
                                    [1, 2, 4, 9, 11], [1, 2, 5, 13, 14]]  # fmt: skip
    return store_from(*docs)


@pytest.mark.parametrize("max_nodes", [1, 3, 6, 10])
def test_mcts_finds_the_best_tree(branching_store, max_nodes):
    drafter = AdedDrafter(branching_store, num_simulations=64, topk=0)
    context = [0, 1, 2]
    tree = drafter.propose(context, max_nodes)
    expected = best_tree_paths(drafter.rep, context, max_nodes, drafter.max_depth)
    got = tree_paths(tree)
    assert set(got) == set(expected)
    for path, score in got.items():
        assert score == pytest.approx(expected[path])  # no feedback yet: calibration is the identity


def test_scores_are_path_probabilities_and_non_increasing(branching_store):
    drafter = AdedDrafter(branching_store)
    drafter.begin([1, 2, 3, 6, 9, 1, 2])
    tree = drafter.propose([1, 2, 3, 6, 9, 1, 2], 12)
    assert 0 < len(tree) <= 12 and tree.scores is not None
    for i, parent in enumerate(tree.parents.tolist()):
        assert 0 < tree.scores[i] <= (tree.scores[parent] if parent >= 0 else 1.0)


@pytest.mark.parametrize("max_nodes", [0, 1, 2, 5, 32])
def test_budget_is_respected(branching_store, max_nodes):
    tree = AdedDrafter(branching_store).propose([4, 1, 2], max_nodes)
    assert len(tree) <= max_nodes
    assert AdedDrafter(branching_store).propose([], max_nodes).token_ids.size == 0


def test_a_large_ask_grows_the_search_unless_the_hybrid_turns_it_off():
    # one simulation expands one node, so a path 10 deep needs 10 simulations
    store = store_from(list(range(1, 16)))
    deep = AdedDrafter(store, num_simulations=2).propose([0, 1, 2], 10)
    shallow = AdedDrafter(store, num_simulations=2, simulations_follow_ask=False).propose([0, 1, 2], 10)
    assert deep.max_depth == 10 and deep.is_chain
    assert shallow.max_depth == 2 and list(shallow.token_ids) == list(deep.token_ids[:2])
    hybrid = make_drafter("hybrid", datastore=store)
    assert [s.simulations_follow_ask for s in hybrid.sources if isinstance(s, AdedDrafter)] == [False]


def test_nothing_known_drafts_nothing():
    drafter = AdedDrafter()  # no datastore, no tokenizer: request and learned layers only
    drafter.begin([])
    assert len(drafter.propose([5], 8)) == 0


def synthetic_requests(seed: int, count: int) -> list[Recorded]:
    """Outputs that repeat phrases of their prompt and of a shared 'house style'."""
    rng = random.Random(seed)
    style = [rng.randrange(V) for _ in range(12)]
    requests = []
    for _ in range(count):
        prompt = [rng.randrange(V) for _ in range(20)]
        output = []
        while len(output) < 60:
            choice = rng.random()
            output += prompt[(s := rng.randrange(10)) : s + 6] if choice < 0.4 else style if choice < 0.7 else [rng.randrange(V)]
        requests.append(Recorded(prompt, output))
    return requests


def test_deterministic_given_a_seed(branching_store):
    def trees(seed: int) -> list:
        drafter = AdedDrafter(branching_store, seed=seed)
        out = []
        for record in synthetic_requests(3, 3):
            drafter.begin(record.prompt_token_ids)
            context = list(record.prompt_token_ids) + list(record.output_token_ids[:1])
            for token in record.output_token_ids[1:30]:
                tree = drafter.propose(context, 10)
                out.append((tree.token_ids.tolist(), tree.parents.tolist(), None if tree.scores is None else tree.scores.round(12).tolist()))
                context.append(token)
            drafter.end()
        return out

    assert trees(7) == trees(7)


def test_learning_across_requests_helps():
    records = synthetic_requests(0, 8)
    on = replay(AdedDrafter(seed=1), records, 12)["all"]
    off = replay(AdedDrafter(seed=1, learn=False), records, 12)["all"]
    assert on.mean_accepted_tokens > off.mean_accepted_tokens > 1.2


def test_model_topk_feedback_is_used():
    drafter = AdedDrafter(topk=4)
    drafter.begin([1, 2, 3])
    tree = drafter.propose([1, 2, 3, 1, 2], 4)  # drafts 3 after (1, 2)
    assert tree.path_tokens(0) == [3]
    topk = np.full((len(tree) + 1, 4), -1, dtype=np.int64)
    topk[0] = [9, 3, -1, 5]  # the model says 9 after (1, 2), then 3, ...
    topk[1] = [11, 12, -1, -1]  # after (1, 2, 3) it would say 11 (off the accepted path)
    drafter.observe(StepFeedback((1, 2, 3, 1, 2), tree, (), (), 9, topk))
    top = drafter.rep.candidates([2, 3])  # committed once: 1; said by the model at a rejected node: 11
    assert {top[0].token, top[1].token} == {1, 11}
    drafter.rep.commit([9])
    assert 5 in {c.token for c in drafter.rep.candidates([1, 2])}


def test_calibrator_learns_acceptance_rates():
    calibrator = ProbabilityCalibrator(prior=2.0, decay=1.0)
    assert calibrator(3, True, 0.5) == 0.5  # no evidence: the raw probability
    for i in range(100):
        calibrator.update(3, True, 0.5, accepted=i % 10 == 0)
    assert calibrator(3, True, 0.5) == pytest.approx(0.1, abs=0.02)
    assert calibrator(1, True, 0.5) == 0.5  # other cells untouched
    assert calibrator.depth_factor(1) < 1.0  # the cell over-predicted while it learned
    for _ in range(200):  # deep edges accepted as often as predicted: no correction there
        calibrator.update(0, True, 0.9, accepted=True, depth=6, predicted=0.9)
        calibrator.update(0, True, 0.9, accepted=False, depth=6, predicted=0.9)
    assert calibrator.depth_factor(7) == pytest.approx((200 + 10) / (360 + 10))


def test_save_and_restore_learned_state(tmp_path):
    drafter = AdedDrafter(seed=1)
    replay(drafter, synthetic_requests(0, 3), 8)
    path = tmp_path / "learned.aded"
    StateFile(path, "aded", IDENTITY).save(drafter.state_dict())
    restored = AdedDrafter(store_from([0, 1, 2]), learned=path)
    mine, theirs = restored.rep.learned.to_arrays(), drafter.rep.learned.to_arrays()
    assert len(theirs["learned_tri_keys"]) and all(np.allclose(mine[k], theirs[k]) for k in theirs)
    assert np.array_equal(restored.calibrator.tried, drafter.calibrator.tried)
    StateFile(path, "aded", TokenizerIdentity("other", 9, "different")).save(drafter.state_dict())
    with pytest.raises(StateError, match="tokenizer"):
        AdedDrafter(store_from([0, 1, 2]), learned=path)
    with pytest.raises(ValueError, match="calib_tried"):
        AdedDrafter().load_state_dict({k: v for k, v in drafter.state_dict().items() if k != "calib_tried"})


def test_siblings_share_what_they_learn():
    template = AdedDrafter(seed=1)
    first, second = template.spawn(), template.spawn()
    replay(first, synthetic_requests(0, 3), 8)
    assert second.rep.learned is template.rep.learned and len(template.rep.learned.tri)
    assert second.calibrator is first.calibrator
    assert second.rep.history == []  # the request layer stays per sibling


class WordTokenizer:
    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.name_or_path = "words"

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.get(w, 0) for w in text.split()]


def test_default_datastore_is_built_once_and_used(tmp_path, monkeypatch):
    import aded.store.default as default
    from aded.store.corpus import CorpusFile

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe cat sat down\n")
    monkeypatch.setattr(default, "default_corpus", lambda identity=None: [CorpusFile(corpus, corpus.stat().st_size)])
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = WordTokenizer(["<unk>", "the", "cat", "sat", "on", "mat", "down"])
    path = default.default_datastore_path(tokenizer)
    assert path.is_file() and path.parent == tmp_path / "cache" / "datastores"
    mtime = path.stat().st_mtime_ns
    drafter = make_drafter("aded", tokenizer=tokenizer)
    assert default.default_datastore_path(tokenizer).stat().st_mtime_ns == mtime  # cached
    drafter.begin([])
    assert drafter.propose([1, 2], 4).path_tokens(0) == [3]  # "the cat" -> "sat"


def test_reference_drafter_needs_its_package(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == "draftretriever":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(RuntimeError, match="draftretriever==0.1.1"):
        make_drafter("aded-reference", index="whatever")


def test_reference_drafter_drafts_from_its_index(tmp_path):
    pytest.importorskip("draftretriever")
    from aded.drafters.aded_reference import build_reference_index

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 5)
    tokenizer = WordTokenizer(["<unk>", "the", "cat", "sat", "on", "mat"])
    index = build_reference_index(tokenizer, [corpus], cache=tmp_path / "cache")
    drafter = make_drafter("aded-reference", index=index)
    tree = drafter.propose([4, 1, 2], 6)
    assert 0 < len(tree) <= 6 and tree.path_tokens(0) == [3]
