"""The LM head (hidden states -> logits) with the fastest CPU kernel for each row count.

The head is the largest single matrix (SmolLM2: 49152 x 576), and `F.linear` handles its 2-32 row
products badly (2 rows cost 2.5x one row). Beside the decoder's candidates (`aded.backends.kernels`)
the head may also run oneDNN on a pre-packed copy of its weights; the fastest is timed per row
bucket.
"""

from __future__ import annotations

import torch

from aded.backends.kernels import KERNELS, KernelChoice, tunable

__all__ = ["FastHead"]


class FastHead:
    """`head(hidden) -> logits` for hidden [rows, hidden_size]; rows picked by a per-bucket kernel."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.weight = linear.weight  # [vocab, hidden], shared with the model (tied embeddings stay tied)
        self.bias = getattr(linear, "bias", None)
        self._kernels = {"linear": lambda x: KERNELS["linear"](x, self.weight, self.bias)}
        self.choice = None
        if tunable(self.weight):
            self._kernels["transposed"] = lambda x: KERNELS["transposed"](x, self.weight, self.bias)
            if torch.backends.mkldnn.is_available() and self.bias is None:
                self._mkldnn_weight = self.weight.detach().to_mkldnn()
                self._kernels["onednn"] = self._onednn
            self.choice = KernelChoice(self._kernels, self.weight.shape[1], self.weight.dtype,
                                       self.weight.device)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self._mkldnn_weight, None).to_dense()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        name = "linear" if self.choice is None else self.choice.pick(hidden.shape[0])
        return self._kernels[name](hidden)
