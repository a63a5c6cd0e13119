"""A runner whose greedy output is a fixed script, and a drafter that knows the script: steps then
commit exactly the tokens a test chooses, with no model (long outputs cost next to nothing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aded.backends.base import Prefill
from aded.drafters.base import Drafter
from aded.tree import DraftTree


class ScriptedRunner:
    """Predicts `script[g]` after the g-th generated token, whatever the context (a runner, see
    backends/base.py)."""

    backend = "hf"
    max_tree_leaves = None
    max_tree_nodes = None
    eos_token_ids = ()

    def __init__(self, script: Sequence[int], vocab_size: int, max_positions: int = 100_000) -> None:
        self.script = list(script)
        self.vocab_size = vocab_size
        self.max_positions = max_positions

    def new_sequence(self, capacity: int) -> dict:
        return {"generated": 0}

    def prefill(self, seq: dict, input_ids: Sequence[int]) -> Prefill:
        seq["generated"] = 1  # the token these logits choose
        return Prefill(self._logits([0])[0], 0)

    def verify(self, seq: dict, root_id: int, tree: DraftTree) -> torch.Tensor:
        ahead = [seq["generated"] + d for d in [0, *tree.depths.tolist()]]
        return self._logits(ahead)  # [1 + k, vocab]

    def commit(self, seq: dict, accepted_nodes: Sequence[int]) -> None:
        seq["generated"] += len(accepted_nodes) + 1

    def _logits(self, positions: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(positions), self.vocab_size)
        for row, position in enumerate(positions):
            logits[row, self.script[min(position, len(self.script) - 1)]] = 1.0
        return logits

    def rewind(self, seq: dict, length: int) -> None:
        """Nothing to take back: a script holds no cells (and tests build the decoder with a
        budget that never times it)."""

    def forget(self, keep=()) -> None:
        pass

    def cost_identity(self) -> str:
        return "scripted"

    def describe(self) -> dict:
        return {}


class ScriptDrafter(Drafter):
    """Proposes the next `depth` tokens of the script as a chain: every draft is accepted."""

    name = "script"

    def __init__(self, script: Sequence[int], prompt_len: int, depth: int) -> None:
        self.script = list(script)
        self.prompt_len = prompt_len
        self.depth = depth

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        done = len(context_ids) - self.prompt_len
        return DraftTree.chain(self.script[done: done + min(self.depth, max_nodes)])
