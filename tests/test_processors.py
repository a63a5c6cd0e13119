"""Fields that change the output stay lossless with speculation: every processor, alone and combined,
gives with any draft tree what plain decoding with it gives (a one-token-at-a-time reference loop and
transformers' `generate`); sampling keeps its distribution; logprobs are the model's own."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from distribution import assert_follows
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoding import ScriptedDrafter
from trees import tree_of

from aded.backends.hf import HFRunner
from aded.budget import VerifyAll
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters import make_drafter
from aded.drafters.base import Drafter, NoDrafter
from aded.processors import LogitsProcessor
from aded.tree import TreeBuilder
from aded.verify import warp

MAX_NEW = 40


# ---------------------------------------------------------------------------- references
def reference_scores(logits: torch.Tensor, prompt: list[int], generated: list[int], config: GenerationConfig,
                     end_ids=()) -> torch.Tensor:
    """One row, the plain way: bias, repetition penalty, frequency/presence, min_tokens mask."""
    scores = logits.double().clone()
    for token, bias in config.logit_bias:
        scores[token] += bias
    penalty = config.repetition_penalty
    for token in set(prompt + generated):
        score = scores[token]
        scores[token] = score * penalty if score < 0 else score / penalty
    for token, count in Counter(generated).items():
        scores[token] -= config.frequency_penalty * count + config.presence_penalty
    if len(generated) < config.min_tokens:
        scores[list(end_ids)] = float("-inf")
    return scores


def reference_loop(model, prompt: list[int], config: GenerationConfig, end_ids=()) -> list[int]:
    """Greedy decoding one token at a time over the whole context, processors applied each time."""
    generated: list[int] = []
    with torch.inference_mode():
        while len(generated) < config.max_new_tokens:
            logits = model(torch.tensor([prompt + generated])).logits[0, -1]
            generated.append(int(reference_scores(logits, prompt, generated, config, end_ids).argmax()))
            if generated[-1] in end_ids:
                break
    return generated


class OpenAIPenalties:
    """presence/frequency penalties as a transformers logits processor (it has none of its own)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0)


def hf_generate(model, prompt: list[int], config: GenerationConfig, **hf) -> list[int]:
    """transformers' own greedy `generate` with its processors for the same fields."""
    from transformers import LogitsProcessorList

    custom = []
    if config.presence_penalty or config.frequency_penalty:
        custom.append(OpenAIPenalties(len(prompt), config.presence_penalty, config.frequency_penalty))
    if config.logit_bias and "suppress_tokens" not in hf:  # else the test checks a ban against it
        hf["sequence_bias"] = [[[t], b] for t, b in config.logit_bias]
    if config.repetition_penalty != 1.0:
        hf["repetition_penalty"] = config.repetition_penalty
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList(custom),
                             **hf)
    return out[0, len(prompt):].tolist()


class WideDrafter(Drafter):
    """Wide trees: the true continuation to a random depth, a wrong branch at every depth, and paths
    of context tokens (repeats are what penalties act on)."""

    name = "wide"

    def __init__(self, reference: list[int], prompt_len: int, seed: int, vocab: int) -> None:
        self.reference, self.prompt_len, self.vocab = reference, prompt_len, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, context_ids, max_nodes):
        truth = self.reference[len(context_ids) - self.prompt_len:]
        builder = TreeBuilder(max_nodes)
        depth = int(self.rng.integers(0, len(truth) + 1))
        builder.add_path(truth[:depth])
        for d in range(depth + 1):
            builder.add_path(truth[:d] + self.rng.integers(0, self.vocab, 3).tolist())
        for _ in range(3):
            builder.add_path(self.rng.choice(np.asarray(context_ids), 4).tolist())
        return builder.build()


def drafters_for(expected: list[int], prompt_len: int, vocab: int) -> dict[str, Drafter]:
    return {
        "none": NoDrafter(),
        "oracle": ScriptedDrafter(expected, prompt_len, 0, vocab, max_correct_depth=16),
        "wrong": ScriptedDrafter(expected, prompt_len, 1, vocab, wrong_only=True),
        "wide": WideDrafter(expected, prompt_len, 2, vocab),
        "pld": make_drafter("pld"),
    }


def run(model, drafter, prompt, config, eos=()):
    decoder = SpeculativeDecoder(HFRunner(model), drafter, eos, VerifyAll())
    return decoder.generate(prompt, config)


# ---------------------------------------------------------------------------- greedy = plain decoding
def cases(ref: list[int], vocab: int) -> dict[str, tuple[dict, list[int], dict | None]]:
    """name -> (config fields, the model's EOS ids, transformers' arguments or None), chosen from the
    plain greedy output `ref` so that each field changes the output."""
    unused = next(t for t in range(vocab) if t not in ref)
    return {
        "ban": ({"logit_bias": {ref[0]: -100, ref[3]: -100, ref[5]: -100}}, [],
                {"suppress_tokens": [ref[0], ref[3], ref[5]]}),
        "bias": ({"logit_bias": {ref[1]: -2.5, unused: 1.5, ref[8]: 0.7}}, [], {}),
        "repetition": ({"repetition_penalty": 1.5}, [], {}),
        "repetition_below_one": ({"repetition_penalty": 0.4}, [], {}),
        "presence_frequency": ({"presence_penalty": 0.8, "frequency_penalty": 0.6}, [], {}),
        "negative_penalties": ({"presence_penalty": -1.5, "frequency_penalty": -0.4}, [], {}),
        "stop_token_ids": ({"stop_token_ids": [ref[9], ref[12]]}, [], {"eos_token_id": [ref[9], ref[12]]}),
        "min_tokens": ({"stop_token_ids": [ref[2]], "min_tokens": 12}, [],
                       {"eos_token_id": [ref[2]], "min_new_tokens": 12}),
        "ignore_eos": ({"ignore_eos": True}, [ref[4]], {}),
        "min_tokens_keeps_eos_back": ({"min_tokens": 10}, [ref[3]],
                                      {"eos_token_id": [ref[3]], "min_new_tokens": 10}),
        "min_p_greedy": ({"min_p": 0.4}, [], {}),
        "combined": ({"logit_bias": {ref[0]: -100, unused: 0.5}, "repetition_penalty": 1.3,
                      "presence_penalty": 0.4, "frequency_penalty": 0.3, "stop_token_ids": [ref[20]],
                      "min_tokens": 6}, [ref[7]],
                     {"eos_token_id": [ref[20], ref[7]], "min_new_tokens": 6}),
    }


CASE_NAMES = list(cases(list(range(40)), 96))


@pytest.fixture(scope="module")
def llama():
    """The tiny Llama: its greedy output varies (the tiny Qwen2, with tied embeddings, mostly repeats
    one id, which most penalties leave as it is); processors act on logits, whatever the model."""
    return tiny_llama()


@pytest.mark.parametrize("case", CASE_NAMES)
def test_each_field_with_speculation_equals_plain_decoding(llama, case):
    vocab = llama.config.vocab_size
    rng = np.random.default_rng(CASE_NAMES.index(case))
    base = rng.integers(0, vocab, 10).tolist()
    prompt = base * 2 + rng.integers(0, vocab, 6).tolist()
    plain = reference_loop(llama, prompt, GenerationConfig(max_new_tokens=MAX_NEW))
    fields, eos, hf = cases(plain, vocab)[case]
    config = GenerationConfig(max_new_tokens=MAX_NEW, max_draft_nodes=32, **fields)
    end_ids = set(config.stop_token_ids) | (set() if config.ignore_eos else set(eos))
    expected = reference_loop(llama, prompt, config, sorted(end_ids))
    if hf is not None:
        assert hf_generate(llama, prompt, config, **hf) == expected
    if case not in ("min_p_greedy", "ignore_eos"):
        assert expected != plain, "the case does not change the output"
    if case == "ignore_eos":
        assert eos[0] in expected[:-1]  # an EOS was generated, and generation went on
    for name, drafter in drafters_for(expected, len(prompt), vocab).items():
        result = run(llama, drafter, prompt, config, eos)
        assert result.token_ids == expected, name
        stopped = bool(end_ids) and expected[-1] in end_ids
        assert result.finish_reason == ("stop" if stopped else "length"), name
        if name == "oracle" and len(expected) > 8:
            assert result.stats.mean_accepted_tokens > 1.5


@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 12), num_generated=st.integers(0, 12),
       rep=st.sampled_from([1.0, 0.5, 1.7]), presence=st.sampled_from([0.0, 1.2, -0.7]),
       frequency=st.sampled_from([0.0, 0.9, -1.1]), min_tokens=st.integers(0, 16),
       biased=st.booleans())
@settings(max_examples=60, deadline=None)
def test_each_row_is_processed_in_its_own_context(seed, prompt_len, num_generated, rep, presence, frequency,
                                                  min_tokens, biased):
    """The vectorised per-row correction equals processing each node's full context one at a time."""
    vocab = 12  # small: contexts and paths repeat ids often
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, prompt_len).tolist()
    generated = rng.integers(0, vocab, num_generated).tolist()
    bias = dict(zip(rng.integers(0, vocab, 3).tolist(), rng.normal(0, 3, 3).tolist())) if biased else {}
    config = GenerationConfig(max_new_tokens=16, repetition_penalty=rep, presence_penalty=presence,
                              frequency_penalty=frequency, min_tokens=min_tokens, logit_bias=bias)
    end_ids = [3, 7]
    processor = LogitsProcessor.for_request(config, prompt, vocab, end_ids)
    if processor is None:
        assert (rep, presence, frequency, min_tokens, bias) == (1.0, 0.0, 0.0, 0, {})
        return
    for start in range(0, num_generated, 3):  # steps commit a few tokens at a time
        processor.commit(generated[start:start + 3])
    builder = TreeBuilder(20)
    for _ in range(int(rng.integers(0, 6))):
        builder.add_path(rng.integers(0, vocab, int(rng.integers(1, 6))).tolist())
    tree = builder.build()
    logits = torch.randn(1 + len(tree), vocab, generator=torch.Generator().manual_seed(seed)) * 3
    scores = processor(logits, tree)
    for row in range(1 + len(tree)):
        path = tree.path_tokens(row - 1) if row else []
        expected = reference_scores(logits[row], prompt, generated + path, config, end_ids).float()
        torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-5)


def test_no_processors_means_no_processing():
    """Plain requests keep the fast path: nothing is built, so nothing is computed per step."""
    config = GenerationConfig(min_p=0.5, logprobs=True, min_tokens=3)
    assert LogitsProcessor.for_request(config, [1, 2], 10, end_ids=()) is None
    assert LogitsProcessor.for_request(GenerationConfig(), [1, 2], 10, end_ids=(2,)) is None


def test_eos_and_stop_ids_are_not_accepted_inside_a_path_before_min_tokens():
    """A drafter that proposes the EOS early: nodes at depths before `min_tokens` may not take it."""
    from scripted import ScriptDrafter, ScriptedRunner

    script = [5, 6, 2, 7, 8, 9, 4, 10, 11, 12]
    decoder = SpeculativeDecoder(ScriptedRunner(script, vocab_size=16), ScriptDrafter(script, 1, depth=64),
                                 [2], VerifyAll())
    plain = decoder.generate([3], GenerationConfig(max_new_tokens=10))
    assert plain.token_ids == [5, 6, 2] and plain.finish_reason == "stop"
    held = decoder.generate([3], GenerationConfig(max_new_tokens=10, min_tokens=4, stop_token_ids=[4]))
    # the EOS is masked at the third token, inside the drafted path: the runner's next favourite
    # (id 0) comes instead, and the stop id ends generation once four tokens are out
    assert held.token_ids == [5, 6, 0, 7, 8, 9, 4] and held.finish_reason == "stop"
    ignored = decoder.generate([3], GenerationConfig(max_new_tokens=10, ignore_eos=True, stop_token_ids=[4]))
    assert ignored.token_ids == [5, 6, 2, 7, 8, 9, 4] and ignored.finish_reason == "stop"


# ---------------------------------------------------------------------------- sampling
VOCAB = 6
PROMPT = [1, 2, 3, 4]
SAMPLED = dict(do_sample=True, temperature=1.0, min_p=0.08, repetition_penalty=1.6, presence_penalty=0.6,
               frequency_penalty=0.9, logit_bias={1: 1.0, 4: -100}, stop_token_ids=[5], min_tokens=1,
               max_new_tokens=3)


class DepthOneDrafter(Drafter):
    """Every id but the banned one as a child of the root (two of them with a child): the second
    token is then nearly always an accepted node, and the third is drawn in that node's row."""

    name = "depth-one"

    def propose(self, context_ids, max_nodes):
        return tree_of([[0, 0], [1], [2, 2], [3], [5]])


def exact_distribution(model, config: GenerationConfig) -> dict[tuple[int, ...], float]:
    """P(output) for up to three tokens (a stop id ends earlier), from the model's logits."""
    sampling = config.sampling()

    def probs(generated):
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + generated])).logits[0, -1]
        return warp(reference_scores(logits, PROMPT, generated, config, [5]).float(), sampling).tolist()

    out: dict[tuple[int, ...], float] = {}

    def walk(generated, p):
        if len(generated) == config.max_new_tokens or (generated and generated[-1] == 5):
            out[tuple(generated)] = p
            return
        for token, q in enumerate(probs(generated)):
            if q > 0:
                walk(generated + [token], p * q)

    walk([], 1.0)
    return out


@pytest.mark.parametrize("drafter", [NoDrafter(), DepthOneDrafter()], ids=["no-drafts", "tree"])
def test_sampled_distribution_with_processors_is_plain_samplings(drafter):
    model = tiny_llama(vocab_size=VOCAB, seed=7, logit_scale=4.0)
    expected = exact_distribution(model, GenerationConfig(**SAMPLED))
    assert not any(4 in cell for cell in expected) and not any(cell[0] == 5 for cell in expected)
    decoder = SpeculativeDecoder(HFRunner(model), drafter, (), VerifyAll())
    samples = [tuple(decoder.generate(PROMPT, GenerationConfig(seed=seed, **SAMPLED)).token_ids)
               for seed in range(2000)]
    assert_follows(samples, expected)


def test_sampling_with_processors_draws_plain_samplings_tokens_for_a_seed(tiny_model):
    """Sample-and-match draws once per emitted token, in the same rows plain sampling uses: with the
    same seed, long sampled outputs under wide trees are token for token the plain ones."""
    vocab = tiny_model.config.vocab_size
    prompt = np.random.default_rng(4).integers(0, vocab, 16).tolist()
    config = GenerationConfig(max_new_tokens=MAX_NEW, max_draft_nodes=32, do_sample=True, temperature=0.8,
                              top_k=20, min_p=0.05, repetition_penalty=1.3, presence_penalty=-0.8,
                              frequency_penalty=0.5, logit_bias={prompt[0]: 2.0, prompt[1]: -100}, seed=5)
    plain = run(tiny_model, NoDrafter(), prompt, config).token_ids
    assert prompt[1] not in plain
    for name, drafter in drafters_for(plain, len(prompt), vocab).items():
        result = run(tiny_model, drafter, prompt, config)
        assert result.token_ids == plain, name


# ---------------------------------------------------------------------------- logprobs
def test_logprobs_are_the_models_log_softmax_with_or_without_speculation(tiny_model):
    vocab = tiny_model.config.vocab_size
    prompt = np.random.default_rng(8).integers(0, vocab, 14).tolist()
    config = GenerationConfig(max_new_tokens=30, max_draft_nodes=32, logprobs=True, top_logprobs=3,
                              repetition_penalty=1.4)  # logprobs stay raw whatever the processors
    expected = reference_loop(tiny_model, prompt, config)
    results = {name: run(tiny_model, drafter, prompt, config)
               for name, drafter in drafters_for(expected, len(prompt), vocab).items()}
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1:-1]
    model_logprobs = torch.log_softmax(logits.double(), dim=-1)  # [30, vocab]
    top = model_logprobs.topk(3, dim=-1)
    for name, result in results.items():
        assert result.token_ids == expected and len(result.logprobs) == len(expected), name
        for j, entry in enumerate(result.logprobs):
            assert entry.token_id == expected[j]
            assert abs(entry.logprob - model_logprobs[j, expected[j]].item()) < 1e-4, (name, j)
            assert [i for i, _ in entry.top] == top.indices[j].tolist(), (name, j)
            assert np.allclose([lp for _, lp in entry.top], top.values[j].tolist(), atol=1e-4)
    assert results["oracle"].stats.mean_accepted_tokens > 1.5


def test_logprobs_are_cut_with_the_tokens_when_a_stop_id_ends_a_step():
    from scripted import ScriptDrafter, ScriptedRunner

    script = [5, 6, 7, 8, 9, 10, 11]
    decoder = SpeculativeDecoder(ScriptedRunner(script, vocab_size=16), ScriptDrafter(script, 1, depth=64),
                                 (), VerifyAll())
    result = decoder.generate([3], GenerationConfig(max_new_tokens=10, stop_token_ids=[8], logprobs=True))
    assert result.token_ids == [5, 6, 7, 8] and result.finish_reason == "stop"
    assert [entry.token_id for entry in result.logprobs] == [5, 6, 7, 8]
    assert result.stats.steps == 1 and all(entry.top == () for entry in result.logprobs)


def test_api_returns_logprobs_and_takes_every_field(tiny_lm):
    kwargs = dict(chat=False, max_new_tokens=12, logprobs=True, top_logprobs=2, repetition_penalty=1.2,
                  presence_penalty=0.3, frequency_penalty=0.2, logit_bias={5: -100}, min_p=0.1,
                  stop_token_ids=[2], ignore_eos=False, min_tokens=2)
    stream = tiny_lm.stream("abcabc", **kwargs)
    text = "".join(stream)
    completion = stream.completion
    assert text == completion.text and stream.logprobs == completion.logprobs
    assert [entry.token_id for entry in completion.logprobs] == completion.token_ids
    assert 5 not in completion.token_ids
    data = completion.as_dict()["logprobs"]
    assert [d["token_id"] for d in data] == completion.token_ids
    assert all(len(d["top_logprobs"]) == 2 and d["logprob"] <= 0 for d in data)
    assert "logprobs" not in tiny_lm.generate("abcabc", chat=False, max_new_tokens=4).as_dict()


# ---------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize("bad,field", [
    ({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"a": 1.0}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {3: "x"}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"), ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 300}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_fields_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**bad)


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_ids_outside_the_vocabulary_are_refused_naming_the_field(field):
    model = tiny_llama(vocab_size=VOCAB, seed=7)
    value = {VOCAB: 1.0} if field == "logit_bias" else [VOCAB]
    with pytest.raises(ValueError, match=field):
        run(model, NoDrafter(), PROMPT, GenerationConfig(max_new_tokens=2, **{field: value}))


def test_a_config_with_processors_is_still_frozen_and_hashable():
    config = GenerationConfig(logit_bias={7: 1.0, "3": -2}, stop_token_ids=[4, 4, 2])
    assert config.logit_bias == ((3, -2.0), (7, 1.0)) and config.stop_token_ids == (4, 2)
    assert hash(config) == hash(GenerationConfig(logit_bias=[(3, -2.0), (7, 1.0)], stop_token_ids=(4, 2)))
