"""The drafter protocol: every draft source speaks it, the decoding loop knows nothing else.

Lifecycle of one request (one `generate` call):

    drafter.begin(prompt_ids)
    loop:
        tree = drafter.propose(context_ids, max_nodes)   # context_ids[-1] is the tree's root
        ... the model verifies the tree ...
        drafter.observe(feedback)                          # what was accepted, what the model said
    drafter.end(emitted)                                   # how many tokens the request output

Drafters propose token ids only; they never touch model tensors. An empty tree is a normal answer
(the step then decodes one token, as plain decoding would). Per-request state is reset by `begin`.

`Drafter` is that lifecycle and what a drafter declares (`name`, `wants_topk`, `needs_tokenizer`,
`expensive`), nothing more. A drafter whose learned statistics should outlive a request (to be
saved, loaded, shared by concurrent requests or replicas) is a `LearningDrafter`; every surface
(API, server, benchmark, vLLM proposer) asks `isinstance(drafter, LearningDrafter)` before it
touches learned state, so a drafter that learns nothing carries no state methods at all.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aded.tree import DraftTree

if TYPE_CHECKING:
    from aded.drafters.counts import CountTable

__all__ = ["Drafter", "LearningDrafter", "StepFeedback", "NoDrafter", "load_state", "sibling_of"]


@dataclass(frozen=True)
class StepFeedback:
    """What one verification step showed about a proposed tree.

    `context_ids` is a snapshot, not the loop's own list: the loop goes on extending its context
    after `observe` returns, so a drafter may keep this tuple without copying it.

    `model_topk` holds, when the drafter asked for it (`Drafter.wants_topk > 0`), the target model's
    top tokens after the root (row 0) and after every node i of the tree (row i + 1), best first.
    Those logits are computed by verification anyway, so they are free evidence of what the model
    says after each drafted context, accepted or not.
    """

    context_ids: tuple[int, ...]  # committed tokens before the step (last = root), read-only
    tree: DraftTree
    accepted_nodes: tuple[int, ...]  # tree indices on the accepted path, root's child first
    accepted_ids: tuple[int, ...]  # their tokens
    bonus_id: int  # the model's own token after the accepted path
    model_topk: np.ndarray | None = None  # [1 + len(tree), wants_topk] int64

    @property
    def committed(self) -> tuple[int, ...]:
        """The tokens the step added to the context: the accepted path, then the bonus."""
        return (*self.accepted_ids, self.bonus_id)


class Drafter(ABC):
    """Base class and protocol. Subclasses override `propose` and, to learn from verification,
    `observe`."""

    name: str = "base"
    #: how many of the model's top next tokens per verified node `observe` should receive (0 = none)
    wants_topk: int = 0
    #: whether its constructor takes `tokenizer=` (to find or check a datastore)
    needs_tokenizer: bool = False
    #: whether drafting costs a search rather than a lookup (a combiner asks it only when the
    #: cheap sources are unsure)
    expensive: bool = False

    def begin(self, prompt_ids: Sequence[int]) -> None:  # noqa: B027
        """A new request starts with these prompt tokens (per-request state is reset here)."""

    @abstractmethod
    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        """A tree of at most `max_nodes` nodes continuing `context_ids` (do not mutate it).

        `max_nodes` may be 0 (the loop skips drafting on this step): answer an empty tree cheaply,
        keeping up with the context and forgetting the last proposal, as `observe` will judge none.
        """

    def observe(self, feedback: StepFeedback) -> None:  # noqa: B027
        """The verification result of the last proposal."""

    def end(self, emitted: int | None = None) -> None:  # noqa: B027
        """The request finished; fold what it taught into long-lived state if the drafter learns.

        `emitted` is how many tokens the request output: the last step may have accepted more than
        that (the loop cuts at an end token, a stop string or the token limit), and tokens past the
        cut were never the model's answer, so they are not learned. None: all the drafter saw.
        """


class LearningDrafter(Drafter):
    """A drafter that keeps what requests teach it: its learned state is worth saving and sharing.

    The state is plain named arrays (`state_dict` / `load_state_dict`, saved in the one format of
    `aded.drafters.state_file`), so no holder needs to know what is inside.
    """

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """What it learned across requests as named plain arrays (copies; call between requests)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace what it learned by `state_dict()` arrays; ValueError when they do not fit."""

    def spawn(self) -> Drafter:
        """A drafter for a concurrent request (a batch row) that shares this one's learned state.

        The default shares every attribute, which suits learned state held in attributes; a drafter
        whose per-request state sits inside a shared object overrides it.
        """
        return _fresh_copy(self)

    def use_shared_counts(self, table: CountTable) -> bool:
        """Draft from `table`, cross-request tri-gram counts kept by someone else (the replicas'
        shared state, which records outputs itself), instead of learning counts; False when this
        drafter has no such layer."""
        return False


def sibling_of(drafter: Drafter) -> Drafter:
    """A drafter for a concurrent request: a learner's `spawn` (sharing what it learns), else a
    shallow copy starting a fresh request (whatever it keeps across requests stays shared too)."""
    return drafter.spawn() if isinstance(drafter, LearningDrafter) else _fresh_copy(drafter)


def load_state(drafter: Drafter, state: Mapping[str, np.ndarray]) -> None:
    """Load learned arrays into any drafter: one that learns nothing takes none, so arrays offered
    to it belong to another drafter and are refused (ValueError) rather than silently dropped."""
    if isinstance(drafter, LearningDrafter):
        drafter.load_state_dict(state)
    elif state:
        raise ValueError(f"the {drafter.name} drafter learns nothing, but got arrays {sorted(state)}")


def _fresh_copy(drafter: Drafter) -> Drafter:
    sibling = copy.copy(drafter)
    sibling.begin(())
    return sibling


class NoDrafter(Drafter):
    """Proposes nothing: plain decoding through the same loop."""

    name = "none"

    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        return DraftTree.empty()
