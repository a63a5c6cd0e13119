"""Logits processors that change the output (penalties, a bias, `min_tokens`) and the logprobs of
emitted tokens, for every node of a draft tree at once.

Speculation stays lossless only if each verified node's distribution is the one plain decoding would
use *in that node's own context*: the committed context plus the path down to the node. Penalties
and `min_tokens` depend on that path, so a request keeps a base state (token counts over what is
committed, updated as steps commit) and each row of a verification gets a correction for the at most
`depth` tokens on its path. Penalties touch only the columns of ids that occur in the context or
the tree: besides one copy of the rows, a step costs O((1 + k) * those ids) tensor work, and no
Python loop over the vocabulary or the rows.

Order, as in vLLM and in transformers (whose built-in `sequence_bias` comes before its repetition
penalty): `logit_bias` (added to the raw logits), then the repetition penalty (transformers'
semantics, over prompt + output: a seen id's positive score is divided by it, a negative one
multiplied), then frequency and presence penalties (OpenAI's, over the output only:
`score -= frequency * count + presence * (count > 0)`), then the `min_tokens` mask (-inf on the ids
that would end generation), then a grammar's mask (grammar.py: -inf on what the grammar forbids
after each row's path; a request with a grammar also has its drafts pruned by `allowed_subtree`).
Sampling's warpers (temperature, top-k, top-p, min-p) follow in verify.py.

Logprobs are those of the model's raw logits (log-softmax before any processor or warper), as vLLM
reports them by default: they say what the model thinks, whatever the request did to its choice.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

# the request checks, re-exported: they were public here before they moved below this module
from aded.generation_config import MAX_TOP_LOGPROBS, check_processing, logit_bias_pairs, token_id_tuple  # noqa: F401
from aded.tree import DraftTree

if TYPE_CHECKING:
    from aded.generation_config import GenerationConfig
    from aded.grammar import GrammarState

__all__ = ["LogitsProcessor", "TokenLogprob", "token_logprobs", "logit_bias_pairs", "token_id_tuple",
           "check_processing", "MAX_TOP_LOGPROBS"]


class TokenLogprob(NamedTuple):
    """One emitted token: its log-probability and the `top_logprobs` most likely ids at its position
    (most likely first), all from the log-softmax of the model's raw logits there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogitsProcessor:
    """One request's processors over verification logits, row by row in each node's own context.

    Built with `for_request` (None when the request sets none, so plain requests skip all of this);
    `allowed_subtree` prunes a draft to what the request's grammar allows, `__call__` processes a
    step's rows, `commit` advances the base state by the step's tokens.
    """

    def __init__(self, vocab_size: int, prompt_ids: Sequence[int], *,
                 logit_bias: Sequence[tuple[int, float]] = (), repetition_penalty: float = 1.0,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, min_tokens: int = 0,
                 end_ids: Iterable[int] = (), grammar: GrammarState | None = None) -> None:
        self.vocab_size = vocab_size
        self.grammar = grammar
        self.repetition_penalty = float(repetition_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.min_tokens = int(min_tokens)
        self.num_generated = 0  # committed output tokens (the base state's length)
        self._bias_ids = torch.tensor([t for t, _ in logit_bias], dtype=torch.long)
        self._bias_values = torch.tensor([b for _, b in logit_bias], dtype=torch.float32)
        self._end_ids = torch.tensor(sorted(set(end_ids)), dtype=torch.long)  # masked before min_tokens
        self._penalised = repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
        if self._penalised:
            prompt = np.asarray(prompt_ids, dtype=np.int64)
            if len(prompt) and not 0 <= prompt.min() <= prompt.max() < vocab_size:
                raise ValueError(f"the prompt holds token ids outside the vocabulary (size {vocab_size})")
            self._seen = np.zeros(vocab_size, dtype=bool)  # [vocab] in prompt or output (repetition)
            self._seen[prompt] = True
            self._counts = np.zeros(vocab_size, dtype=np.float32)  # [vocab] occurrences in the output

    @classmethod
    def for_request(cls, config: GenerationConfig, prompt_ids: Sequence[int], vocab_size: int,
                    end_ids: Collection[int]) -> LogitsProcessor | None:
        """The processors `config` asks for, or None. `end_ids`: the ids that end generation (EOS
        unless ignored, and `stop_token_ids`), which `min_tokens` holds back."""
        for name, ids in (("logit_bias", [t for t, _ in config.logit_bias]),
                          ("stop_token_ids", config.stop_token_ids)):
            outside = [t for t in ids if t >= vocab_size]
            if outside:
                raise ValueError(f"{name} holds token id {outside[0]}, outside the vocabulary "
                                 f"(size {vocab_size})")
        processor = cls(vocab_size, prompt_ids, logit_bias=config.logit_bias,
                        repetition_penalty=config.repetition_penalty,
                        frequency_penalty=config.frequency_penalty,
                        presence_penalty=config.presence_penalty,
                        min_tokens=config.min_tokens, end_ids=end_ids,
                        grammar=config.grammar.start(vocab_size, end_ids) if config.grammar else None)
        return processor if processor.active else None

    @property
    def active(self) -> bool:
        return bool(self._penalised or len(self._bias_ids) or (self.min_tokens and len(self._end_ids))
                    or self.grammar is not None)

    def allowed_subtree(self, tree: DraftTree) -> DraftTree:
        """The part of a draft the request may emit (all of it without a grammar)."""
        return tree if self.grammar is None else self.grammar.allowed_subtree(tree)

    def __call__(self, logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Processed scores [1 + k, vocab] for a verification's raw `logits` (row 0 after the root,
        row i + 1 after node i); a new tensor: the raw logits stay for logprobs and drafters."""
        scores = logits.clone()
        if len(self._bias_ids):
            scores[:, self._bias_ids] += self._bias_values
        if self._penalised:
            self._penalise(scores, tree)
        if self.num_generated < self.min_tokens and len(self._end_ids):
            depths = torch.tensor(tree.position_offsets)  # [1 + k] tokens on each row's path
            early = torch.nonzero(self.num_generated + depths < self.min_tokens).flatten()
            scores[early[:, None], self._end_ids[None, :]] = float("-inf")
        if self.grammar is not None:
            self.grammar.mask(scores, tree)
        return scores

    def commit(self, token_ids: Sequence[int]) -> None:
        """The step emitted `token_ids`: they join every later row's context."""
        self.num_generated += len(token_ids)
        if self.grammar is not None:
            self.grammar.commit(token_ids)
        if self._penalised:
            ids = np.asarray(token_ids, dtype=np.int64)
            np.add.at(self._counts, ids, 1.0)
            self._seen[ids] = True

    def _penalise(self, scores: torch.Tensor, tree: DraftTree) -> None:
        """Penalties in place, on the columns of ids in the context or the tree only."""
        tokens = tree.token_ids  # [k]
        mark = self._seen.copy()
        mark[tokens] = True
        columns = np.flatnonzero(mark)  # [u] sorted ids whose penalty may differ from none
        k = len(tree)
        on_path = torch.zeros(1 + k, len(columns))  # [1 + k, u] occurrences on each row's path
        if k:
            where = torch.from_numpy(np.searchsorted(columns, tokens))  # [k] column of each node
            ancestors = torch.from_numpy(tree.ancestor_mask.astype(np.float32))  # [k, k]
            on_path[1:].scatter_add_(1, where.expand(k, k), ancestors)
        cols = torch.from_numpy(columns)
        picked = scores[:, cols]  # [1 + k, u]
        if self.repetition_penalty != 1.0:
            seen = torch.from_numpy(self._seen[columns]) | (on_path > 0)  # [1 + k, u]
            penalised = torch.where(picked < 0, picked * self.repetition_penalty,
                                    picked / self.repetition_penalty)
            picked = torch.where(seen, penalised, picked)
        if self.frequency_penalty or self.presence_penalty:
            counts = torch.from_numpy(self._counts[columns]) + on_path  # [1 + k, u]
            picked = picked - self.frequency_penalty * counts - self.presence_penalty * (counts > 0)
        scores[:, cols] = picked


def token_logprobs(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int],
                   top_n: int) -> list[TokenLogprob]:
    """Logprobs of `token_ids[j]` chosen at row `rows[j]` of raw `logits` [rows, vocab]."""
    logprobs = torch.log_softmax(logits[list(rows)].float(), dim=-1)  # [m, vocab]
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(ids)
    if top_n:
        values, indices = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)  # [m, n]
        tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(ids.tolist(), chosen, tops)]
