"""The suffix drafter: matching, thresholds, alpha cap, both indexes, calibration, replay."""

from __future__ import annotations

import numpy as np
import pytest

from aded.drafters import make_drafter
from aded.drafters.base import StepFeedback
from aded.drafters.suffix import SuffixDrafter
from aded.replay import Recorded, replay


def depth_of(tree) -> int:
    return tree.max_depth


def test_registered_and_copies_a_repeated_phrase():
    drafter = make_drafter("suffix")
    assert isinstance(drafter, SuffixDrafter)
    prompt = [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    drafter.begin(prompt)
    tree = drafter.propose(prompt + [1, 2, 3, 4, 5], 8)
    # the match is `1 2 3 4 5` (the prompt has 9 before it, the context 12): 5 tokens copied
    assert tree.path_tokens(tree.longest_match([6, 7, 8, 9, 10])[-1]) == [6, 7, 8, 9, 10]
    assert tree.sources[0] == "suffix"


@pytest.mark.parametrize("alpha, expected", [(0.5, 1), (1.0, 3), (2.0, 6)])
def test_alpha_caps_the_draft_length(alpha, expected):
    text = list(range(20))
    drafter = SuffixDrafter(alpha=alpha)
    drafter.begin(text)
    tree = drafter.propose(text + [3, 4, 5], 16)  # match length 3
    assert depth_of(tree) == expected


def test_min_prob_drops_rare_continuations():
    prompt = [1, 2, 3] * 9 + [1, 2, 4]  # after `1 2`: 3 nine times, 4 once (p = 0.1)
    for min_prob, has_rare in ((0.15, False), (0.05, True)):
        drafter = SuffixDrafter(min_prob=min_prob)
        drafter.begin(prompt)
        tree = drafter.propose(prompt + [7, 1, 2], 16)  # match `1 2`, length 2
        first = {int(tree.token_ids[i]) for i in range(len(tree)) if tree.parents[i] < 0}
        assert (4 in first) == has_rare and 3 in first


def test_scores_are_probabilities_non_increasing_and_budget_holds():
    rng = np.random.default_rng(1)
    text = rng.integers(0, 6, size=400).tolist()
    drafter = SuffixDrafter()
    drafter.begin(text)
    for budget in (1, 4, 8, 16, 32):
        tree = drafter.propose(text, budget)
        assert 0 < len(tree) <= budget
        assert np.all((tree.scores > 0) & (tree.scores <= 1))
        parents = tree.parents
        assert np.all(tree.scores[parents >= 0] <= tree.scores[parents[parents >= 0]])
    assert len(drafter.propose(text, 0)) == 0


def test_global_index_serves_a_later_request_and_round_trips():
    output = [50, 51, 52, 53, 54, 55, 56, 57]
    drafter = SuffixDrafter()
    drafter.begin([1, 2, 3])
    drafter.propose([1, 2, 3, *output], 4)
    drafter.end()
    drafter.begin([7, 8])
    context = [7, 8, 50, 51, 52, 53]
    tree = drafter.propose(context, 8)
    assert tree.path_tokens(len(tree) - 1)[:2] == [54, 55] and set(tree.sources) == {"suffix-global"}

    restored = SuffixDrafter()
    restored.load_state_dict(drafter.state_dict())
    restored.begin([7, 8])
    again = restored.propose(context, 8)
    assert again.token_ids.tolist() == tree.token_ids.tolist()


def test_union_mode_merges_both_indexes():
    drafter = SuffixDrafter(mode="union")
    drafter.begin([])
    drafter.propose([5, 6, 7, 8, 9], 4)
    drafter.end()
    prompt = [5, 6, 7, 1, 2]
    drafter.begin(prompt)
    tree = drafter.propose(prompt + [5, 6, 7], 8)
    first = {int(tree.token_ids[i]): tree.sources[i] for i in range(len(tree)) if tree.parents[i] < 0}
    assert first == {1: "suffix", 8: "suffix-global"}


def test_calibration_lowers_scores_of_edges_that_get_rejected():
    prompt = [1, 2, 3, 4] * 3
    drafter = SuffixDrafter(use_global=False)
    drafter.begin(prompt)
    context = list(prompt)
    before = drafter.propose(context, 4).scores[0]
    for _ in range(30):
        tree = drafter.propose(context, 4)
        drafter.observe(StepFeedback(tuple(context), tree, (), (), bonus_id=9))  # the model says 9
        drafter.begin(prompt)  # same situation again
        context = list(prompt)
    after = drafter.propose(context, 4).scores[0]
    assert after < before / 2


def test_what_long_matches_earned_does_not_lend_trust_to_short_ones():
    """Long matches that always land (an answer repeated verbatim) leave a two-token match with
    one occurrence at its own prior, not at their rate."""
    drafter = SuffixDrafter(use_global=False)
    long_text = list(range(100, 140))
    drafter.begin(long_text)
    context = long_text + long_text[:20]  # a 20-token match, continued by 120, 121, ...
    for _ in range(40):
        tree = drafter.propose(context, 1)
        drafter.observe(StepFeedback(tuple(context), tree, (0,), (int(tree.token_ids[0]),), bonus_id=0))
        drafter.begin(long_text)
    assert drafter.propose(context, 1).scores[0] > 0.9
    short = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    drafter.begin(short)
    score = drafter.propose(short + [11, 4, 5], 1).scores[0]  # `4 5` once, then 6
    assert score < 0.75  # the prior (0.6 of an edge probability of 1), lifted a little at most


def test_replay_is_deterministic_and_learns_across_requests():
    rng = np.random.default_rng(2)
    code = rng.integers(0, 40, size=120).tolist()
    rounds = []
    for r in range(4):  # an edited file: each round repeats the last with a few changes
        code = list(code)
        code[10 * r + 5] = 41 + r
        rounds.append(Recorded(prompt_token_ids=[99, r], output_token_ids=code))
    stats = [replay(SuffixDrafter(), rounds, 16)["all"] for _ in range(2)]
    assert stats[0].accepted_lengths == stats[1].accepted_lengths
    assert stats[0].mean_accepted_tokens > 3.0  # rounds 2-4 come from the global index
    alone = replay(SuffixDrafter(use_global=False), rounds, 16)["all"]
    assert stats[0].mean_accepted_tokens > alone.mean_accepted_tokens


def test_bad_arguments_name_the_value():
    for kwargs, text in (({"alpha": 0}, "alpha"), ({"min_prob": 2}, "min_prob"), ({"mode": "x"}, "'x'")):
        with pytest.raises(ValueError, match=text):
            SuffixDrafter(**kwargs)


@pytest.mark.parametrize("drafter_name", ["suffix", "hybrid"])
def test_greedy_output_equals_plain_decoding(tiny_model, drafter_name):
    """Through the real loop on tiny random models, over requests that teach the global index."""
    from conftest import hf_greedy

    from aded.backends.hf import HFRunner
    from aded.budget import VerifyAll
    from aded.decoding import GenerationConfig, SpeculativeDecoder

    options = {"sources": ["pld", "suffix"]} if drafter_name == "hybrid" else {}
    decoder = SpeculativeDecoder(HFRunner(tiny_model), make_drafter(drafter_name, **options), (),
                                 VerifyAll())
    rng = np.random.default_rng(5)
    base = rng.integers(0, tiny_model.config.vocab_size, 12).tolist()
    for prompt in (base * 3, base[:5] + rng.integers(0, 50, 10).tolist(), base * 2):
        result = decoder.generate(prompt, GenerationConfig(max_new_tokens=30))
        assert result.token_ids == hf_greedy(tiny_model, prompt, 30)
