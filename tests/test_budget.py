import time

import numpy as np
import pytest
from trees import tree_of

from aded.budget import BudgetConfig, CostAwareBudget, CostModel, StepOutcome, VerifyAll, cost_model, new_budget
from aded.tree import DraftTree


def scored(paths, scores):
    tree = tree_of(paths)
    return DraftTree(tree.token_ids, tree.parents, scores=np.asarray(scores))


def test_unlikely_drafts_are_not_worth_verifying_on_a_cpu():
    policy = CostAwareBudget(CostModel.typical_cpu())
    tree = scored([[1, 2, 3]], [0.05, 0.02, 0.01])
    assert len(policy.plan(tree)) == 0


def test_likely_drafts_are_kept_best_first_and_parent_closed():
    policy = CostAwareBudget(CostModel.typical_cpu())
    tree = scored([[1, 2, 3], [4, 5]], [0.9, 0.8, 0.7, 0.3, 0.29])
    chosen = policy.plan(tree)
    assert chosen.token_ids.tolist()[:3] == [1, 2, 3]
    for i, parent in enumerate(chosen.parents.tolist()):
        assert parent < i


def test_flat_cost_keeps_every_useful_node():
    policy = CostAwareBudget(CostModel.flat())
    tree = scored([[1, 2], [3]], [0.5, 0.4, 0.1])
    assert len(policy.plan(tree)) == 3


def test_calibration_learns_that_a_drafter_is_overconfident_and_forgives_later():
    policy = CostAwareBudget(CostModel.typical_cpu())
    tree = scored([[1, 2, 3, 4]], [0.9, 0.9, 0.9, 0.9])
    for _ in range(40):
        policy.learn_acceptance(tree, ())  # never accepted
    assert policy.calibrated(tree).max() < 0.1
    assert len(policy.plan(tree)) == 0
    empty = DraftTree.empty()
    for _ in range(200):
        policy.learn_acceptance(empty, ())  # evidence fades: the drafter gets another chance
    assert len(policy.plan(tree)) > 0


def test_disabled_policy_verifies_everything():
    policy = VerifyAll()
    tree = scored([[1, 2, 3]], [0.0, 0.0, 0.0])
    assert policy.plan(tree) is tree


def test_cost_model_interpolates():
    cost = CostModel((0, 4, 8), (1.0, 2.0, 4.0))
    assert cost(2) == 1.5 and cost(6) == 3.0 and cost(100) == 4.0
    assert cost(2.5) == 1.625 and cost(-1) == 1.0  # off the table of whole sizes: interpolated
    assert all(cost(k) == float(np.interp(k, cost.sizes, cost.seconds)) for k in range(12))


def test_steps_that_verify_nothing_decay_the_evidence_as_any_step_does():
    """The decay of empty steps is deferred to the next read; it must equal decaying every step
    (a tree whose one node scores 0 and is rejected adds nothing but that step's decay)."""
    tree = scored([[1, 2, 3]], [0.9, 0.8, 0.7])
    nothing = scored([[1]], [0.0])
    lazy, eager = CostAwareBudget(CostModel.typical_cpu()), CostAwareBudget(CostModel.typical_cpu())
    rng = np.random.default_rng(0)
    for step in range(60):
        if rng.random() < 0.6:
            lazy.learn_acceptance(DraftTree.empty(), ())
            eager.learn_acceptance(nothing, ())
        else:
            accepted = tuple(range(int(rng.integers(0, 4))))
            lazy.learn_acceptance(tree, accepted)
            eager.learn_acceptance(tree, accepted)
        if step % 7 == 6:  # several empty steps may pass between reads
            np.testing.assert_allclose(lazy.calibrated(tree), eager.calibrated(tree), rtol=1e-12)


def test_observed_step_times_correct_a_wrong_cost_curve():
    """A curve measured on a busy machine said trees cost 3x; the steps it sees say otherwise."""
    wrong = CostModel((0, 1, 8, 16), (0.1, 0.3, 0.3, 0.4))
    policy = CostAwareBudget(wrong)
    tree = scored([[1, 2, 3]], [0.5, 0.4, 0.3])
    assert len(policy.plan(tree)) == 0
    for _ in range(30):
        policy.learn_cost(0, 0.1)
        policy.learn_cost(3, 0.12)
    assert policy.step_cost(3) < 1.5 * policy.step_cost(0)
    assert len(policy.plan(tree)) == 3


def test_one_slow_step_does_not_price_its_size_out():
    """The first step of a size once took 10x (a kernel tuned on first use): the size stays
    affordable, and ordinary timings bring its cost back to what they say."""
    curve = CostModel((0, 1, 8), (0.1, 0.11, 0.2))
    policy = CostAwareBudget(curve)
    tree = scored([[1]], [0.6])
    for _ in range(5):
        policy.learn_cost(0, 0.1)
    policy.learn_cost(1, 1.1)  # ten times the curve
    assert policy.step_cost(1) < 1.2 * curve(1)
    assert len(policy.plan(tree)) == 1
    for _ in range(40):
        policy.learn_cost(1, 0.11)
    assert policy.step_cost(1) == pytest.approx(curve(1), rel=0.02)


def test_a_machine_slower_than_its_curve_is_still_followed():
    """Every step takes twice the curve (another tenant): the correction gets there, by steps."""
    curve = CostModel((0, 1, 8), (0.1, 0.11, 0.2))
    policy = CostAwareBudget(curve)
    for _ in range(60):
        policy.learn_cost(0, 0.2)
        policy.learn_cost(4, 2 * curve(4))
    assert policy.step_cost(0) == pytest.approx(0.2, rel=0.05)
    assert policy.step_cost(4) == pytest.approx(2 * curve(4), rel=0.05)


def test_a_policy_that_verifies_nothing_explores_now_and_then():
    policy = CostAwareBudget(CostModel((0, 1, 8), (0.1, 1.0, 1.0)), BudgetConfig(explore_every=8))
    tree = scored([[1, 2, 3]], [0.5, 0.4, 0.3])
    sizes = [len(policy.plan(tree)) for _ in range(16)]
    # a node costs 9 plain steps here: exploring verifies one, the least it can learn from
    assert sizes.count(0) == 14 and sizes[7] == sizes[15] == 1


def test_exploration_verifies_as_many_nodes_as_cost_little():
    costs = CostModel((0, 2, 3, 8), (1.0, 1.2, 1.6, 4.0))  # up to 2 nodes within 1.5 plain steps
    policy = CostAwareBudget(costs, BudgetConfig(explore_every=4))
    tree = scored([[1, 2, 3, 4, 5]], [0.05, 0.04, 0.03, 0.02, 0.01])
    sizes = [len(policy.plan(tree)) for _ in range(8)]
    assert sizes == [0, 0, 0, 2, 0, 0, 0, 2]


def test_drafting_is_thinned_while_drafts_are_not_worth_verifying_and_resumes_when_they_are():
    policy = CostAwareBudget(CostModel((0, 1, 8), (0.1, 1.0, 1.0)),
                             BudgetConfig(thin_after=4, thin_every=3, explore_every=1000))
    hopeless = scored([[1, 2, 3]], [0.5, 0.4, 0.3])
    asked = []
    for _ in range(13):
        nodes = policy.nodes_to_draft(24)
        asked.append(nodes)
        if nodes:
            assert len(policy.plan(hopeless)) == 0
    assert asked[:4] == [8] * 4  # a few failures are tolerated as they are (min_proposal asked)
    assert asked[4:] == [0, 0, 8] * 3  # then the drafter is asked every third step only
    policy.cost = CostModel.flat()  # drafts become worth verifying: drafting resumes at once
    assert len(policy.plan(hopeless)) == 3
    assert [policy.nodes_to_draft(24) for _ in range(3)] == [8] * 3
    assert VerifyAll().nodes_to_draft(24) == 24


def test_measured_costs_time_a_plain_step_after_a_plain_step():
    """A batch of another size costs more (llama.cpp rebuilds its graph); decoding meets a plain
    step after a plain one, so that is how t(0) is timed."""
    from scripted import ScriptedRunner

    from aded.budget import measure_costs

    class ShapeRunner(ScriptedRunner):
        last = None

        def verify(self, seq, root_id, tree):
            time.sleep(0.004 if self.last == len(tree) else 0.008)
            self.last = len(tree)
            return super().verify(seq, root_id, tree)

        def rewind(self, seq, length):
            pass

    costs = measure_costs(ShapeRunner([1] * 64, vocab_size=64), sizes=(0, 1, 2), past_len=8, repeats=2)
    assert costs(0) < 0.0075 <= costs(1)


def test_the_ask_follows_what_the_budget_verifies():
    policy = CostAwareBudget(CostModel.flat(), BudgetConfig(min_proposal=4))
    assert policy.nodes_to_draft(64) == 4
    asks = []
    for _ in range(60):  # every proposed node is worth verifying: the ask grows to the cap
        ask = policy.nodes_to_draft(64)
        asks.append(ask)
        tree = scored([list(range(1, ask + 1))], [0.99] * ask)
        assert len(policy.plan(tree)) == ask
    assert asks == sorted(asks) and asks[-1] == 64
    assert policy.nodes_to_draft(6) == 6  # never above the caller's limit


def test_a_step_that_accepted_all_it_verified_doubles_the_ask():
    """A verbatim copy reaches long chains at once, not at the pace of a decayed mean; a step
    that rejected something leaves the ask to that mean."""
    policy = CostAwareBudget(CostModel.flat(), BudgetConfig(min_proposal=4))
    asks = []
    for _ in range(4):
        ask = policy.nodes_to_draft(64)
        asks.append(ask)
        tree = policy.plan(scored([list(range(1, ask + 1))], [0.99] * ask))
        policy.learn_acceptance(tree, tuple(range(len(tree))))  # a chain: node i is the i-th token
    assert asks == [4, 8, 16, 32]
    tree = policy.plan(scored([list(range(1, 33))], [0.99] * 32))
    policy.learn_acceptance(tree, tuple(range(5)))  # the copy diverged after 5 tokens
    assert 4 <= policy.nodes_to_draft(64) < 32  # back to twice the recent mean, not 2 x 32


def test_a_snapshot_restores_what_the_budget_had_learned():
    """The benchmark repeats a turn from a snapshot: what the budget learned since must not show."""
    policy = CostAwareBudget(CostModel.typical_cpu())
    tree = scored([[1, 2, 3]], [0.9, 0.8, 0.7])
    before = policy.calibrated(tree)
    saved = policy.snapshot()
    for _ in range(20):
        policy.learn(StepOutcome(tree, (), drafted=True, verify_s=0.02, step_s=0.03))
    assert policy.calibrated(tree).max() < before.max()
    policy.restore(saved)
    np.testing.assert_array_equal(policy.calibrated(tree), before)
    assert VerifyAll().snapshot() is None


def test_a_budget_is_made_from_a_name_and_a_cost_file(tmp_path):
    assert isinstance(new_budget(cost_model("off")), VerifyAll)
    assert isinstance(new_budget(cost_model("typical")), CostAwareBudget)
    (tmp_path / "costs.json").write_text('{"sizes": [0, 4], "seconds": [0.01, 0.02]}')
    assert cost_model(str(tmp_path / "costs.json"))(4) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no model is loaded"):
        cost_model("measured")
    with pytest.raises(ValueError, match="does not exist"):
        cost_model("nonsense")
