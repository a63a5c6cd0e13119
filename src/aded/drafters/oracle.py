"""The oracle: drafts a recorded output itself, the ceiling of any drafter on that recording.

The benchmark and replay measure how far real drafters are from the best possible one: a drafter
that knows what the model will say. It needs that answer before each request (`expect`), so it is
not in the registry of drafters a user can pick; only whoever holds a recording can build one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aded.drafters.base import Drafter
from aded.tree import DraftTree

__all__ = ["OracleDrafter"]


class OracleDrafter(Drafter):
    """Proposes the recorded continuation as a chain of `max_nodes` tokens.

    Every node scores 1.0, so the cost-aware budget keeps the chain length that pays most on this
    machine. Once the context leaves the recording (a sampled or numerically different run), it
    proposes nothing, which is plain decoding.
    """

    name = "oracle"

    def __init__(self, output_ids: Sequence[int] = ()) -> None:
        self._prompt_len = 0
        self.expect(output_ids)

    def expect(self, output_ids: Sequence[int]) -> None:
        """The recorded output of the next request (call before its `begin`)."""
        self._expected = [int(t) for t in output_ids]

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self._prompt_len = len(prompt_ids)

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        done = len(context_ids) - self._prompt_len  # generated tokens so far (the root included)
        expected = self._expected
        if max_nodes <= 0 or done < 1 or done >= len(expected) or expected[done - 1] != context_ids[-1]:
            return DraftTree.empty()
        chain = expected[done : done + max_nodes]
        return DraftTree(np.asarray(chain), np.arange(-1, len(chain) - 1), scores=np.ones(len(chain)))
