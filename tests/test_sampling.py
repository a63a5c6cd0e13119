"""Sampling is exact: sample-and-match gives the model's own distribution, with or without drafts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from distribution import assert_follows
from trees import tree_of

from aded.backends.hf import HFRunner
from aded.budget import VerifyAll
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters.base import Drafter, NoDrafter
from aded.verify import Sampling, warp

VOCAB = 6
PROMPT = [1, 2, 3, 4]


class FixedTreeDrafter(Drafter):
    """Always the same tree: likely and unlikely tokens at depth 1, children at depth 2."""

    name = "fixed"

    def propose(self, context_ids, max_nodes):
        return tree_of([[0, 1], [0, 2], [3, 3], [5]])


def exact_two_token_distribution(model, sampling: Sampling) -> np.ndarray:
    """P(t1, t2) computed from the model's logits directly, [VOCAB, VOCAB]."""
    with torch.inference_mode():
        first = warp(model(torch.tensor([PROMPT])).logits[0, -1], sampling)
        joint = np.zeros((VOCAB, VOCAB))
        for t1 in range(VOCAB):
            second = warp(model(torch.tensor([PROMPT + [t1]])).logits[0, -1], sampling)
            joint[t1] = first[t1].item() * second.numpy()
    return joint


@pytest.mark.parametrize("drafter", [NoDrafter(), FixedTreeDrafter()], ids=["no-drafts", "tree"])
@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=4, top_p=0.9)],
                         ids=["plain", "warped"])
def test_two_token_distribution_is_the_models(drafter, sampling):
    model = tiny_llama(vocab_size=VOCAB, seed=7, logit_scale=8.0)  # peaked, far from uniform
    expected = exact_two_token_distribution(model, sampling)
    decoder = SpeculativeDecoder(HFRunner(model), drafter, (), VerifyAll())
    config = dict(max_new_tokens=2, do_sample=True, temperature=sampling.temperature,
                  top_k=sampling.top_k, top_p=sampling.top_p)
    samples = [tuple(decoder.generate(PROMPT, GenerationConfig(seed=seed, **config)).token_ids)
               for seed in range(2000)]
    assert_follows(samples, {(t1, t2): expected[t1, t2] for t1 in range(VOCAB) for t2 in range(VOCAB)})


def test_same_seed_same_sample():
    model = tiny_llama(vocab_size=VOCAB, seed=7, logit_scale=8.0)
    decoder = SpeculativeDecoder(HFRunner(model), FixedTreeDrafter(), (), VerifyAll())
    config = GenerationConfig(max_new_tokens=12, do_sample=True, seed=11)
    assert decoder.generate(PROMPT, config).token_ids == decoder.generate(PROMPT, config).token_ids


@pytest.mark.parametrize("top_k,top_p,temperature,min_p",
                         [(0, 1.0, 0.5, 0.0), (5, 1.0, 1.0, 0.0), (0, 0.8, 1.3, 0.0), (7, 0.6, 0.9, 0.0),
                          (0, 1.0, 1.0, 0.1), (10, 0.9, 0.7, 0.05), (0, 1.0, 2.0, 0.3)])
def test_warp_matches_transformers_warpers(top_k, top_p, temperature, min_p):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    expected = scores.softmax(-1)[0]
    torch.testing.assert_close(warp(logits[0], Sampling(temperature, top_k, top_p, min_p)), expected)
