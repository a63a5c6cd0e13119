"""The decoding loop: prefill, then propose -> verify -> accept -> commit until done.

It knows token ids only (text, chat templates and stop strings are the caller's, through
`stop_check`). Every drafter, including `none`, goes through the same loop; with an empty tree a
step is one single-token forward, i.e. plain decoding.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from aded.budget import BudgetPolicy
from aded.drafters.base import Drafter, StepFeedback
from aded.tree import DraftTree
from aded.verify import Acceptance, Sampling, accept_greedy, accept_sampled

__all__ = ["GenerationConfig", "GenerationStats", "GenerationResult", "SpeculativeDecoder", "fit_tree",
           "sampling_fields"]


def sampling_fields(temperature: float) -> dict[str, bool | float]:
    """`do_sample` and `temperature` for a user's temperature, decided here for every surface (API,
    CLI, server, benchmark): OpenAI's convention, 0 means greedy; above 0 samples at it."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else 1.0}


@dataclass(frozen=True)
class GenerationConfig:
    """Named as in transformers' GenerationConfig; `max_draft_nodes` bounds each draft tree."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_draft_nodes: int = 24

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.max_draft_nodes <= 1024:
            raise ValueError(f"max_draft_nodes must be in [0, 1024], got {self.max_draft_nodes}")
        self.sampling()  # validates temperature, top_k and top_p even when greedy: a typo is an error

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class GenerationStats:
    steps: int = 0  # verification steps (the prefill's first token is not one)
    generated_tokens: int = 0
    draft_nodes: int = 0  # nodes verified, summed over steps
    prefill_s: float = 0.0
    decode_s: float = 0.0  # everything after prefill: drafting, verifying, bookkeeping
    draft_s: float = 0.0
    verify_s: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens emitted per step

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens emitted per verification step, bonus included (1.0 = plain decoding)."""
        return sum(self.accepted_lengths) / self.steps if self.steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after prefill per second of decode time (the prefill's token excluded)."""
        decoded = max(0, self.generated_tokens - 1)
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("accepted_lengths")
        data["mean_accepted_tokens"] = self.mean_accepted_tokens
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only (an EOS that ended generation included)
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats


StopCheck = Callable[[list[int]], int | None]
"""Called once per step, before the step's tokens are yielded, with the ids it adds (cut after an
EOS or at the token limit), so that every generated id is seen once and in order. Returns how many
of all generated ids to keep if a stop string appeared, else None."""


class SpeculativeDecoder:
    """Lossless speculative decoding of one model with one drafter (one request at a time)."""

    def __init__(
        self,
        runner,
        drafter: Drafter,
        eos_token_ids: Sequence[int] = (),
        budget: BudgetPolicy | None = None,
    ) -> None:
        self.runner = runner
        self.drafter = drafter
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.budget = budget if budget is not None else BudgetPolicy()

    def generate(
        self, prompt_ids: Sequence[int], config: GenerationConfig, stop_check: StopCheck | None = None
    ) -> GenerationResult:
        stream = self.stream(prompt_ids, config, stop_check)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self, prompt_ids: Sequence[int], config: GenerationConfig, stop_check: StopCheck | None = None
    ) -> "DecodeStream":
        """An iterator over the tokens each step commits; `.result` is set when it ends."""
        return DecodeStream(self, list(prompt_ids), config, stop_check)


class DecodeStream:
    def __init__(self, decoder: SpeculativeDecoder, prompt_ids: list[int], config: GenerationConfig,
                 stop_check: StopCheck | None) -> None:
        self.result: GenerationResult | None = None
        self._steps = _decode(decoder, prompt_ids, config, stop_check, self)

    def __iter__(self) -> Iterator[list[int]]:
        return self._steps

    def __next__(self) -> list[int]:
        return next(self._steps)

    def close(self) -> None:
        """Stop early (e.g. a client went away); the drafter's request is ended cleanly."""
        self._steps.close()


def _decode(decoder: SpeculativeDecoder, prompt_ids: list[int], config: GenerationConfig,
            stop_check: StopCheck | None, out: DecodeStream) -> Iterator[list[int]]:
    runner, drafter, budget = decoder.runner, decoder.drafter, decoder.budget
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    limit = runner.max_positions
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context holds {limit}")
    max_new = min(config.max_new_tokens, limit - len(prompt_ids))
    generator = None
    if config.do_sample:  # a private CPU generator: logits are CPU tensors on every runner
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
    sampling = config.sampling() if config.do_sample else None

    node_limit = config.max_draft_nodes  # the runner may verify fewer exactly
    if runner.max_tree_nodes is not None:
        node_limit = min(node_limit, runner.max_tree_nodes)
    stats = GenerationStats()
    generated: list[int] = []
    finish_reason = "length"
    seq = runner.new_sequence(len(prompt_ids) + max_new + config.max_draft_nodes + 2)
    decode_start = None
    start = time.perf_counter()
    drafter.begin(prompt_ids)
    try:
        logits = runner.prefill(seq, prompt_ids)  # [vocab]
        first = _accept(DraftTree.empty(), logits[None], sampling, generator).bonus_id
        stats.prefill_s = time.perf_counter() - start
        decode_start = time.perf_counter()
        context = list(prompt_ids) + [first]
        new_ids = [first]
        while True:
            start_len = len(generated)
            generated.extend(new_ids)
            cut, finish = _finished(generated, start_len, max_new, decoder.eos_token_ids, stop_check)
            if cut is not None:
                del generated[cut:]
                if stats.accepted_lengths:  # count only what the last step really emitted
                    stats.accepted_lengths[-1] = max(0, len(generated) - start_len)
            stats.generated_tokens = len(generated)
            stats.decode_s = time.perf_counter() - decode_start
            if len(generated) > start_len:
                yield generated[start_len:]
            if finish is not None:
                finish_reason = finish
                break

            t0 = time.perf_counter()
            ask = budget.proposal_nodes(node_limit)
            tree = drafter.propose(context, ask)
            tree = fit_tree(tree, max_new - len(generated), limit - len(context))
            tree = budget.plan_step(tree, runner.max_tree_leaves)
            t1 = time.perf_counter()
            logits = runner.verify(seq, context[-1], tree)  # [1 + k, vocab]
            acceptance = _accept(tree, logits, sampling, generator)
            runner.commit(seq, acceptance.accepted_nodes)
            t2 = time.perf_counter()
            budget.observe(tree, acceptance.accepted_nodes)
            budget.observe_cost(len(tree), t2 - t1)
            topk = None
            if drafter.wants_topk:
                topk = logits.topk(drafter.wants_topk, dim=-1).indices.numpy()  # [1 + k, K]
            drafter.observe(StepFeedback(context, tree, acceptance.accepted_nodes,
                                         acceptance.accepted_ids, acceptance.bonus_id, topk))
            t3 = time.perf_counter()
            budget.observe_step(ask > 0, len(acceptance.accepted_ids) + 1, t3 - t0)
            stats.draft_s += (t1 - t0) + (t3 - t2)
            stats.verify_s += t2 - t1
            stats.steps += 1
            stats.draft_nodes += len(tree)
            new_ids = [*acceptance.accepted_ids, acceptance.bonus_id]
            stats.accepted_lengths.append(len(new_ids))
            context.extend(new_ids)
    finally:
        drafter.end()
        if decode_start is not None:
            stats.decode_s = time.perf_counter() - decode_start
        out.result = GenerationResult(generated, finish_reason, stats)


def _finished(generated: list[int], start: int, max_new: int, eos: frozenset[int],
              stop_check: StopCheck | None) -> tuple[int | None, str | None]:
    """(length to cut `generated` to, finish reason) after a step appended `generated[start:]`.

    The first to occur ends generation: an EOS, a stop string or the token limit. A step may commit
    both a stop string and an EOS, so the stop check sees the step's ids up to the EOS.
    """
    end = min(len(generated), max_new)
    eos_end = next((i + 1 for i in range(start, end) if generated[i] in eos), None)
    if eos_end is not None:
        end = eos_end
    if stop_check is not None:
        cut = stop_check(generated[start:end])
        if cut is not None:
            return cut, "stop"
    if eos_end is not None:
        return eos_end, "stop"
    if len(generated) >= max_new:
        return max_new, "length"
    return None, None


def fit_tree(tree: DraftTree, remaining: int, room: int) -> DraftTree:
    """Drop nodes that could never be emitted (deeper than the token budget or the context
    allows) and nodes beyond the positions left (a runner may store every node, not only a path)."""
    max_depth = min(remaining - 1, room - 1)
    if len(tree) == 0 or (tree.max_depth <= max_depth and len(tree) <= room):
        return tree
    keep = [i for i in range(len(tree)) if tree.depths[i] <= max_depth][: max(room, 0)]
    return tree.subtree(keep)  # a prefix of a topological order stays parent-closed


def _accept(tree: DraftTree, logits: torch.Tensor, sampling: Sampling | None,
            generator: torch.Generator | None) -> Acceptance:
    if sampling is None:
        return accept_greedy(tree, logits)
    return accept_sampled(tree, logits, sampling, generator)
