"""The benchmark's methods decode alike: the same greedy/sampling decision, the same stop tokens,
and transformers' baseline with nothing of the model's or transformers' own defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import import_llama_cpp, tiny_llama, tiny_tokenizer
from scipy import stats

from aded.api import Aded
from aded.backends.hf import HFRunner
from aded.bench.catalog import build_methods
from aded.bench.methods import AdedMethod, DecodeSettings, HFGenerate
from aded.budget import VerifyAll

PROMPT = [1, 2, 3, 4]


def settings(**fields) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=fields.pop("max_new_tokens", 1), eos_token_ids=(), pad_token_id=0,
                          **fields)


def methods(runner, decode: DecodeSettings) -> tuple[HFGenerate, AdedMethod]:
    built = build_methods(["none"], None, runner, decode, lambda: VerifyAll())
    return built.methods[0], built.methods[1]


def test_temperature_zero_is_greedy_for_every_method():
    runner = HFRunner(tiny_llama(vocab_size=64, seed=1))
    for temperature, greedy in ((0.0, True), (0.7, False)):
        hf, aded = methods(runner, settings(temperature=temperature))
        assert settings(temperature=temperature).greedy is greedy
        assert hf.config.do_sample is aded.config.do_sample is (not greedy)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        _ = settings(temperature=-0.5).greedy


def test_sampled_hf_baseline_draws_from_the_same_distribution_as_aded():
    # near-uniform over 64 tokens: transformers' default top_k=50 would drop a fifth of the mass
    model = tiny_llama(vocab_size=64, seed=3)
    runner = HFRunner(model)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1], -1).numpy()  # [64]
    assert np.sort(expected)[:14].sum() > 0.1  # the tail top_k=50 would cut is large
    runs = 1500
    counts = {"hf": np.zeros(64), "aded": np.zeros(64)}
    for seed in range(runs):
        for method in methods(runner, settings(temperature=1.0, top_k=0, seed=seed)):
            counts["hf" if isinstance(method, HFGenerate) else "aded"][method.run(PROMPT, None).output_ids[0]] += 1
    for name, observed in counts.items():
        result = stats.chisquare(observed, expected * runs)
        assert result.pvalue > 1e-4, (name, observed)
    both = stats.chi2_contingency(np.stack([counts["hf"], counts["aded"]]) + 0.5)
    assert both.pvalue > 1e-4


def test_hf_baseline_ignores_the_models_generation_defaults():
    model = tiny_llama(vocab_size=64, seed=4)
    prompt = list(range(1, 40))
    runner = HFRunner(model)
    config = model.generation_config
    config.do_sample, config.top_k, config.repetition_penalty, config.no_repeat_ngram_size = True, 3, 5.0, 1
    with torch.inference_mode():  # the defaults do change transformers' own greedy output
        leaked = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):]
    hf, aded = methods(runner, settings(max_new_tokens=12))
    output = hf.run(prompt, None).output_ids
    assert output == aded.run(prompt, None).output_ids
    assert output != leaked.tolist()


def test_bench_settings_stop_where_aded_load_stops_on_hf():
    model = tiny_llama(vocab_size=99, seed=1)
    model.generation_config.eos_token_id = 7
    tokenizer = tiny_tokenizer()
    lm = Aded(model, tokenizer, drafter="none", budget="off")
    decode = DecodeSettings.for_model(lm.runner, tokenizer, 4)
    assert decode.eos_token_ids == (2, 7) == tuple(sorted(lm.decoder.eos_token_ids))
    assert decode.pad_token_id == 2  # no pad token: the smallest stop token


def test_bench_settings_stop_where_aded_load_stops_on_llama_cpp(tmp_path):
    import_llama_cpp()
    from gguf_models import write_tiny_gguf

    from aded.backends.llama_cpp import LlamaCppRunner
    from aded.models import load_tokenizer

    runner = LlamaCppRunner(write_tiny_gguf(tmp_path / "tiny.gguf"), n_ctx=256, n_threads=1)
    try:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        lm = Aded(runner, tokenizer, drafter="none", budget="off")
        decode = DecodeSettings.for_model(runner, tokenizer, 4)
        assert 2 in decode.eos_token_ids  # <|im_end|>
        assert decode.eos_token_ids == tuple(sorted(lm.decoder.eos_token_ids))
    finally:
        runner.close()
