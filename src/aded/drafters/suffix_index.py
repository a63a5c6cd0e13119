"""A suffix index over token sequences: longest suffix match and continuation counts, append-only.

What SuffixDecoding keeps in a depth-bounded suffix trie (every substring of length <= max_depth
with its number of occurrences) is answered here from occurrence lists instead, which costs O(1)
memory per token rather than O(max_depth) trie nodes, and O(len(ngram_sizes)) work per appended
token with nothing rebuilt:

- every token position is filed under the hashes of the n-grams ending there (n in `ngram_sizes`,
  e.g. 1, 2, 4, 8), as the *end* position of that occurrence, i.e. where its continuation starts;
- `match(query)` takes the longest listed n whose last n query tokens occur with a continuation,
  then extends all those candidate occurrences backwards against the query at once (one vectorised
  comparison, which also discards hash collisions) up to `max_depth` tokens;
- the trie node of the matched string is then just its set of occurrence ends: `children(ends)`
  groups the tokens that follow them, which are the node's children with their counts.

Worked example: tokens `a b c a b d a b` (positions 0..7), query ending in `a b`.
The 2-gram `a b` ends at 2, 5 and 8; end 8 is the text's end (nothing follows), so the match is
`a b` with ends [2, 5] (count 2). Its children: `c` (count 1, ends [3]) and `d` (count 1, ends
[6]), so P(c | a b) = P(d | a b) = 1/2. Extending the query one token back, `d a b` matches only
the occurrence ending at 8 (no continuation), so the match length stays 2.

Counts follow one convention throughout: the count of a string is its number of occurrences that
are *followed by a token* in the same sequence; the children's counts then sum to the parent's.

Several sequences can be indexed (the global index holds one per finished request), separated by a
-1 sentinel that never matches. With `max_tokens` set, the oldest sequences are evicted when a new
one starts and the total passes the bound; their entries leave the occurrence lists (they are the
lists' oldest entries, so eviction pops fronts) and their tokens become sentinels.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SuffixIndex", "Match", "Continuation"]

_PAD = -1  # sentinel: sequence separator, evicted token, or beyond the end


@dataclass(frozen=True)
class Match:
    """The longest query suffix that occurs with a continuation: its length and occurrence ends."""

    length: int
    ends: np.ndarray  # [count] int64 absolute positions right after each occurrence, ascending

    @property
    def count(self) -> int:
        return len(self.ends)


@dataclass(frozen=True)
class Continuation:
    """One child of a trie node: the token, how many parent occurrences it follows, its own ends."""

    token: int
    count: int
    ends: np.ndarray  # [<= count] ends of the extended string that are followed by a token


class SuffixIndex:
    """Append-only occurrence index; see the module docstring for the method and an example."""

    def __init__(
        self,
        max_depth: int = 32,
        ngram_sizes: Sequence[int] = (1, 2, 4, 8),
        max_tokens: int | None = None,
        max_occurrences: int | None = None,
    ) -> None:
        sizes = sorted(set(int(n) for n in ngram_sizes))
        if not sizes or sizes[0] != 1:
            raise ValueError(f"ngram_sizes must include 1, got {list(ngram_sizes)}")
        if max_depth < sizes[-1]:
            raise ValueError(f"max_depth {max_depth} is below the largest n-gram size {sizes[-1]}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
        if max_occurrences is not None and max_occurrences < 1:
            raise ValueError(f"max_occurrences must be positive or None, got {max_occurrences}")
        self.max_depth = int(max_depth)
        self.ngram_sizes = tuple(sizes)
        self.max_tokens = max_tokens
        self.max_occurrences = max_occurrences
        self._index: dict[int, int | list[int]] = {}  # n-gram hash -> end position(s), ascending
        self._buf = np.full(1024, _PAD, dtype=np.int32)  # buf[p - offset] = token at position p
        self._offset = -1  # buf[0] stays a sentinel, so clipped backward reads hit it
        self._end = 0  # next absolute position
        self._window: list[int] = []  # last tokens of the open sequence, for n-gram keys
        self._spans: deque[tuple[int, int]] = deque()  # (start, stop) of each sequence
        self._num_tokens = 0  # live tokens, separators excluded

    # ------------------------------------------------------------------ appending
    def __len__(self) -> int:
        return self._num_tokens

    def start_sequence(self) -> None:
        """Open a new sequence; n-grams never span two. Evicts old sequences past `max_tokens`."""
        if self._spans:
            self._append_raw(_PAD)
        self._window = []
        self._spans.append((self._end, self._end))
        self._evict()

    def add_sequence(self, tokens: Iterable[int]) -> None:
        """Index a whole sequence (e.g. a finished request's output), then apply the size bound."""
        self.start_sequence()
        self.extend(tokens)
        self._evict()

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Index one token at the end of the open sequence: O(len(ngram_sizes)), nothing rebuilt."""
        token = int(token)
        if token < 0:
            raise ValueError(f"token ids must be non-negative, got {token}")
        if not self._spans:
            self._spans.append((self._end, self._end))
        end = self._end + 1
        self._append_raw(token)
        start, _ = self._spans[-1]
        self._spans[-1] = (start, end)
        self._num_tokens += 1
        window = self._window
        window.append(token)
        if len(window) > self.ngram_sizes[-1]:
            del window[0]
        width = len(window)
        index = self._index
        for n in self.ngram_sizes:
            if n > width:
                break
            key = hash(tuple(window[width - n :]))
            found = index.get(key)
            if found is None:
                index[key] = end
            elif isinstance(found, int):
                index[key] = [found, end]
            else:
                found.append(end)

    def _append_raw(self, token: int) -> None:
        phys = self._end - self._offset
        if phys + 1 >= len(self._buf):  # keep one sentinel slot after the last token
            grown = np.full(2 * len(self._buf), _PAD, dtype=np.int32)
            grown[: len(self._buf)] = self._buf
            self._buf = grown
        self._buf[phys] = token
        self._end += 1

    # ------------------------------------------------------------------ eviction
    def _evict(self) -> None:
        if self.max_tokens is None:
            return
        while len(self._spans) > 1 and self._num_tokens > self.max_tokens:
            start, stop = self._spans.popleft()
            self._unindex(start, stop)
            self._num_tokens -= stop - start
            lo = start - self._offset
            self._buf[lo : stop - self._offset + 1] = _PAD  # its tokens and its separator
        first = self._spans[0][0] if self._spans else self._end
        if first - self._offset > len(self._buf) // 2:  # compact: drop the dead prefix
            live = self._buf[first - self._offset : self._end - self._offset]
            size = max(1024, 2 * (len(live) + 2))
            buf = np.full(size, _PAD, dtype=np.int32)
            buf[1 : 1 + len(live)] = live
            self._buf, self._offset = buf, first - 1

    def _unindex(self, start: int, stop: int) -> None:
        """Remove a sequence's n-grams: they are the oldest entry of every list they are in."""
        tokens = self._buf[start - self._offset : stop - self._offset].tolist()
        index = self._index
        for i in range(len(tokens)):
            end = start + i + 1
            for n in self.ngram_sizes:
                if n > i + 1:
                    break
                key = hash(tuple(tokens[i + 1 - n : i + 1]))
                found = index[key]
                if isinstance(found, int):
                    assert found == end
                    del index[key]
                else:
                    assert found[0] == end
                    del found[0]
                    if len(found) == 1:
                        index[key] = found[0]

    # ------------------------------------------------------------------ queries
    def token_at(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at absolute positions up to the end (-1 for separators and evicted positions)."""
        phys = positions - self._offset
        np.maximum(phys, 0, out=phys)
        return self._buf[phys]

    def match(self, query: Sequence[int]) -> Match | None:
        """Longest suffix of `query` (at most `max_depth` tokens) occurring with a continuation."""
        tail = [int(t) for t in query[-self.max_depth :]]
        size = len(tail)
        if size == 0:
            return None
        reversed_tail: np.ndarray | None = None
        for n in reversed(self.ngram_sizes):
            if n > size:
                continue
            found = self._index.get(hash(tuple(tail[size - n :])))
            if found is None:
                continue
            if isinstance(found, int):
                ends = np.array([found], dtype=np.int64)
            else:
                recent = found if self.max_occurrences is None else found[-self.max_occurrences :]
                ends = np.array(recent, dtype=np.int64)
            ends = ends[self.token_at(ends) >= 0]  # followed by a token
            if not len(ends):
                continue
            if reversed_tail is None:
                reversed_tail = np.array(tail[::-1], dtype=np.int32)
            # [count, size] token j+1 places before each end, compared with the query's
            back = self.token_at(ends[:, None] - np.arange(1, size + 1)[None, :])
            equal = back == reversed_tail[None, :]
            lengths = np.where(equal.all(axis=1), size, equal.argmin(axis=1))
            best = int(lengths.max())
            if best >= n:  # shorter means a hash collision: fall back to smaller n
                return Match(best, ends[lengths == best])
        return None

    def children(self, ends: np.ndarray, min_count: int = 1) -> list[Continuation]:
        """Children of the node whose occurrences end at `ends` with count >= `min_count`,
        most frequent first (ties: most recent occurrence first)."""
        if len(ends) == 0:
            return []
        if len(ends) == 1:  # a single occurrence: a chain, no grouping needed
            phys = int(ends[0]) - self._offset
            token = int(self._buf[phys])
            if min_count > 1 or token < 0:
                return []
            follows = self._buf[phys + 1] >= 0
            return [Continuation(token, 1, ends + 1 if follows else ends[:0])]
        if len(ends) <= 32:
            return self._children_small(ends, min_count)
        tokens = self.token_at(ends)
        unique, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
        latest = np.zeros(len(unique), dtype=np.int64)
        np.maximum.at(latest, inverse, np.arange(1, len(ends) + 1))
        order = np.lexsort((-latest, -counts))
        grouped = ends[np.argsort(inverse, kind="stable")]
        starts = np.concatenate([[0], np.cumsum(counts)])
        out = []
        for u in order.tolist():
            if counts[u] < min_count:
                break
            if unique[u] < 0:
                continue
            child = grouped[starts[u] : starts[u + 1]] + 1
            out.append(Continuation(int(unique[u]), int(counts[u]), child[self.token_at(child) >= 0]))
        return out

    def _children_small(self, ends: np.ndarray, min_count: int) -> list[Continuation]:
        """`children` for a few occurrences: plain Python beats numpy's per-call overhead."""
        phys = ends - self._offset
        groups: dict[int, list] = {}  # token -> [count, latest occurrence, child ends]
        for i, (end, token, follows) in enumerate(
            zip(ends.tolist(), self._buf[phys].tolist(), self._buf[phys + 1].tolist())
        ):
            group = groups.get(token)
            if group is None:
                group = groups[token] = [0, 0, []]
            group[0] += 1
            group[1] = i
            if follows >= 0:
                group[2].append(end + 1)
        ranked = sorted(groups.items(), key=lambda item: (-item[1][0], -item[1][1]))
        return [
            Continuation(token, count, np.array(child, dtype=np.int64))
            for token, (count, _, child) in ranked
            if count >= min_count and token >= 0
        ]

    def sequences(self) -> list[np.ndarray]:
        """The live sequences, oldest first."""
        return [self._buf[a - self._offset : b - self._offset].astype(np.int64) for a, b in self._spans]

    # ------------------------------------------------------------------ state
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickle) from which `from_state_arrays` rebuilds an equal index."""
        sequences = self.sequences()
        return {
            "tokens": np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int64),
            "lengths": np.array([len(s) for s in sequences], dtype=np.int64),
            "max_depth": np.array(self.max_depth, dtype=np.int64),
            "ngram_sizes": np.array(self.ngram_sizes, dtype=np.int64),
            "max_tokens": np.array(-1 if self.max_tokens is None else self.max_tokens, dtype=np.int64),
        }

    @classmethod
    def from_state_arrays(cls, state: dict[str, np.ndarray]) -> SuffixIndex:
        missing = {"tokens", "lengths", "max_depth", "ngram_sizes", "max_tokens"} - set(state)
        if missing:
            raise ValueError(f"suffix index state lacks {sorted(missing)}")
        tokens = np.asarray(state["tokens"], dtype=np.int64)
        lengths = np.asarray(state["lengths"], dtype=np.int64)
        if lengths.sum() != len(tokens) or np.any(lengths < 0):
            raise ValueError(f"sequence lengths {lengths.tolist()} do not add up to {len(tokens)} tokens")
        max_tokens = int(state["max_tokens"])
        index = cls(
            max_depth=int(state["max_depth"]),
            ngram_sizes=[int(n) for n in np.asarray(state["ngram_sizes"]).tolist()],
            max_tokens=None if max_tokens < 0 else max_tokens,
        )
        offset = 0
        for length in lengths.tolist():
            index.add_sequence(tokens[offset : offset + length].tolist())
            offset += length
        return index
