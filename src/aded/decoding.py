"""The decoding loop: prefill, then propose -> verify -> accept -> commit until done.

It knows token ids only (text, chat templates and stop strings are the caller's, through
`stop_check`). Every drafter, including `none`, goes through the same loop; with an empty tree a
step is one single-token forward, i.e. plain decoding. Requests that set processors (penalties, a
bias, `min_tokens`, a grammar) or ask for logprobs go through processors.py; others skip it entirely.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aded.backends.base import Runner
from aded.budget import Budget, CostAwareBudget, StepOutcome
from aded.drafters.base import Drafter, StepFeedback

# defined below this module (so processors.py can name the config); public here as they always were
from aded.generation_config import GenerationConfig, sampling_fields
from aded.processors import LogitsProcessor, TokenLogprob, token_logprobs
from aded.tree import DraftTree
from aded.verify import Acceptance, Sampling, accept_greedy, accept_sampled

__all__ = ["GenerationConfig", "GenerationStats", "GenerationResult", "SpeculativeDecoder", "fit_tree",
           "sampling_fields"]


@dataclass
class GenerationStats:
    steps: int = 0  # verification steps (the prefill's first token is not one)
    generated_tokens: int = 0
    draft_nodes: int = 0  # nodes verified, summed over steps
    prefill_s: float = 0.0
    decode_s: float = 0.0  # everything after prefill: drafting, verifying, bookkeeping
    draft_s: float = 0.0
    verify_s: float = 0.0
    cached_prompt_tokens: int = 0  # prompt tokens the runner kept from the previous request
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
    token_ids: list[int]  # generated tokens only (an EOS or stop id that ended generation included)
    finish_reason: str  # "stop" (EOS, stop id or stop string) or "length"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the config asked for them


StopCheck = Callable[[list[int]], int | None]
"""Called once per step, before the step's tokens are yielded, with the ids it adds (cut after an
EOS or at the token limit), so that every generated id is seen once and in order. Returns how many
of all generated ids to keep if a stop string appeared, else None."""


class SpeculativeDecoder:
    """Lossless speculative decoding of one model with one drafter (one request at a time)."""

    def __init__(
        self,
        runner: Runner,
        drafter: Drafter,
        eos_token_ids: Iterable[int] = (),
        budget: Budget | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.runner = runner
        self.drafter = drafter
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.budget: Budget = budget if budget is not None else CostAwareBudget()
        #: seconds for every timing the loop and the budget see (replay supplies simulated ones)
        self.clock = clock

    def generate(
        self, prompt_ids: Sequence[int], config: GenerationConfig, stop_check: StopCheck | None = None
    ) -> GenerationResult:
        stream = self.stream(prompt_ids, config, stop_check)
        for _ in stream:
            pass
        assert stream.result is not None  # set when the steps end
        return stream.result

    def stream(
        self, prompt_ids: Sequence[int], config: GenerationConfig, stop_check: StopCheck | None = None
    ) -> DecodeStream:
        """An iterator over the tokens each step commits; `.result` is set when it ends."""
        return DecodeStream(self, list(prompt_ids), config, stop_check)


class DecodeStream:
    """The ids each step commits; `.logprobs` (when asked for) holds one entry per id yielded so
    far, and `.result` the whole generation once it ends."""

    def __init__(self, decoder: SpeculativeDecoder, prompt_ids: list[int], config: GenerationConfig,
                 stop_check: StopCheck | None) -> None:
        self.result: GenerationResult | None = None
        self.logprobs: list[TokenLogprob] | None = [] if config.logprobs else None
        self._steps = _decode(decoder, prompt_ids, config, stop_check, self)

    def __iter__(self) -> Iterator[list[int]]:
        return self._steps

    def __next__(self) -> list[int]:
        return next(self._steps)

    def close(self) -> None:
        """Stop early (e.g. a client went away); the drafter's request is ended cleanly."""
        self._steps.close()


@dataclass
class _Request:
    """What stays fixed over one request's steps."""

    runner: Runner
    drafter: Drafter
    budget: Budget
    clock: Callable[[], float]
    seq: Any  # the runner's state of this request
    processor: LogitsProcessor | None
    sampling: Sampling | None  # None: greedy
    generator: torch.Generator | None
    node_limit: int  # most draft nodes a step may verify
    max_new: int  # most tokens to generate
    max_positions: int  # the runner's context


@dataclass
class _Step:
    tree: DraftTree  # the verified tree
    logits: torch.Tensor  # [1 + len(tree), vocab] raw, row 0 after the root
    acceptance: Acceptance
    draft_s: float
    verify_s: float

    @property
    def new_ids(self) -> list[int]:
        return [*self.acceptance.accepted_ids, self.acceptance.bonus_id]


def _speculative_step(req: _Request, context: list[int], generated: int) -> _Step:
    """One step of the method: draft a tree after `context`, keep the part worth verifying, verify
    it in one forward pass, accept what the model would have produced itself, and let the drafter
    and the budget learn from the outcome."""
    runner, drafter, budget, clock = req.runner, req.drafter, req.budget, req.clock
    t0 = clock()
    ask = budget.nodes_to_draft(req.node_limit)
    tree = drafter.propose(context, ask)
    tree = fit_tree(tree, req.max_new - generated, req.max_positions - len(context))
    if req.processor is not None:  # before the budget: only what may be emitted is worth a node
        tree = req.processor.allowed_subtree(tree)
    tree = budget.plan(tree, runner.max_tree_leaves)
    t1 = clock()
    logits = runner.verify(req.seq, context[-1], tree)  # [1 + k, vocab]
    scores = logits if req.processor is None else req.processor(logits, tree)  # each row in its context
    acceptance = _accept(tree, scores, req.sampling, req.generator)
    runner.commit(req.seq, acceptance.accepted_nodes)
    t2 = clock()
    topk = None
    if drafter.wants_topk:  # the raw logits: drafters learn the model, not one request's processors
        values, indices = logits.topk(drafter.wants_topk, dim=-1)  # [1 + k, K]
        topk = indices.masked_fill(values == float("-inf"), -1).numpy()  # -inf: no evidence
    drafter.observe(StepFeedback(tuple(context), tree, acceptance.accepted_nodes,
                                 acceptance.accepted_ids, acceptance.bonus_id, topk))
    t3 = clock()
    budget.learn(StepOutcome(tree, acceptance.accepted_nodes, ask > 0, t2 - t1, t3 - t0))
    return _Step(tree, logits, acceptance, (t1 - t0) + (t3 - t2), t2 - t1)


def _decode(decoder: SpeculativeDecoder, prompt_ids: list[int], config: GenerationConfig,
            stop_check: StopCheck | None, out: DecodeStream) -> Generator[list[int], None, None]:
    runner, drafter, clock = decoder.runner, decoder.drafter, decoder.clock
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
    end_ids = frozenset(config.stop_token_ids)  # ids that end generation
    if not config.ignore_eos:
        end_ids |= decoder.eos_token_ids
    node_limit = config.max_draft_nodes  # the runner may verify fewer exactly
    if runner.max_tree_nodes is not None:
        node_limit = min(node_limit, runner.max_tree_nodes)
    req = _Request(runner, drafter, decoder.budget, clock,
                   runner.new_sequence(len(prompt_ids) + max_new + config.max_draft_nodes + 2),
                   LogitsProcessor.for_request(config, prompt_ids, runner.vocab_size, end_ids),
                   config.sampling() if config.do_sample else None, generator, node_limit, max_new, limit)
    logprobs, top_n = out.logprobs, config.top_logprobs
    stats = GenerationStats()
    generated: list[int] = []
    finish_reason = "length"
    decode_start = None
    start = clock()
    drafter.begin(prompt_ids)
    try:
        logits, stats.cached_prompt_tokens = runner.prefill(req.seq, prompt_ids)
        logits = logits[None]  # [1, vocab]
        scores = logits if req.processor is None else req.processor(logits, DraftTree.empty())
        first = _accept(DraftTree.empty(), scores, req.sampling, generator).bonus_id
        _emitted(req.processor, logprobs, logits, (), [first], top_n)
        stats.prefill_s = clock() - start
        decode_start = clock()
        context = list(prompt_ids) + [first]
        new_ids = [first]
        while True:
            start_len = len(generated)
            generated.extend(new_ids)
            cut, finish = _finished(generated, start_len, max_new, end_ids, stop_check)
            if cut is not None:
                del generated[cut:]
                if logprobs is not None:
                    del logprobs[cut:]
                if stats.accepted_lengths:  # count only what the last step really emitted
                    stats.accepted_lengths[-1] = max(0, len(generated) - start_len)
            stats.generated_tokens = len(generated)
            stats.decode_s = clock() - decode_start
            if len(generated) > start_len:
                yield generated[start_len:]
            if finish is not None:
                finish_reason = finish
                break

            step = _speculative_step(req, context, len(generated))
            stats.draft_s += step.draft_s
            stats.verify_s += step.verify_s
            stats.steps += 1
            stats.draft_nodes += len(step.tree)
            new_ids = step.new_ids
            _emitted(req.processor, logprobs, step.logits, step.acceptance.accepted_nodes, new_ids, top_n)
            stats.accepted_lengths.append(len(new_ids))
            context.extend(new_ids)
    finally:
        drafter.end(len(generated))
        if decode_start is not None:
            # hold what plain decoding would: the prompt and every token emitted but the last (a
            # chain accepted past the end, e.g. through EOS, wrote cells plain decoding never ran)
            runner.rewind(req.seq, len(prompt_ids) + max(len(generated) - 1, 0))
            stats.decode_s = clock() - decode_start
        out.result = GenerationResult(generated, finish_reason, stats, logprobs)


def _emitted(processor: LogitsProcessor | None, logprobs: list[TokenLogprob] | None,
             logits: torch.Tensor, accepted_nodes: Sequence[int], new_ids: list[int], top_n: int) -> None:
    """A step emitted `new_ids` (its accepted path, then the bonus token): later rows' contexts hold
    them, and their logprobs are kept when the request asked for them."""
    if processor is not None:
        processor.commit(new_ids)
    if logprobs is not None:
        rows = [0, *(node + 1 for node in accepted_nodes)]  # the row of `logits` each was chosen at
        logprobs.extend(token_logprobs(logits, rows, new_ids, top_n))


def _finished(generated: list[int], start: int, max_new: int, eos: frozenset[int],
              stop_check: StopCheck | None) -> tuple[int | None, str | None]:
    """(length to cut `generated` to, finish reason) after a step appended `generated[start:]`.

    The first to occur ends generation: an EOS (any id of `eos`: the model's EOS unless ignored, and
    the request's stop ids), a stop string or the token limit. A step may commit both a stop string
    and an EOS, so the stop check sees the step's ids up to the EOS.
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
