"""The layered tri-gram representative: what this model is likely to say next, from counts.

A query gives candidate next tokens for a context tail with probabilities, blended from layers
ordered from the most specific evidence to the most general (each level interpolates with the
levels below it, PPM style: p = (n(c) + beta * p_below(c)) / (N + beta)):

    level 0  request, orders 4..max_order  the prompt and output so far (copying is common)
    level 1  request, order 3
    level 2  request, order 2              plus the model's top-k seen at verified tree nodes
    level 3  learned tri-grams             what earlier requests taught (committed + model top-k)
    level 4  corpus tri-grams              the static datastore
    level 5  bigram back-off               request, learned and corpus one-token contexts

Every layer keeps counts, so it can be merged, decayed and saved; probabilities are derived at
query time. The learned layer is a `CountTable` (aded.drafters.counts), bounded: at each request's
end its counts decay by `decay`; every `compact_every` requests, or when the table passes 1.25 x
`max_contexts`, entries below `min_count` go and at most `max_contexts` contexts x
`max_successors` successors remain.
Nothing here is random: the same calls in the same order give the same answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aded.drafters.context import FollowsContext
from aded.drafters.counts import Bounds, Counts, CountTable
from aded.store.datastore import Datastore

__all__ = ["RepresentativeConfig", "Candidate", "Representative", "LEVELS", "NUM_LEVELS"]

LEVELS = ("request-long", "request-3", "request-2", "learned", "corpus", "bigram")
NUM_LEVELS = len(LEVELS)


@dataclass(frozen=True)
class RepresentativeConfig:
    max_order: int = 4  # longest request context (tokens) matched exactly
    beta_request: float = 0.5  # escape weight of request levels: small = trust the prompt/output
    beta_learned: float = 1.0
    beta_corpus: float = 2.0
    topk_weight: float = 1.0  # count added for the model's top-1 at a verified node
    alt_weight: float = 0.25  # for its ranks 2.. (scaled by 1 / rank)
    reject_factor: float = 0.5  # probability multiplier per rejection of (a, b) -> c in a request
    decay: float = 0.9  # learned counts shrink by this at each request's end
    min_count: float = 0.05  # learned entries below this are dropped
    max_contexts: int = 200_000  # learned contexts kept (the smallest totals go first)
    max_successors: int = 8  # learned successors kept per context
    compact_every: int = 16  # requests between compactions of the learned layer
    per_level: int = 8  # candidates read from each level per query
    request_layer: bool = True  # off: the prompt and output are not matched (for measuring)

    def __post_init__(self) -> None:
        if self.max_order < 2:
            raise ValueError(f"max_order must be at least 2, got {self.max_order}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if self.max_contexts < 1 or self.max_successors < 1 or self.per_level < 1:
            raise ValueError("max_contexts, max_successors and per_level must be at least 1")


class Candidate(NamedTuple):  # a tuple: made ~50 times a step (a frozen dataclass cost 1/4 of candidates)
    token: int
    prob: float  # blended P(token | context)
    level: int  # the most specific level with any evidence for this context
    supported: bool  # whether that level itself saw this token (not only a back-off)


class Representative(FollowsContext):
    """Layered counts behind `candidates(tail)`; `begin/commit/add_model_topk/reject/end` feed it."""

    def __init__(self, datastore: Datastore | None = None, config: RepresentativeConfig = RepresentativeConfig(),
                 learned: CountTable | None = None) -> None:  # fmt: skip
        self.config = config
        self.datastore = datastore
        #: what earlier requests taught; may be shared with other representatives (`learned=`)
        self.learned = learned if learned is not None else CountTable(
            Bounds(config.max_contexts, config.max_successors, config.min_count))
        self._pending = 0  # requests folded since the last compaction
        self._corpus_cache: dict[tuple[int, ...], tuple[Counts, float]] = {}
        self.begin(())

    # ------------------------------------------------------------------ request lifecycle
    def begin(self, prompt_ids: Sequence[int]) -> None:
        """Start a request: its prompt's n-grams form the request layer."""
        self.history: list[int] = []
        self._output_start = 0
        # order n -> context of n tokens -> {next: count}
        self._request: list[dict[tuple[int, ...], Counts]] = [defaultdict(dict) for _ in range(self.config.max_order + 1)]
        self._evidence: dict[tuple[int, int], Counts] = defaultdict(dict)  # model top-k this request
        self._rejected: dict[tuple[int, int, int], int] = defaultdict(int)
        self.commit(prompt_ids)
        self._output_start = len(self.history)

    def commit(self, token_ids: Iterable[int]) -> None:
        """Append committed tokens to the request's history (O(max_order) each)."""
        history, request = self.history, self._request
        top = self.config.max_order if self.config.request_layer else 0
        for token in token_ids:
            token = int(token)
            end = len(history)
            for n in range(1, min(top, end) + 1):
                followers = request[n][tuple(history[end - n :])]
                followers[token] = followers.get(token, 0.0) + 1.0
            history.append(token)

    def sync(self, context_ids: Sequence[int]) -> None:
        """Make the history equal `context_ids`, committing what is new (restarting if it diverged)."""
        self._follow(context_ids)

    def _seen(self) -> list[int]:
        return self.history

    def _take(self, tokens: Sequence[int]) -> None:
        self.commit(tokens)

    def add_model_topk(self, tail: Sequence[int], topk: Sequence[int]) -> None:
        """The model's top tokens (best first, -1 = unknown) after a context ending in `tail`."""
        if len(tail) < 2:
            return
        followers = self._evidence[(int(tail[-2]), int(tail[-1]))]
        for rank, token in enumerate(topk):
            if token < 0:
                continue
            weight = self.config.topk_weight if rank == 0 else self.config.alt_weight / rank
            followers[int(token)] = followers.get(int(token), 0.0) + weight

    def reject(self, tail: Sequence[int], token: int) -> None:
        """The model did not emit `token` after `tail`: make it less likely within this request."""
        if len(tail) >= 2:
            self._rejected[(int(tail[-2]), int(tail[-1]), int(token))] += 1

    def end(self, emitted: int | None = None) -> None:
        """Fold the request's output tri-grams (its first `emitted` tokens; all when None) and model
        evidence into the learned layer, decay, cap."""
        stop = None if emitted is None else self._output_start + emitted
        output, learned = self.history[max(self._output_start - 2, 0) : stop], self.learned
        for a, b, c in zip(output, output[1:], output[2:]):
            learned.add((a, b), c)
            learned.add(b, c)
        for context, followers in self._evidence.items():
            for c, weight in followers.items():
                learned.add(context, c, weight)
        learned.decay(self.config.decay)
        self._pending += 1
        if self._pending >= self.config.compact_every or learned.overfull:
            self.compact()
        self.begin(())

    def compact(self) -> None:
        """Apply the learned layer's pending decay and enforce its bounds."""
        self.learned.compact()
        self._pending = 0

    # ------------------------------------------------------------------ queries
    def candidates(self, tail: Sequence[int], limit: int = 8) -> list[Candidate]:
        """Likely next tokens after a context ending in `tail` (most probable first)."""
        cfg = self.config
        tail = tuple(map(int, tail[-cfg.max_order :]))
        chain: list[tuple[int, Counts | None, float, float | None]] = []  # (level, counts, beta, total)
        for n in range(min(cfg.max_order, len(tail)), 2, -1):
            chain.append((0 if n >= 4 else 1, self._request[n].get(tail[-n:]), cfg.beta_request, None))
        if len(tail) >= 2:
            pair = (tail[-2], tail[-1])  # tail[-2:], as a pair
            chain.append((2, _merged(self._request[2].get(pair), self._evidence.get(pair)), cfg.beta_request, None))
            chain.append((3, self.learned.followers(pair), cfg.beta_learned, None))
            corpus, total = self._corpus(pair)
            chain.append((4, corpus, cfg.beta_corpus, total))
        if tail:
            bigram = _merged(self._request[1].get(tail[-1:]), self.learned.followers(tail[-1]))
            chain.append((5, bigram, cfg.beta_learned, None))
            corpus, total = self._corpus(tail[-1:])
            chain.append((5, corpus, cfg.beta_corpus, total))
        found = [(level, _top(counts, cfg.per_level), beta, total) for level, counts, beta, total in chain if counts]
        if not found:
            return []
        probs = _interpolate([(counts, beta, total) for _, counts, beta, total in found])
        if len(tail) >= 2 and self._rejected:
            a, b = tail[-2], tail[-1]
            for c in probs:
                rejections = self._rejected.get((a, b, c))
                if rejections:
                    probs[c] *= cfg.reject_factor**rejections
        top_level, top_counts = found[0][0], found[0][1]
        best = sorted(probs.items(), key=_by_probability)[:limit]
        make = tuple.__new__  # Candidate(...) runs a Python-level __new__: ~18% of this call (line profile)
        return [make(Candidate, (c, p, top_level, c in top_counts)) for c, p in best]

    def _corpus(self, context: tuple[int, ...]) -> tuple[Counts, float]:
        """Top successors and context total from the datastore, memoised (bounded)."""
        if self.datastore is None:
            return {}, 0.0
        hit = self._corpus_cache.get(context)
        if hit is None:
            if len(context) == 2:
                ids, counts, total = self.datastore.trigram(*context)
            else:
                ids, counts, total = self.datastore.bigram(context[0])
            limit = self.config.per_level
            hit = (dict(zip(ids[:limit].tolist(), counts[:limit].tolist())), total)
            if len(self._corpus_cache) >= 200_000:
                self._corpus_cache.clear()
            self._corpus_cache[context] = hit
        return hit


def _by_probability(item: tuple[int, float]) -> tuple[float, int]:
    return -item[1], item[0]


def _top(counts: Counts, limit: int) -> Counts:
    """The `limit` largest counts (all of them when there are few)."""
    if len(counts) <= 2 * limit:
        return counts
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit])


def _merged(first: Counts | None, second: Counts | None) -> Counts | None:
    if not second:
        return first
    if not first:
        return second
    merged = dict(first)
    for c, w in second.items():
        merged[c] = merged.get(c, 0.0) + w
    return merged


def _interpolate(levels: list[tuple[Counts | None, float, float | None]]) -> Counts:
    """Blend levels, most specific first: p = (n(c) + beta * p_below(c)) / (N + beta).

    Each level is (counts, beta, total); a total (the unpruned count of a corpus context) replaces
    the sum of the kept counts, so pruned mass stays unassigned instead of inflating the rest.
    Unrolled, level i adds n_i(c) / (N_i + beta_i) times the product of beta_j / (N_j + beta_j)
    over the more specific levels j: one pass over the counts, no dict per level.
    """
    probs: Counts = {}
    scale = 1.0
    for counts, beta, total in levels:
        if not counts:
            continue
        norm = (total if total else sum(counts.values())) + beta
        weight = scale / norm
        get = probs.get
        for c, n in counts.items():
            probs[c] = get(c, 0.0) + weight * n
        scale *= beta / norm
    return probs
