"""The edit drafter: alignment, re-synchronisation near the break, learned substitutions, silence
where the output stops copying, calibrated scores, replay gains over prompt lookup, losslessness."""

from __future__ import annotations

import numpy as np
import pytest

from aded.drafters import make_drafter
from aded.drafters.base import StepFeedback
from aded.drafters.edit import EditDrafter, suffix_matches
from aded.drafters.pld import PromptLookupDrafter
from aded.replay import Recorded, replay, replay_one

FOO, BAR, PAREN = 7, 8, 9  # an identifier, its new name, what follows it


def edited_copy(seed: int) -> Recorded:
    """A 'file' of random tokens calling FOO in several places (`FOO (`), and an output that copies
    it with FOO renamed to BAR, one value changed, one line inserted and one deleted."""
    rng = np.random.default_rng(seed)
    code = rng.integers(100, 400, 240).tolist()
    for i in range(15, 240, 30):
        code[i : i + 2] = [FOO, PAREN]
    out = [BAR if t == FOO else t for t in code]
    out[50] = 999  # a changed value
    out[120:120] = rng.integers(400, 500, 6).tolist()  # an inserted line
    del out[200:205]  # a deleted line
    prompt = [1, 2, 3, *code, 4, 5]
    return Recorded(prompt, [10, 11, *out, 12], category="edit", id=seed)


def feed(drafter: EditDrafter, context: list[int], tokens: list[int]) -> list[int]:
    """Commit `tokens` one step each (nothing accepted, the token is the bonus); the new context."""
    for token in tokens:
        tree = drafter.propose(context, 8)
        drafter.observe(StepFeedback(tuple(context), tree, (), (), bonus_id=token))
        context = [*context, token]
    return context


def chain(tree) -> list[int]:
    return tree.path_tokens(len(tree) - 1) if len(tree) else []


def test_registered_and_suffix_matches_finds_every_earlier_occurrence():
    assert isinstance(make_drafter("edit"), EditDrafter)
    tokens = np.array([1, 2, 3, 1, 2, 4, 9, 2])
    ends, lengths = suffix_matches(np.array([5, 1, 2, 3, 1, 2]), 6, 4)
    assert ends.tolist() == [3] and lengths.tolist() == [2]  # `1 2` at 1..2, followed by 3
    ends, lengths = suffix_matches(tokens, len(tokens), 4)
    assert ends.tolist() == [2, 5] and lengths.tolist() == [1, 1]


def test_edited_copies_accept_clearly_more_than_prompt_lookup():
    records = [edited_copy(seed) for seed in range(4)]
    edit = replay(EditDrafter(), records, 8)["all"]
    pld = replay(PromptLookupDrafter(), records, 8)["all"]
    assert edit.mean_accepted_tokens > 1.15 * pld.mean_accepted_tokens
    assert edit.mean_accepted_tokens > 5.0


def test_after_an_insertion_copying_resumes_at_the_nearest_place_not_the_latest():
    # `5 6` occurs right after the break and again much later; prompt lookup takes the later one
    source = [20, 21, 22, 23, 5, 6, 30, 31, 32, 33, 34, 35, 36, 37, 5, 6, 40, 41, 42]
    drafter = EditDrafter()
    drafter.begin(source)
    context = feed(drafter, list(source), [20, 21, 22, 23, 90, 91, 5, 6])
    assert chain(drafter.propose(context, 4)) == [30, 31, 32, 33]
    pld = PromptLookupDrafter()
    pld.begin(source)
    assert chain(pld.propose(context, 4))[:3] != [30, 31, 32]


def test_a_learned_substitution_is_drafted_where_the_old_tokens_come_again():
    source = [50, 51, FOO, 52, 53, 54, 55, 56, 57, FOO, 58, 59]
    drafter = EditDrafter()
    drafter.begin(source)
    context = feed(drafter, list(source), [50, 51, BAR, 52, 53, 54, 55])
    tree = drafter.propose(context, 8)
    renamed = tree.longest_match([56, 57, BAR, 58, 59])
    assert len(renamed) == 5
    # not yet followed, so the old name hangs beside it as a less likely branch
    old = tree.longest_match([56, 57, FOO])
    assert len(old) == 3 and tree.scores[old[-1]] < tree.scores[renamed[2]]


def test_right_after_a_change_the_copy_is_guessed_to_resume_past_the_replaced_tokens():
    # the output replaces `40 41` by `98 99`: before any of the old text comes again, the drafter
    # already offers the source after the replaced tokens (and after none of them: an insertion)
    source = [20, 21, 22, 23, 24, 25, 40, 41, 30, 31, 32, 33, 34]
    trees = []
    for drafter in (EditDrafter(), EditDrafter(resume_within=0)):
        drafter.begin(source)
        context = feed(drafter, list(source), [20, 21, 22, 23, 24, 25, 98, 99])
        trees.append(drafter.propose(context, 8))
    guessed, silent = trees
    assert len(guessed.longest_match([30, 31, 32])) >= 2  # two replaced by two
    assert len(guessed.longest_match([40])) == 1  # or inserted before them
    assert len(silent) == 0  # without guessing, nothing matches the new text yet


def test_a_chance_one_token_match_after_a_change_does_not_stop_the_guess():
    # `A = 3 ; B = 0.5 ; C`: the output changes 3 to 5, whose only match is the 5 of `0.5`
    source = [30, 31, 32, 33, 20, 21, 3, 22, 23, 21, 24, 5, 22, 25, 21, 26, 27]
    trees = []
    for drafter in (EditDrafter(), EditDrafter(resume_within=0)):
        drafter.begin(source)
        context = feed(drafter, list(source), [30, 31, 32, 33, 20, 21, 5])
        trees.append(drafter.propose(context, 16))
    guessed, matched_only = trees
    assert len(guessed.longest_match([22, 25])) == 2  # the chance match: after `0.5` comes C
    assert len(guessed.longest_match([22, 23])) == 2  # the guess: one token replaced, B follows
    assert len(matched_only.longest_match([22, 23])) < 2


def test_a_declined_substitution_is_dropped():
    source = [50, 51, FOO, 52, 53, 54, 55, 56, 57, FOO, 58, 59, 60, 61, 62, FOO, 63]
    drafter = EditDrafter()
    drafter.begin(source)
    context = feed(drafter, list(source), [50, 51, BAR, 52, 53, 54, 55, 56, 57, FOO, 58])
    assert chain(drafter.propose(context, 6)) == [59, 60, 61, 62, FOO, 63]


def test_no_draft_once_the_output_stops_copying():
    source = list(range(100, 160))
    drafter = EditDrafter()
    drafter.begin(source)
    context = feed(drafter, list(source), source[:12])
    assert len(drafter.propose(context, 8)) == 8
    context = feed(drafter, context, [900, 901, 902, 903, 904])  # new text that occurs nowhere
    assert len(drafter.propose(context, 8)) == 0  # past `resume_within`: writing, not editing
    assert len(drafter.propose(source + source[:12], 0)) == 0


def test_scores_are_calibrated_probabilities_that_fall_along_the_chain():
    record = edited_copy(7)
    drafter = EditDrafter()
    replay_one(drafter, record, 8)
    drafter.begin(record.prompt_token_ids)
    context = feed(drafter, list(record.prompt_token_ids), list(record.output_token_ids[:40]))
    tree = drafter.propose(context, 8)
    assert 0 < len(tree) <= 8 and tree.is_chain
    assert np.all((tree.scores > drafter.min_score) & (tree.scores <= 1))
    assert np.all(np.diff(tree.scores) <= 0)
    # a long agreeing copy is trusted more than a fresh one-token match
    fresh = EditDrafter(min_recent=1)
    fresh.begin([5, 6, 7, 8, 9])
    short = fresh.propose([5, 6, 7, 8, 9, 6], 8)
    assert len(short) == 0 or short.scores[0] < tree.scores[0]


def test_replay_is_deterministic():
    records = [edited_copy(seed) for seed in range(2)]
    runs = [replay(EditDrafter(), records, 8)["all"].accepted_lengths for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_arguments_name_the_value():
    for kwargs, text in (({"min_recent": 0}, "min_recent"), ({"min_score": 1.5}, "min_score"),
                         ({"confirm": 0}, "confirm"), ({"resume_within": -1}, "resume_within")):
        with pytest.raises(ValueError, match=text):
            EditDrafter(**kwargs)


def test_greedy_output_equals_plain_decoding(tiny_model):
    """Through the real loop on tiny random models, with prompts the output may copy from."""
    from conftest import hf_greedy

    from aded.backends.hf import HFRunner
    from aded.budget import VerifyAll
    from aded.decoding import GenerationConfig, SpeculativeDecoder

    decoder = SpeculativeDecoder(HFRunner(tiny_model), EditDrafter(), (), VerifyAll())
    rng = np.random.default_rng(5)
    vocab = tiny_model.config.vocab_size
    base = rng.integers(0, vocab, 12).tolist()
    verified = 0
    for prompt in (base * 3, base[:5] + rng.integers(0, vocab, 10).tolist(), base * 2 + base[:4]):
        result = decoder.generate(prompt, GenerationConfig(max_new_tokens=30))
        assert result.token_ids == hf_greedy(tiny_model, prompt, 30)
        verified += result.stats.draft_nodes
    assert verified > 0  # drafts were verified: the identity is not that of plain decoding
