"""The hybrid drafter: one budget, merged sources, calibration toward the source that is right."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from aded.drafters import DRAFTERS, make_drafter
from aded.drafters.base import Drafter, StepFeedback
from aded.drafters.hybrid import HybridDrafter, default_sources
from aded.replay import Recorded, replay
from aded.tree import DraftTree


class Oracle(Drafter):
    """Knows the recorded output: proposes the true next `depth` tokens (or wrong ones)."""

    def __init__(self, name: str, output: Sequence[int], prompt_len: int, wrong: bool = False) -> None:
        self.name = name
        self.text = list(output)
        self.prompt_len = prompt_len
        self.wrong = wrong
        self.seen: list[StepFeedback] = []

    def propose(self, context_ids, max_nodes):
        pos = len(context_ids) - self.prompt_len
        tokens = self.text[pos : pos + 3]
        if self.wrong:
            tokens = [t + 1000 for t in tokens]
        return DraftTree.chain(tokens[:max_nodes])

    def observe(self, feedback):
        self.seen.append(feedback)


def oracle_pair(output, prompt_len):
    return [Oracle("good", output, prompt_len), Oracle("bad", output, prompt_len, wrong=True)]


def test_registered_and_works_without_aded(monkeypatch):
    assert isinstance(make_drafter("hybrid", sources=["pld", "suffix"]), HybridDrafter)
    monkeypatch.setitem(DRAFTERS, "aded", "aded.drafters.no_such_module:AdedDrafter")
    assert default_sources() == ["edit", "suffix"]
    monkeypatch.delitem(DRAFTERS, "aded")
    drafter = HybridDrafter()
    assert [s.name for s in drafter.sources] == ["edit", "suffix"]
    with pytest.raises(ValueError, match="own sources"):
        HybridDrafter(["hybrid"])


def test_budget_is_respected_and_scores_non_increasing():
    rng = np.random.default_rng(0)
    text = rng.integers(0, 8, size=300).tolist()
    drafter = HybridDrafter(["pld", "suffix"])
    drafter.begin(text[:200])
    for end in range(200, 300, 7):
        for budget in (0, 1, 3, 8, 16):
            tree = drafter.propose(text[:end], budget)
            assert len(tree) <= budget
            if len(tree):
                has_parent = tree.parents >= 0
                assert np.all(tree.scores[has_parent] <= tree.scores[tree.parents[has_parent]])
                assert np.all((tree.scores > 0) & (tree.scores <= 1))


def test_calibration_moves_toward_the_source_that_gets_accepted():
    rng = np.random.default_rng(1)
    prompt, output = [1, 2, 3], rng.integers(0, 50, size=300).tolist()
    good, bad = oracle_pair(output, len(prompt))
    drafter = HybridDrafter([bad, good])  # the wrong one is listed first
    drafter.begin(prompt)
    first = drafter.propose(prompt + output[:1], 2)
    before = {s: first.scores[i] for i, s in enumerate(first.sources) if first.parents[i] < 0}
    assert before["good"] == pytest.approx(before["bad"])  # no evidence yet: same prior
    stats = replay(drafter, [Recorded(prompt, output)], 2)["all"]
    assert stats.mean_accepted_tokens > 2.5
    drafter.begin(prompt)
    tree = drafter.propose(prompt + output[:1], 2)
    assert [s for s in tree.sources] == ["good", "good"]  # the budget goes to the good source
    good_cell, bad_cell = (("good",), 2), (("bad",), 2)  # unscored chains: confidence 0.5, bucket 2
    assert drafter.calibrator.rate(good_cell, 0.4) > 0.9
    assert drafter.calibrator.rate(bad_cell, 0.4) < 0.1
    # proposals the budget left out are judged too, so the losing source is not starved of evidence
    assert drafter.calibrator.tried(bad_cell) > 40


def test_each_source_sees_its_own_verified_nodes():
    output = list(range(10, 40))
    good, bad = oracle_pair(output, 2)
    drafter = HybridDrafter([good, bad])
    replay(drafter, [Recorded([1, 2], output)], 8)
    for feedback in good.seen:
        assert feedback.accepted_ids == tuple(feedback.tree.token_ids[list(feedback.accepted_nodes)])
        assert set(feedback.tree.token_ids.tolist()) <= set(output)
    assert any(len(f.accepted_ids) for f in good.seen)
    assert all(len(f.accepted_ids) == 0 for f in bad.seen)


def test_replay_is_deterministic():
    rng = np.random.default_rng(3)
    records = [Recorded(rng.integers(0, 20, 80).tolist(), rng.integers(0, 20, 120).tolist()) for _ in range(3)]
    runs = [replay(HybridDrafter(["pld", "suffix"]), records, 8)["all"].accepted_lengths for _ in range(2)]
    assert runs[0] == runs[1]


def test_learned_state_round_trips_as_plain_arrays():
    rng = np.random.default_rng(4)
    records = [Recorded(rng.integers(0, 20, 60).tolist(), rng.integers(0, 20, 100).tolist()) for _ in range(3)]
    drafter = HybridDrafter(["pld", "suffix"])
    replay(drafter, records, 8)
    state = drafter.state_dict()
    assert {"hybrid/calibration", "suffix/tokens", "suffix/calibration"} <= set(state)
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    restored = HybridDrafter(["pld", "suffix"])
    restored.load_state_dict(state)
    probe = Recorded(records[0].prompt_token_ids, records[1].output_token_ids)
    assert replay(restored, [probe], 8)["all"].accepted_lengths == replay(drafter, [probe], 8)["all"].accepted_lengths


def test_foreign_state_is_refused_and_siblings_share_learning():
    drafter = HybridDrafter(["pld", "suffix"])
    with pytest.raises(ValueError, match="no source"):
        drafter.load_state_dict({"aded/learned_tri_keys": np.zeros((0, 3), dtype=np.int64)})
    sibling = drafter.spawn()
    assert sibling.sources[1].global_index is drafter.sources[1].global_index
    assert sibling.calibrator is drafter.calibrator and sibling.sources is not drafter.sources


class Searching(Oracle):
    """An expensive source (a search, like ADED's) that counts the steps it was asked to draft."""

    expensive = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked = 0

    def propose(self, context_ids, max_nodes):
        self.asked += max_nodes > 0
        return super().propose(context_ids, max_nodes)


def test_the_expensive_source_is_asked_only_when_the_cheap_ones_are_unsure():
    """Cheap sources first: once the calibration trusts a cheap source that keeps being right, the
    search is skipped on the steps where that source drafts; where the cheap ones draft nothing
    (or are wrong and distrusted), it is asked every step."""
    rng = np.random.default_rng(3)
    output = rng.integers(10, 500, size=400).tolist()
    record = Recorded([1, 2, 3], output, "all", "q", len(output))
    for cheap_is_right, most_asked in ((True, 0.2), (False, 1.0)):
        search = Searching("search", output, 3)
        hybrid = HybridDrafter([Oracle("cheap", output, 3, wrong=not cheap_is_right), search])
        stats = replay(hybrid, [record], 8)["all"]
        share = search.asked / stats.steps
        assert share <= most_asked if cheap_is_right else share == 1.0, share
    # confident=1 asks every source every step (the behaviour before the cheap-first rule)
    search = Searching("search", output, 3)
    stats = replay(HybridDrafter([Oracle("cheap", output, 3), search], confident=1.0), [record], 8)["all"]
    assert search.asked == stats.steps
    with pytest.raises(ValueError, match="confident"):
        HybridDrafter(["pld"], confident=1.5)


def test_the_search_is_asked_every_step_where_steps_verify_trees():
    """A search whose drafts branch off the lookups' path is gated where steps verify one path
    (llama.cpp's chains), and asked every step where they verify trees (its branches land there)."""
    rng = np.random.default_rng(4)
    output = rng.integers(10, 500, size=400).tolist()
    record = Recorded([1, 2, 3], output, "all", "q", len(output))
    shares = {}
    for leaves in (1, None):  # chains, any tree
        search = Searching("search", output, 3, wrong=True)
        stats = replay(HybridDrafter([Oracle("cheap", output, 3), search]), [record], 8, max_leaves=leaves)["all"]
        shares[leaves] = search.asked / stats.steps
    assert shares[1] <= 0.2 and shares[None] > 0.9, shares
