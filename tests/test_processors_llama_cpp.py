"""Processors on the llama.cpp runner: with wide draft trees through sequence ids, the output (greedy
and sampled for a seed) and the logprobs are those of plain decoding through the same runner."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import import_llama_cpp

import_llama_cpp()  # fails when missing; skips only under ADED_SKIP_LLAMA=1

from gguf_models import write_tiny_gguf  # noqa: E402
from test_llama_cpp import ScriptedDrafter  # noqa: E402

from aded.backends.llama_cpp import LlamaCppRunner  # noqa: E402
from aded.budget import VerifyAll  # noqa: E402
from aded.decoding import GenerationConfig, SpeculativeDecoder  # noqa: E402
from aded.drafters import make_drafter  # noqa: E402
from aded.drafters.base import NoDrafter  # noqa: E402


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3)
    runner = LlamaCppRunner(path, n_ctx=1024, n_threads=1, max_leaves=4)
    yield runner
    runner.close()


def generate(runner, drafter, prompt, config):
    return SpeculativeDecoder(runner, drafter, runner.eos_token_ids, VerifyAll()).generate(
        prompt, config)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_processors_with_trees_equal_plain_decoding_through_the_runner(runner, do_sample):
    prompt = np.random.default_rng(2).integers(3, runner.vocab_size, 12).tolist() * 2
    # this tiny model repeats its last token; the penalties make it say something else each time
    fields = dict(max_new_tokens=40, max_draft_nodes=24, repetition_penalty=2.0, presence_penalty=1.0,
                  frequency_penalty=0.5, logprobs=True, top_logprobs=2, do_sample=do_sample,
                  temperature=4.0, top_k=50, min_p=0.05, seed=3)
    penalised = generate(runner, NoDrafter(), prompt, GenerationConfig(**fields)).token_ids
    bias = {penalised[1]: -100, penalised[6]: 2.0}
    biased = generate(runner, NoDrafter(), prompt, GenerationConfig(**fields, logit_bias=bias)).token_ids
    config = GenerationConfig(**fields, logit_bias=bias, stop_token_ids=[biased[20]], min_tokens=4)
    expected = generate(runner, NoDrafter(), prompt, config)
    assert expected.token_ids == biased[:21] and expected.finish_reason == "stop"
    assert len(set(expected.token_ids)) > 10 and penalised[1] not in expected.token_ids
    for seed in range(3):
        drafter = ScriptedDrafter(expected.token_ids, len(prompt), seed, runner.vocab_size, paths=8)
        for candidate in (drafter, make_drafter("pld")):
            result = generate(runner, candidate, prompt, config)
            assert result.token_ids == expected.token_ids
            assert result.finish_reason == expected.finish_reason
            assert [e.token_id for e in result.logprobs] == expected.token_ids
            ours = np.array([e.logprob for e in result.logprobs])
            assert np.allclose(ours, [e.logprob for e in expected.logprobs], atol=1e-4)
            if candidate is drafter:
                assert result.stats.steps < len(result.token_ids) - 1  # drafts were accepted
