"""The LM head (hidden states -> logits) with the fastest CPU kernel for each row count.

Verifying a tree multiplies a handful of rows (1 + draft nodes) by the vocabulary matrix. On a CPU,
`F.linear` handles 2-32 rows badly: for SmolLM2's 49152 x 576 head, 2 rows cost 2.5x one row,
although the weights are read once either way. Computing `W @ x.T` instead, or running oneDNN on a
pre-packed copy of the weights, costs a fraction of that; which is fastest depends on the row count
and the machine. So the head times the candidates once per row-count bucket and keeps the winner.

All candidates compute the same product in fp32; they differ only in summation order (~1e-6
relative), as any two BLAS kernels do. The tree itself already runs at other shapes than plain
decoding, so this adds no new kind of difference.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["FastHead"]

_BUCKETS = (1, 2, 4, 8, 16, 32)


def _bucket(rows: int) -> int:
    for size in _BUCKETS:
        if rows <= size:
            return size
    return 0  # many rows (prefill chunks): plain linear is fine there


class FastHead:
    """`head(hidden) -> logits` for hidden [rows, hidden_size]; rows picked by a per-bucket kernel."""

    def __init__(self, linear: torch.nn.Module) -> None:
        self.weight = linear.weight  # [vocab, hidden], shared with the model (tied embeddings stay tied)
        self.bias = getattr(linear, "bias", None)
        self._kernels: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "linear": lambda x: torch.nn.functional.linear(x, self.weight, self.bias),
        }
        self.enabled = self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
        if self.enabled:
            self._kernels["transposed"] = self._transposed
            if torch.backends.mkldnn.is_available() and self.bias is None:
                self._mkldnn_weight = self.weight.detach().to_mkldnn()
                self._kernels["onednn"] = self._onednn
        self._choice: dict[int, str] = {}

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        out = (self.weight @ x.T).T  # [rows, vocab], a transposed view
        return out if self.bias is None else out + self.bias

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self._mkldnn_weight, None).to_dense()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        bucket = _bucket(hidden.shape[0]) if self.enabled else 0
        if bucket == 0:
            return self._kernels["linear"](hidden)
        name = self._choice.get(bucket)
        if name is None:
            name = self._choice[bucket] = self._fastest(bucket, hidden)
        return self._kernels[name](hidden)

    def _fastest(self, rows: int, like: torch.Tensor) -> str:
        sample = torch.randn((rows, like.shape[-1]), dtype=like.dtype, device=like.device)
        best, best_time = "linear", float("inf")
        for name, kernel in self._kernels.items():
            try:
                kernel(sample)  # warm up
            except RuntimeError:  # a kernel this build or machine cannot run
                continue
            start = time.perf_counter()
            for _ in range(3):
                kernel(sample)
            elapsed = time.perf_counter() - start
            if elapsed < best_time:
                best, best_time = name, elapsed
        return best
