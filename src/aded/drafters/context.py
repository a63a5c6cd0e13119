"""Following the context a drafter is handed, step after step.

Within a request the loop only ever appends to the context, so a drafter keeps what it derived
from the tokens it has seen (an n-gram index, counts, an alignment) and takes in only the new ones.
Any other context (a request that began without `begin`, a replayed or rewritten history, a batch
row handed to another request) restarts it: derived state of another text would draft its words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from aded.drafters.base import StepFeedback

__all__ = ["FollowsContext", "continuation"]


def continuation(seen: Sequence[int] | np.ndarray, context: Sequence[int], *, whole: bool = False) -> Sequence[int] | None:
    """The tokens `context` adds to `seen`, or None when it does not continue `seen`.

    By default only the last seen token is compared with the token at its place: contexts within a
    request only grow, so that tells a new request apart at O(1) a step. `whole=True` compares every
    seen token, for a caller matching one context against several histories (vLLM's batch rows).
    """
    n = len(seen)
    if len(context) < n or (n and int(context[n - 1]) != int(seen[n - 1])):
        return None
    if whole and list(context[:n]) != list(seen):
        return None
    return context[n:]


class FollowsContext(ABC):
    """Mixin for whatever keeps derived state over the tokens it has seen (`_seen`), extends it by
    new tokens (`_take`) and rebuilds it from scratch with its own `begin(context)`."""

    @abstractmethod
    def _seen(self) -> Sequence[int] | np.ndarray:
        """The tokens the derived state covers, in order."""

    @abstractmethod
    def _take(self, tokens: Sequence[int]) -> None:
        """Extend the derived state by tokens that follow `_seen()`."""

    if TYPE_CHECKING:

        def begin(self, prompt_ids: Sequence[int]) -> None: ...

    def _follow(self, context_ids: Sequence[int]) -> None:
        """Catch up with `context_ids`: take in its new tokens, or restart on it."""
        new = continuation(self._seen(), context_ids)
        if new is None:
            self.begin(context_ids)
        elif len(new):
            self._take(new)

    def _follow_step(self, feedback: StepFeedback) -> None:
        """Take in what a verified step committed, so that `end` sees the last step too.

        The step normally continues the context the last proposal saw, and then the committed
        tokens are taken without rebuilding the whole context.
        """
        if len(feedback.context_ids) == len(self._seen()):
            self._take(feedback.committed)
        else:
            self._follow((*feedback.context_ids, *feedback.committed))
