"""The loop is lossless: greedy output equals transformers' greedy decoding whatever the drafts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_greedy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import ScriptDrafter, ScriptedRunner
from trees import tree_of

from aded.backends.hf import HFRunner
from aded.budget import BudgetConfig, CostAwareBudget, CostModel, VerifyAll
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters import make_drafter
from aded.drafters.base import Drafter
from aded.tree import DraftTree, TreeBuilder
from aded.verify import accept_greedy


class ScriptedDrafter(Drafter):
    """Random trees that mix the true continuation (to a random depth) with wrong tokens."""

    name = "scripted"

    def __init__(self, reference: list[int], prompt_len: int, seed: int, vocab: int,
                 max_correct_depth: int = 6, wrong_only: bool = False) -> None:
        self.reference = reference
        self.prompt_len = prompt_len
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.max_correct_depth = max_correct_depth
        self.wrong_only = wrong_only
        self.observed = []

    def propose(self, context_ids, max_nodes):
        done = len(context_ids) - self.prompt_len
        truth = self.reference[done:]
        builder = TreeBuilder(max_nodes)
        for _ in range(self.rng.integers(0, 4)):
            depth = int(self.rng.integers(1, self.max_correct_depth + 1))
            if self.wrong_only or not truth:
                path = self.rng.integers(0, self.vocab, depth).tolist()
                if truth:
                    path[0] = (truth[0] + 1 + int(self.rng.integers(0, self.vocab - 1))) % self.vocab
            else:
                keep = int(self.rng.integers(0, min(depth, len(truth)) + 1))
                path = truth[:keep] + self.rng.integers(0, self.vocab, depth - keep).tolist()
            builder.add_path(path)
        return builder.build()

    def observe(self, feedback):
        self.observed.append(feedback)


def decoder_for(model, drafter, eos=()):
    return SpeculativeDecoder(HFRunner(model), drafter, eos, VerifyAll())


@pytest.mark.parametrize("drafter_name", ["none", "pld", "suffix", "hybrid", "aded"])
def test_registered_drafters_equal_greedy(tiny_model, drafter_name):
    rng = np.random.default_rng(1)
    vocab = tiny_model.config.vocab_size
    for trial in range(4):
        base = rng.integers(0, vocab, 12).tolist()
        prompt = base * 3 if trial % 2 else rng.integers(0, vocab, 30).tolist()
        reference = hf_greedy(tiny_model, prompt, 40)
        result = decoder_for(tiny_model, make_drafter(drafter_name)).generate(
            prompt, GenerationConfig(max_new_tokens=40))
        assert result.token_ids == reference
        assert result.finish_reason == "length"
        assert result.stats.generated_tokens == 40


@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 40), max_new=st.integers(1, 30),
       max_nodes=st.integers(0, 16), wrong_only=st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_trees_equal_greedy(tiny_model, seed, prompt_len, max_new, max_nodes, wrong_only):
    vocab = tiny_model.config.vocab_size
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_len).tolist()
    reference = hf_greedy(tiny_model, prompt, max_new)
    # correct depths up to 12 also make trees deeper than the remaining token budget
    drafter = ScriptedDrafter(reference, prompt_len, seed, vocab, 12, wrong_only)
    result = decoder_for(tiny_model, drafter).generate(
        prompt, GenerationConfig(max_new_tokens=max_new, max_draft_nodes=max_nodes))
    assert result.token_ids == reference
    assert sum(result.stats.accepted_lengths) + 1 == len(reference)
    if wrong_only:
        assert result.stats.steps == max_new - 1  # nothing accepted: one token per step
    for feedback in drafter.observed:
        assert len(feedback.accepted_ids) == len(feedback.accepted_nodes)


def test_eos_inside_an_accepted_path_ends_generation(tiny_model):
    vocab = tiny_model.config.vocab_size
    prompt = np.random.default_rng(5).integers(0, vocab, 20).tolist()
    reference = hf_greedy(tiny_model, prompt, 30)
    eos = reference[7]
    expected = hf_greedy(tiny_model, prompt, 30, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) <= 8
    # a drafter that always proposes the whole true continuation: EOS lands mid-path
    drafter = ScriptedDrafter(reference, len(prompt), 0, vocab, max_correct_depth=20)
    drafter.rng = np.random.default_rng(0)
    result = decoder_for(tiny_model, drafter, eos=[eos]).generate(
        prompt, GenerationConfig(max_new_tokens=30, max_draft_nodes=32))
    assert result.token_ids == expected
    assert result.finish_reason == "stop"


def scripted_generate(script: list[int], eos: int, stop_token: int, max_new_tokens: int = 30):
    """Generate `script` in two steps (the prefill's token, then all the rest at once) with a stop
    check that ends generation at `stop_token`; returns the result and the ids the check saw."""
    seen: list[int] = []

    def stop_check(new_ids: list[int]) -> int | None:
        seen.extend(new_ids)
        return len(seen) - len(new_ids) + new_ids.index(stop_token) + 1 if stop_token in new_ids else None

    decoder = SpeculativeDecoder(ScriptedRunner(script, vocab_size=16), ScriptDrafter(script, 1, depth=64),
                                 [eos], VerifyAll())
    result = decoder.generate([3], GenerationConfig(max_new_tokens=max_new_tokens), stop_check)
    return result, seen


def test_a_stop_string_before_an_eos_in_the_same_step_ends_generation_there():
    result, seen = scripted_generate([5, 6, 7, 8, 9, 2, 10, 11], eos=2, stop_token=7)
    assert result.stats.steps == 1 and result.stats.accepted_lengths == [2]
    assert result.token_ids == [5, 6, 7] and result.finish_reason == "stop"
    assert seen == [5, 6, 7, 8, 9, 2]  # each id once, up to the EOS


def test_an_eos_before_a_stop_string_in_the_same_step_ends_generation_there():
    result, seen = scripted_generate([5, 6, 2, 7, 8, 9], eos=2, stop_token=7)
    assert result.token_ids == [5, 6, 2] and result.finish_reason == "stop"
    assert seen == [5, 6, 2]  # the stop check never sees past the EOS


def test_the_token_limit_bounds_what_the_stop_check_sees():
    result, seen = scripted_generate([5, 6, 8, 9, 7, 4], eos=2, stop_token=7, max_new_tokens=4)
    assert result.token_ids == [5, 6, 8, 9] and result.finish_reason == "length"
    assert seen == [5, 6, 8, 9]


class RecordingScript(ScriptDrafter):
    def end(self, emitted: int | None = None) -> None:
        self.emitted = emitted


@pytest.mark.parametrize("script,max_new,output", [
    ([5, 6, 8, 9, 7, 4, 4, 4], 4, [5, 6, 8, 9]),  # the limit cuts a step that accepted more
    ([5, 6, 2, 7, 8, 9, 4, 4], 30, [5, 6, 2]),  # an EOS cuts it
])
def test_drafters_learn_only_what_was_output(script, max_new, output):
    """The last step may accept tokens past the cut; a drafter is told how many were output, and
    learning drafters keep only those."""
    from aded.drafters.suffix import SuffixDrafter

    drafter = RecordingScript(script, 1, depth=64)
    decoder = SpeculativeDecoder(ScriptedRunner(script, vocab_size=16), drafter, [2], VerifyAll())
    result = decoder.generate([3], GenerationConfig(max_new_tokens=max_new))
    assert result.token_ids == output and drafter.emitted == len(output)

    suffix = SuffixDrafter()
    suffix.begin([3])
    suffix.propose([3, *script], 4)  # it saw the whole step
    suffix.end(len(output))
    assert suffix.state_dict()["tokens"].tolist() == output


def test_kv_cache_equals_plain_prefill_after_many_steps(tiny_model):
    """After many tree steps with rejections, the cache holds exactly the committed tokens."""
    runner = HFRunner(tiny_model)
    vocab = tiny_model.config.vocab_size
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, vocab, 16).tolist()
    seq = runner.new_sequence(8)  # small on purpose: the buffers must grow
    logits = runner.prefill(seq, prompt).logits
    context = prompt + [int(logits.argmax())]
    for _ in range(25):
        builder = TreeBuilder(12)
        for _ in range(3):
            builder.add_path(rng.integers(0, vocab, int(rng.integers(1, 5))).tolist())
        tree = builder.build()
        out = runner.verify(seq, context[-1], tree)
        acceptance = accept_greedy(tree, out)
        runner.commit(seq, acceptance.accepted_nodes)
        context += [*acceptance.accepted_ids, acceptance.bonus_id]
    fresh = runner.new_sequence(len(context))
    runner.prefill(fresh, context[:-1])
    assert seq.past_len == fresh.past_len == len(context) - 1
    for ours, plain in zip(seq.layers, fresh.layers):
        torch.testing.assert_close(ours.keys, plain.keys, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.values, plain.values, rtol=0, atol=1e-10)


def test_tree_logits_match_sequential_logits(tiny_model):
    runner = HFRunner(tiny_model)
    prompt = list(range(10, 30))
    tree = tree_of([[1, 2, 3], [1, 4], [5, 6]])
    seq = runner.new_sequence(64)
    runner.prefill(seq, prompt)
    tree_logits = runner.verify(seq, 9, tree)
    with torch.inference_mode():
        for node in range(len(tree)):
            ids = prompt + [9] + tree.path_tokens(node)
            full = tiny_model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(tree_logits[node + 1], full.float(), rtol=0, atol=1e-8)


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    decoder = decoder_for(tiny_model, make_drafter("none"))
    with pytest.raises(ValueError, match="context holds 512"):
        decoder.generate([1] * 600, GenerationConfig(max_new_tokens=4))


def test_generation_stops_at_the_context_limit(tiny_model):
    decoder = decoder_for(tiny_model, make_drafter("pld"))
    result = decoder.generate([3] * 500, GenerationConfig(max_new_tokens=100))
    assert len(result.token_ids) == 12 and result.finish_reason == "length"


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_draft_nodes": -1},
                                 {"do_sample": True, "temperature": 0.0},
                                 {"do_sample": True, "top_p": 1.5}])
def test_absurd_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_stream_yields_what_generate_returns(tiny_model):
    decoder = decoder_for(tiny_model, make_drafter("pld"))
    prompt = [5, 6, 7, 8] * 6
    stream = decoder.stream(prompt, GenerationConfig(max_new_tokens=25))
    pieces = [list(p) for p in stream]
    assert [t for p in pieces for t in p] == stream.result.token_ids == hf_greedy(tiny_model, prompt, 25)


def test_failing_drafts_are_thinned_and_output_stays_greedy(tiny_model):
    """A drafter that is always wrong is soon asked for nothing on most steps (its time is saved)."""
    prompt = [3, 4, 5, 6, 7, 8]
    reference = hf_greedy(tiny_model, prompt, 60)

    class Counting(ScriptedDrafter):
        def propose(self, context_ids, max_nodes):
            self.asked = [*getattr(self, "asked", []), max_nodes]
            tree = super().propose(context_ids, max_nodes)
            return tree if max_nodes else DraftTree.empty()

    drafter = Counting(reference, len(prompt), seed=1, vocab=tiny_model.config.vocab_size, wrong_only=True)
    budget = CostAwareBudget(CostModel((0, 1, 8), (0.05, 0.1, 0.2)), BudgetConfig(explore_every=1000))
    decoder = SpeculativeDecoder(HFRunner(tiny_model), drafter, (), budget)
    result = decoder.generate(prompt, GenerationConfig(max_new_tokens=60, max_draft_nodes=8))
    assert result.token_ids == reference
    assert drafter.asked.count(0) > len(drafter.asked) / 2
