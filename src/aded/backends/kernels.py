"""Matrix products for the few rows a tree verification multiplies, with the fastest CPU kernel.

Verifying a tree runs 1 + k rows through every linear layer. On a CPU, `F.linear` (`x @ W.T`, the
weight read as a transposed view) handles 2-32 rows badly: on SmolLM2-135M with 2 threads, one step
of 2 rows costs ~1.7x a step of 1 row although the weights, which dominate the time, are read once
either way. Computing `(W @ x.T).T` and making the result contiguous is the same product with the
roles swapped (the weight is the big left operand, read in place); it brought that step to ~1.15x.
Which kernel wins depends on the row count, the machine and the BLAS, so it is timed, once per row
bucket, on the real workload: a sweep over all the weights that share the choice. The runner times
every bucket when it is built (~2 s for SmolLM2-135M), not inside a request.

Every candidate computes the same fp32 product; they differ only in summation order (~1e-6
relative), as any two BLAS kernels do. The tree already runs at other shapes than plain decoding,
so this adds no new kind of difference. Only fp32 on the CPU is tuned; other dtypes and devices
keep `F.linear`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["BUCKETS", "KERNELS", "FastLinear", "KernelChoice", "fast_linears", "row_bucket", "tunable",
           "tune_all"]

BUCKETS = (1, 2, 4, 8, 16, 32)
Kernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def row_bucket(rows: int) -> int:
    """The bucket a row count is tuned in; 0 for many rows (prefill), where `F.linear` is right."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return 0


def tunable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # contiguous: a transposed view as the next layer's input costs more than this copy saves
    out = (weight @ x.T).T.contiguous()  # [rows, out_features]
    return out if bias is None else out.add_(bias)


KERNELS: dict[str, Kernel] = {"linear": linear, "transposed": transposed}


class KernelChoice:
    """Per row bucket, the name of the fastest candidate, timed on first use of the bucket (the
    transformers runner times them all when it is built: `tune`).

    `candidates` maps a name to a workload run on a [rows, in_features] sample: the whole sweep
    the choice will serve, so the timing sees the weights stream from memory as they will.
    """

    def __init__(self, candidates: Mapping[str, Callable[[torch.Tensor], object]], in_features: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.candidates = candidates
        self.in_features = in_features
        self.dtype, self.device = dtype, device
        self.choice: dict[int, str] = {}

    def pick(self, rows: int, default: str = "linear") -> str:
        bucket = row_bucket(rows)
        if bucket == 0:
            return default
        name = self.choice.get(bucket)
        if name is None:
            name = self.choice[bucket] = self._fastest(bucket, default)
        return name

    def tune(self) -> None:
        """Time every bucket now. Tuned lazily, a bucket's first step takes ~10x a step (0.3-0.6 s
        on SmolLM2-135M, 2 threads): a request would pay it, and the budget would read it as what
        that tree size costs."""
        for bucket in BUCKETS:
            self.pick(bucket)

    @torch.inference_mode()
    def _fastest(self, rows: int, default: str) -> str:
        sample = torch.randn((rows, self.in_features), dtype=self.dtype, device=self.device)
        runnable = {}
        for name, run in self.candidates.items():
            try:
                run(sample)  # warm up
            except RuntimeError:  # a kernel this build or machine cannot run
                continue
            runnable[name] = run
        best = {name: float("inf") for name in runnable}
        for _ in range(3):  # interleaved rounds, each candidate's best kept: noise only adds time
            for name, run in runnable.items():
                start = time.perf_counter()
                run(sample)
                best[name] = min(best[name], time.perf_counter() - start)
        return min(best, key=best.__getitem__) if best else default


class FastLinear(torch.nn.Module):
    """Stands in for an `nn.Linear` (sharing its weight and bias) in the runner's view of the model."""

    def __init__(self, linear_module: torch.nn.Linear, choice: KernelChoice | None) -> None:
        super().__init__()
        self.weight = linear_module.weight
        self.bias = linear_module.bias
        self.choice = choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        name = "linear" if self.choice is None else self.choice.pick(rows)
        if name == "linear":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = KERNELS[name](x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def fast_linears(module: torch.nn.Module) -> torch.nn.Module:
    """A view of `module` whose `nn.Linear` layers pick their kernel per row count.

    The original is not touched (the same model may serve plain `generate` beside us): the view is
    a tree of shallow module copies that share every parameter and buffer with it.
    """
    linears = [m for m in module.modules() if type(m) is torch.nn.Linear]
    if not linears or not all(tunable(m.weight) for m in linears):
        return module
    weights = [(m.weight, m.bias) for m in linears]
    choices: dict[int, KernelChoice] = {}
    for in_features in sorted({m.in_features for m in linears}):
        mine = [(w, b) for w, b in weights if w.shape[1] == in_features]
        candidates = {name: _sweep(kernel, mine) for name, kernel in KERNELS.items()}
        choices[in_features] = KernelChoice(candidates, in_features, linears[0].weight.dtype,
                                            linears[0].weight.device)
    return _swap(module, lambda m: FastLinear(m, choices[m.in_features]))


def tune_all(module: torch.nn.Module) -> None:
    """Tune every kernel choice of a `fast_linears` view now (each choice once)."""
    choices = {id(m.choice): m.choice for m in module.modules() if isinstance(m, FastLinear) and m.choice}
    for choice in choices.values():
        choice.tune()


def _sweep(kernel: Kernel, weights) -> Callable[[torch.Tensor], None]:
    def run(x: torch.Tensor) -> None:
        for weight, bias in weights:
            kernel(x, weight, bias)
    return run


def _swap(module: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> torch.nn.Module:
    if type(module) is torch.nn.Linear:
        return make(module)
    clone = copy.copy(module)  # shares _parameters and _buffers; only the children are new
    # torch keeps children in `_modules` (what `named_children` reads); replacing that dict on the
    # shallow copy is how the copy gets new children without the original losing its own
    clone._modules = {name: None if child is None else _swap(child, make)
                      for name, child in module.named_children()}
    return clone
