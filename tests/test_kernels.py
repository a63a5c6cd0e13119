"""Few-row kernels compute the model's own products, and never alter the model they view."""

import pytest
import torch
from conftest import hf_greedy, tiny_llama
from test_decoding import ScriptedDrafter, decoder_for

from aded.backends.head import FastHead
from aded.backends.hf import HFRunner
from aded.backends.kernels import BUCKETS, KERNELS, FastLinear, fast_linears
from aded.decoding import GenerationConfig


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_every_kernel_computes_the_linear_layer(rows, bias):
    linear = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(rows, 64)
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
    for kernel in KERNELS.values():
        got = kernel(x, linear.weight, linear.bias)
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 17, 40])
def test_every_kernel_computes_the_head(rows):
    linear = torch.nn.Linear(64, 500, bias=False)
    head = FastHead(linear)
    x = torch.randn(rows, 64)
    expected = torch.nn.functional.linear(x, linear.weight)
    assert len(head._kernels) >= 2  # fp32 on the CPU: alternatives to F.linear are on offer
    for kernel in head._kernels.values():
        torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_the_view_shares_weights_and_leaves_the_model_alone():
    model = tiny_llama().float()
    decoder = model.get_decoder()
    view = fast_linears(decoder)
    swapped = [m for m in view.modules() if isinstance(m, FastLinear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers
    assert not any(isinstance(m, FastLinear) for m in model.modules())  # the original keeps nn.Linear
    originals = {p.data_ptr() for p in model.parameters()}
    assert all(m.weight.data_ptr() in originals for m in swapped)
    with torch.inference_mode():
        for rows in (1, 3, 9, 40):
            ids = torch.randint(0, 96, (1, rows))
            torch.testing.assert_close(view(input_ids=ids).last_hidden_state,
                                       decoder(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_other_dtypes_keep_the_model_as_it_is():
    decoder = tiny_llama().get_decoder()  # float64
    assert fast_linears(decoder) is decoder


def test_the_runner_tunes_every_bucket_when_it_is_built():
    """Tuned on first use, a bucket's first verification took ~10x a step inside a request."""
    runner = HFRunner(tiny_llama().float())
    choices = {id(m.choice): m.choice for m in runner._decoder.modules() if isinstance(m, FastLinear)}
    assert choices
    for choice in [*choices.values(), runner._head.choice]:
        assert set(choice.choice) == set(BUCKETS)
        assert set(choice.choice.values()) <= set(choice.candidates)


def test_runner_splits_decoder_and_head_only_when_exact():
    model = tiny_llama().float()
    runner = HFRunner(model)
    assert runner._decoder is not None
    seq = runner.new_sequence(16)
    with torch.inference_mode():
        expected = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
    torch.testing.assert_close(runner.prefill(seq, [5, 6, 7]).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_fp32_trees_through_each_kernel_equal_greedy(kernel):
    # peaked logits: fp32 rounding must not decide an argmax of a random model
    model = tiny_llama(logit_scale=40.0).float()
    prompt = [5, 9, 13, 5, 9, 13, 22, 31, 5, 9]
    reference = hf_greedy(model, prompt, 40)
    drafter = ScriptedDrafter(reference, len(prompt), seed=3, vocab=96)
    decoder = decoder_for(model, drafter)
    for module in decoder.runner._decoder.modules():
        if isinstance(module, FastLinear):
            module.choice.choice = dict.fromkeys(BUCKETS, kernel)  # forced, not timed
    result = decoder.generate(prompt, GenerationConfig(max_new_tokens=40, max_draft_nodes=16))
    assert result.token_ids == reference
    assert result.stats.mean_accepted_tokens > 1.5  # trees of several rows were verified
