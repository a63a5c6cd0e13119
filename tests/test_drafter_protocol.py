"""The drafter protocol: lifecycle for every drafter, learned state only for learners, the shared
helpers that follow the context and learn from judged edges."""

from __future__ import annotations

import numpy as np
import pytest
from trees import tree_of

from aded.drafters import DRAFTERS, LearningDrafter, make_drafter
from aded.drafters.base import StepFeedback, load_state, sibling_of
from aded.drafters.calibration import BackoffCalibrator
from aded.drafters.context import continuation
from aded.drafters.oracle import OracleDrafter
from aded.tree import DraftTree


def test_continuation_tells_new_tokens_from_a_restart():
    assert list(continuation([1, 2, 3], [1, 2, 3, 4, 5])) == [4, 5]
    assert list(continuation([], (7, 8))) == [7, 8]
    assert list(continuation((1, 2), (1, 2))) == []
    assert continuation([1, 2, 3], [1, 2]) is None  # shorter: another context
    assert continuation([1, 2, 3], [1, 2, 9, 4]) is None  # the last seen token differs
    # only the last seen token is compared unless every one must be
    assert list(continuation([1, 2, 3], [9, 2, 3, 4])) == [4]
    assert continuation([1, 2, 3], [9, 2, 3, 4], whole=True) is None


@pytest.mark.parametrize("name", ["pld", "suffix", "edit", "aded"])
def test_a_foreign_context_restarts_like_a_fresh_drafter(name):
    text = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    followed, fresh = make_drafter(name), make_drafter(name)
    followed.begin([1, 2, 3, 1, 2])
    followed.propose([1, 2, 3, 1, 2, 3, 1], 8)
    fresh.begin(text[:4])
    for end in range(4, len(text) + 1):
        a, b = followed.propose(tuple(text[:end]), 8), fresh.propose(tuple(text[:end]), 8)
        assert a.paths == b.paths and _scores(a) == _scores(b)


def _scores(tree: DraftTree) -> list[float] | None:
    return None if tree.scores is None else tree.scores.tolist()


def test_only_drafters_that_keep_state_are_learners():
    learners = {name for name in DRAFTERS if name != "aded-reference" and isinstance(make_drafter(name), LearningDrafter)}
    assert learners == {"suffix", "aded", "hybrid"}
    assert not isinstance(OracleDrafter(), LearningDrafter)


def test_a_sibling_shares_what_its_template_learns_and_nothing_of_its_request():
    suffix = make_drafter("suffix")
    suffix.begin([1, 2, 3])
    twin = sibling_of(suffix)
    assert twin.global_index is suffix.global_index and twin._context == [] and suffix._context == [1, 2, 3]
    pld = make_drafter("pld")
    pld.begin([4, 5, 4])
    copy = sibling_of(pld)
    assert copy is not pld and copy._tokens == [] and pld._tokens == [4, 5, 4]


def test_a_drafter_that_learns_nothing_refuses_arrays():
    pld = make_drafter("pld")
    load_state(pld, {})
    with pytest.raises(ValueError, match="learns nothing"):
        load_state(pld, {"tokens": np.zeros(3)})


def test_judged_edges_teach_their_cells():
    """Edges under the root or an accepted node are judged; edges under a rejected node are not."""
    calibrator = BackoffCalibrator()
    tree = tree_of([[1, 2], [3]])
    cells = {path: ((path, "fine"), (path, "coarse")) for path in tree.paths}
    feedback = StepFeedback((9,), tree, (0,), (1,), 4)  # accepted 1, then the model said 4, not 2
    assert feedback.committed == (1, 4)
    calibrator.learn(cells, feedback)
    tried = {path: calibrator.tried((path, "fine")) for path in tree.paths}
    assert tried == {(1,): 1.0, (1, 2): 1.0, (3,): 1.0}
    assert calibrator.rate(((1,), "fine"), 0.5) > 0.5 > calibrator.rate(((1, 2), "fine"), 0.5)


def test_the_oracle_drafts_the_recording_until_the_context_leaves_it():
    oracle = OracleDrafter([4, 5, 6, 7])
    oracle.begin([1, 2])
    assert oracle.propose((1, 2, 4), 2).paths == ((5,), (5, 6))
    assert len(oracle.propose((1, 2, 9), 2)) == 0  # not what was recorded
    oracle.expect([8, 9])  # the next request's recording
    oracle.begin([3])
    assert oracle.propose((3, 8), 4).paths == ((9,),)
    assert "oracle" not in DRAFTERS  # it needs a recording: only the benchmark and replay build one


def test_feedback_context_is_a_snapshot_drafters_may_keep():
    drafter = make_drafter("suffix")
    drafter.begin([1, 2, 3, 1, 2])
    tree = drafter.propose((1, 2, 3, 1, 2), 4)
    feedback = StepFeedback((1, 2, 3, 1, 2), tree, (), (), 3)
    drafter.observe(feedback)
    assert feedback.context_ids == (1, 2, 3, 1, 2) and drafter._context[-1] == 3
    assert isinstance(DraftTree.empty().paths, tuple)
