import pytest
import torch

from aded.backends.head import FastHead
from aded.backends.hf import HFRunner
from conftest import tiny_llama


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


def test_runner_splits_decoder_and_head_only_when_exact():
    model = tiny_llama().float()
    runner = HFRunner(model)
    assert runner._decoder is not None
    seq = runner.new_sequence(16)
    with torch.inference_mode():
        expected = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
    torch.testing.assert_close(runner.prefill(seq, [5, 6, 7]), expected, rtol=1e-4, atol=1e-4)
