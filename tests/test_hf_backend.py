"""The transformers runner passes the KV cache under the name the model's forward declares, so no
deprecation warning is printed on every call, and outputs stay transformers' own greedy ones."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY, hf_greedy, tiny_llama, tiny_qwen2

from aded.backends.hf import HFRunner
from aded.budget import VerifyAll
from aded.decoding import GenerationConfig, SpeculativeDecoder
from aded.drafters.pld import PromptLookupDrafter

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]  # repeats, so prompt lookup drafts trees


def tiny_cohere():
    """Its logits are scaled after the head, so the runner uses the model's own forward."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=96, logit_scale=0.5, eos_token_id=None, pad_token_id=0, **TINY)
    return CohereForCausalLM(config).to(torch.float64).eval()  # float64, as conftest's models


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_cohere], ids=["llama", "qwen2", "cohere"])
def test_generate_emits_no_future_warning_and_stays_greedy(factory):
    model = factory()
    decoder = SpeculativeDecoder(HFRunner(model), PromptLookupDrafter(), (), VerifyAll())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = decoder.generate(PROMPT, GenerationConfig(max_new_tokens=12)).token_ids
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []
    assert ids == hf_greedy(model, PROMPT, 12)
