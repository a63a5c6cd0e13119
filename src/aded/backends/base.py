"""The runner protocol: what the decoding loop, the budget, the API, the server and the benchmark
need from a model, whichever engine runs it.

A runner holds one model and serves one sequence at a time:

    seq = runner.new_sequence(capacity)          # a fresh KV state for one request
    logits, reused = runner.prefill(seq, prompt_ids)   # [vocab] after the prompt's last token
    loop:
        logits = runner.verify(seq, root_id, tree)   # [1 + k, vocab]: row 0 after the root,
                                                     # row i + 1 after tree node i
        runner.commit(seq, accepted_nodes)           # keep root + accepted path, drop the rest

Logits cross this boundary as CPU float32 torch tensors, whatever the device or engine: acceptance,
sampling and the drafters' feedback then never touch device memory or engine buffers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from aded.tree import DraftTree

__all__ = ["Runner", "Prefill", "BACKENDS", "physical_cores"]

#: the engines a model can run on; "auto" picks llama.cpp for GGUF files when it is installed
BACKENDS = ("auto", "hf", "llama.cpp")


def physical_cores() -> int:
    """CPU cores without hyper-threads: the default thread count of both engines."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class Prefill(NamedTuple):
    """What a prefill computed, and how much of the prompt it did not have to."""

    logits: torch.Tensor  # [vocab] CPU float32, after the prompt's last token
    reused: int  # prompt tokens kept from the previous sequence (0 on engines that run it whole)


@runtime_checkable
class Runner(Protocol):
    #: "hf" or "llama.cpp": which plain decoding is this runner's baseline
    backend: str
    vocab_size: int
    #: positions (tokens) one sequence may hold: the prompt, the output and one step's tree
    max_positions: int
    #: most root-to-leaf paths one verification may carry (None: any tree)
    max_tree_leaves: int | None
    #: most draft nodes one verification may carry (None: any number; 0: plain decoding only)
    max_tree_nodes: int | None
    #: token ids that end generation as the model's own plain decoding stops on them
    eos_token_ids: tuple[int, ...]

    def new_sequence(self, capacity: int) -> Any:
        """Fresh per-request state for up to `capacity` positions (the previous one is void)."""

    def prefill(self, seq: Any, input_ids: Sequence[int]) -> Prefill:
        """Run the prompt (what it shares with the previous sequence may be kept, bit for bit)."""

    def forget(self, keep: Sequence[int] = ()) -> None:
        """Keep of earlier sequences at most the prefix they share with `keep` (by default nothing:
        the next prefill runs its prompt whole; one client's cached prompt is not another's)."""

    def verify(self, seq: Any, root_id: int, tree: DraftTree) -> torch.Tensor:
        """One forward over the root (the last committed token, not yet cached) and the tree."""

    def commit(self, seq: Any, accepted_nodes: Sequence[int]) -> None:
        """After `verify`: keep the root and the accepted path, in order; drop rejected nodes."""

    def rewind(self, seq: Any, length: int) -> None:
        """Forget every position from `length` on: timing runs undo their steps with it, and the
        loop leaves a finished sequence holding what plain decoding would have cached."""

    def cost_identity(self) -> str:
        """What a measured t(k) depends on besides the model: engine, dtype, device, threads."""

    def describe(self) -> dict[str, Any]:
        """Engine facts for benchmark reports (versions, threads, dtype or file type)."""
