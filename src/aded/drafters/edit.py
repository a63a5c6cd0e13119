"""Edit drafts: follow the span of the context that the output is copying, edits included.

When the output is a modified copy of earlier text (a code edit, a rewrite, a quoted answer),
prompt lookup re-finds its place after every change by the most recent occurrence of the last few
tokens, which is often the wrong copy, and keeps drafting the old text where the model now writes
the new. This drafter keeps an *alignment* instead:

- a pointer into the context (prompt and earlier output) at the token the output copies next;
  while the output agrees, the pointer advances and the draft is the text ahead of it;
- at a divergence the pointer's position becomes the *anchor*; each step then looks for the last
  output tokens near the anchor (a bounded window; a longer match must be much nearer to win), so
  after an inserted or replaced fragment copying resumes at the right place. A match anywhere
  (prompt lookup's most recent one) takes over only when it is 2 tokens longer: lists and loops
  that repeat the output's own last lines. A short excursion (a name quoted from the instruction)
  does not move the anchor. Until a copy holds again (for the new text's first few tokens), the
  drafter guesses that it replaced as many old tokens as it has (or one fewer, one more, or none)
  and offers the source after each guess as a branch: the step that would emit the first copied
  token alone is saved;
- once a resumed copy has predicted `confirm` tokens right, the replaced fragment (old source tokens ->
  new output tokens) is learned as a *substitution* and applied wherever the source ahead holds
  the old tokens again: a renamed identifier is drafted renamed. Until the model has followed it
  once, the old text hangs beside it as a second branch (the one place a tree is likely to pay);
  a substitution the model declines more often than it follows is dropped.

Where the output copies nothing, nothing is drafted. Node scores are calibrated acceptance
probabilities (`aded.drafters.calibration`): an edge's cell is how the alignment was found, how
many tokens it has held, and whether the token comes from a substitution (and how trusted it
is); a path stops below `min_score`, and the engine's budget trims the rest by cost.

Example: source `def foo ( x ) : return foo ( x )`, output so far `def bar ( x ) :`. The output
diverged at `foo` (the anchor), resumed at `(` right after it, and once `( x )` held, `foo -> bar`
is learned; the draft continues `return bar ( x )`.

Searches are numpy comparisons over the context, only on steps after a divergence; a step that
keeps copying costs O(draft length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aded.drafters.base import Drafter, StepFeedback
from aded.drafters.calibration import BackoffCalibrator, bucket
from aded.drafters.context import FollowsContext
from aded.drafters.suffix import merge_proposals
from aded.tree import DraftTree

__all__ = ["EditDrafter", "suffix_matches"]

_RUN_EDGES = (1, 2, 3, 4, 6, 9, 14, 24, 40)  # tokens the alignment has held, at the drafted edge
_OLD = -1  # calibration feature of the old text drafted where a substitution applies
_SUB_PRIOR = {1: 0.5, 2: 0.85, _OLD: 0.4}  # a substitution not yet followed: as likely as the old text
_LOOP = 4  # a copy from at most this many tokens back repeats a short loop (`a a a`, `a b a b`)
_NEXT = 8  # a copy resuming at most this many source tokens past the anchor: a small edit
_WEAK = 2  # an alignment that has explained at most this many tokens may be a chance match


def _prior(run: int) -> float:
    """Acceptance of the next copied token after `run` agreeing ones, before any calibration:
    roughly what replays of recorded outputs show (0.2 after one token, 0.6 after two, 0.9 after
    eight)."""
    return 1.0 - 0.8 / max(run, 1)


def suffix_matches(tokens: np.ndarray, end: int, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Earlier occurrences of the last tokens of `tokens[:end]`: (ends, lengths).

    `ends[i]` is the position right after an occurrence (its continuation starts there, always
    before `end`) and `lengths[i]` how many of the last tokens it matches (1 to `max_n`).
    Example: tokens `a b c a b` (end 5) -> ends [2], lengths [2] (`a b` at 0..1, followed by `c`).
    """
    if end < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ends = np.flatnonzero(tokens[: end - 1] == tokens[end - 1]) + 1
    lengths = np.ones(len(ends), np.int64)
    for k in range(2, max_n + 1):
        live = lengths == k - 1
        live &= ends >= k
        if not live.any():
            break
        idx = np.flatnonzero(live)
        same = tokens[ends[idx] - k] == tokens[end - k]
        lengths[idx[same]] = k
    return ends, lengths


@dataclass
class _Substitution:
    old: tuple[int, ...]
    new: tuple[int, ...]
    followed: int = 0
    declined: int = 0

    @property
    def active(self) -> bool:
        return self.declined <= self.followed


def _trust(sub: _Substitution | None) -> int:
    """Calibration feature of a drafted substitution: 0 none, 1 not yet followed, 2 followed."""
    return 0 if sub is None else 1 if sub.followed == 0 else 2


def _core(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A replacement without the tokens both sides share at their ends: `x foo` -> `x bar` is
    `foo` -> `bar`; `x` -> `x y` (an insertion after `x`) becomes `()` -> `y`, not a substitution."""
    head = 0
    while head < min(len(old), len(new)) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < min(len(old), len(new)) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    return old[head : len(old) - tail], new[head : len(new) - tail]


@dataclass
class _Alignment:
    """The output copies the context from `ptr` on (through `pending` tokens of a substitution)."""

    ptr: int  # next source position to copy (after any substitution in progress)
    origin: str  # how it was found: "next" (a few tokens past the anchor), "local" (farther, but
    # in the window around the anchor), "recent" (anywhere) or "loop" (from just behind)
    run: int  # output tokens it has explained so far (the match that found it included)
    matched: int  # of which the match: the rest were predicted, then emitted
    src_start: int  # source position where this run began
    out_start: int  # context position of the run's first output token
    pending: tuple[int, ...] = ()  # substitution tokens still expected before ptr
    sub: _Substitution | None = None  # the substitution in progress
    sub_start: int = -1  # and the source position of its old tokens
    confirmed: bool = False


class EditDrafter(FollowsContext, Drafter):
    """`window`/`back`: how far after/before the anchor a resumed copy is looked for;
    `min_recent`: shortest match anywhere that may take over; `confirm`: tokens a resumed copy
    must predict right before its edit is learned and its break may move the anchor;
    `near`/`settle`: a copy that breaks moves the anchor if it began within `near` tokens of it
    or held `settle` tokens (else it was an excursion); `resume_within`: for this many new tokens
    after a break, guess where the copy resumes (`_guesses`)."""

    name = "edit"

    def __init__(
        self,
        max_ngram: int = 8,
        window: int = 512,
        back: int = 64,
        min_recent: int = 1,
        confirm: int = 2,
        max_sub_len: int = 8,
        min_score: float = 0.03,
        max_depth: int = 32,
        near: int = 48,
        settle: int = 16,
        resume_within: int = 4,
    ) -> None:
        if max_ngram < 1 or window < 1 or back < 0 or confirm < 1 or max_sub_len < 1 or max_depth < 1:
            raise ValueError("max_ngram, window, confirm, max_sub_len and max_depth must be at least 1, back >= 0")
        if resume_within < 0:
            raise ValueError(f"resume_within must be >= 0 (0: never guess), got {resume_within}")
        if not 1 <= min_recent <= max_ngram:
            raise ValueError(f"need 1 <= min_recent <= max_ngram, got {min_recent}, {max_ngram}")
        if not 0.0 <= min_score < 1.0:
            raise ValueError(f"min_score must be in [0, 1), got {min_score}")
        self.max_ngram = max_ngram
        self.window = window
        self.back = back
        self.min_recent = min_recent
        self.confirm = confirm
        self.max_sub_len = max_sub_len
        self.min_score = min_score
        self.max_depth = max_depth
        self.near = near
        self.settle = settle
        self.resume_within = resume_within
        self.calibrator = BackoffCalibrator()
        self.begin(())

    # ------------------------------------------------------------------ lifecycle
    def begin(self, prompt_ids: Sequence[int]) -> None:
        self._tokens = np.zeros(max(256, 2 * len(prompt_ids)), np.int64)
        self._len = 0
        self._align: _Alignment | None = None
        self._anchor: int | None = None  # source position where the last confirmed copy broke
        self._break_out = 0  # context position of the first output token after that break
        self._subs: dict[int, list[_Substitution]] = {}  # first old token -> longest old first
        self._cells: dict[tuple[int, ...], tuple] = {}
        self._take(prompt_ids, track=False)
        self._prompt_len = self._len

    def observe(self, feedback: StepFeedback) -> None:
        self.calibrator.learn(self._cells, feedback)
        self._cells = {}
        self._follow_step(feedback)

    def _seen(self) -> np.ndarray:
        return self._tokens[: self._len]

    def _take(self, tokens: Sequence[int], track: bool = True) -> None:
        new = np.asarray(tokens, np.int64).reshape(-1)
        need = self._len + len(new)
        if need > len(self._tokens):
            grown = np.zeros(max(need, 2 * len(self._tokens)), np.int64)
            grown[: self._len] = self._tokens[: self._len]
            self._tokens = grown
        self._tokens[self._len : need] = new
        start, self._len = self._len, need
        if track:
            for pos in range(start, need):
                if self._align is None:
                    break  # diverged: the next proposal searches
                self._advance(pos, self._align)

    # ------------------------------------------------------------------ alignment
    def _advance(self, pos: int, align: _Alignment) -> None:
        """Advance the alignment (`self._align`) by the output token at `pos`, or mark a divergence there."""
        token = int(self._tokens[pos])
        expected, sub = self._expected(align)
        if token == expected:
            if sub is not None:  # the first token of a substitution: it is now in progress
                align.sub, align.sub_start, align.pending = sub, align.ptr, sub.new
                align.ptr += len(sub.old)
            if align.pending:
                align.pending = align.pending[1:]
                if not align.pending:
                    assert align.sub is not None  # set with `pending`, when the substitution started
                    align.sub.followed += 1
            else:
                align.ptr += 1
            align.run += 1
        elif sub is not None and token == int(self._tokens[align.ptr]):
            sub.declined += 1  # the model copies the old text here: follow it
            align.ptr += 1
            align.run += 1
        else:
            if align.confirmed and self._is_main(align):
                self._anchor = align.sub_start if align.pending else align.ptr
                self._break_out = pos
            self._align = None
            return
        if not align.confirmed and align.run - align.matched >= self.confirm:
            self._confirm(align)

    def _expected(self, align: _Alignment) -> tuple[int, _Substitution | None]:
        """The next token the alignment predicts, and the substitution it would start (if any)."""
        if align.pending:
            return align.pending[0], None
        if align.ptr >= self._len:
            return -1, None
        sub = self._substitution(align.ptr)
        return (sub.new[0], sub) if sub is not None else (int(self._tokens[align.ptr]), None)

    def _substitution(self, pos: int) -> _Substitution | None:
        """The longest active substitution whose old tokens start at source position `pos`."""
        for sub in self._subs.get(int(self._tokens[pos]), ()):  # longest old first
            n = len(sub.old)
            if sub.active and pos + n <= self._len and tuple(self._tokens[pos : pos + n].tolist()) == sub.old:
                return sub
        return None

    def _is_main(self, align: _Alignment) -> bool:
        """Whether a breaking copy was the main one (its break becomes the anchor) rather than a
        short excursion elsewhere (say, a name quoted from the instruction), after which the
        output is expected back near the old anchor."""
        if self._anchor is None or align.run >= self.settle:
            return True
        return -self.back <= align.src_start - self._anchor <= self.near

    def _confirm(self, align: _Alignment) -> None:
        """A resumed copy held: learn what replaced the source just before it resumed.

        After a break near the anchor the replaced span is known (anchor -> resume point); a copy
        found anywhere else is diffed against the source on its left instead (`_left_edit`).
        """
        align.confirmed = True
        if self._anchor is not None and align.origin in ("next", "local"):
            old = tuple(self._tokens[self._anchor : align.src_start].tolist())
            new = tuple(self._tokens[self._break_out : align.out_start].tolist())
        else:
            old, new = self._left_edit(align.src_start, align.out_start)
        old, new = _core(old, new)
        if 1 <= len(old) <= self.max_sub_len and 1 <= len(new) <= self.max_sub_len:
            options = self._subs.setdefault(old[0], [])
            if all(sub.old != old for sub in options):
                options.append(_Substitution(old, new))
                options.sort(key=lambda sub: -len(sub.old))

    def _left_edit(self, src: int, out: int, context: int = 2) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shortest replacement (old before `src`, new before `out`) with `context` agreeing
        tokens on its left, or two empty tuples: `x y OLD | copy` against `x y NEW | copy`."""
        tokens = self._tokens
        for total in range(2, 2 * self.max_sub_len + 1):
            for k_old in range(max(1, total - self.max_sub_len), min(self.max_sub_len, total - 1) + 1):
                k_new = total - k_old
                a, b = src - k_old, out - k_new
                if a - context >= 0 and b - context >= max(src, self._prompt_len) and \
                        np.array_equal(tokens[a - context : a], tokens[b - context : b]):
                    return tuple(tokens[a:src].tolist()), tuple(tokens[b:out].tolist())
        return (), ()

    def _resync(self) -> None:
        """After a divergence: find where the output copies now.

        Two rules propose a place: the best match near the anchor (an edit ended, the copy
        resumes) and the longest, most recent match anywhere (prompt lookup's rule: the output
        repeats what it just wrote, as in lists and loops). The anchor's wins unless the other
        matches 2 more tokens. (Choosing by which rule predicted better so far in the request
        gained nothing on replays, so the simple rule stays; measured: benchmarks/drafts.md.)
        """
        ends, lengths = suffix_matches(self._tokens, self._len, self.max_ngram)
        if not len(ends):
            return
        found = None
        if self._anchor is not None:
            offset = ends - lengths - self._anchor
            near = np.flatnonzero((offset >= -self.back) & (offset <= self.window))
            if len(near):
                # edits are small: a longer match must be exponentially nearer to win (a token of
                # match is worth doubling the distance; a place behind the anchor counts double)
                distance = np.where(offset[near] >= 0, offset[near], -2 * offset[near])
                best = near[int(np.argmax(lengths[near] - 0.5 * np.log2(1.0 + distance)))]
                found = (int(ends[best]), int(lengths[best]), "next" if 0 <= offset[best] <= _NEXT else "local")
        best = int(np.flatnonzero(lengths == lengths.max())[-1])
        if lengths[best] >= self.min_recent and (found is None or lengths[best] > found[1] + 1):
            found = (int(ends[best]), int(lengths[best]), "recent")
        if found is None:
            return
        end, length, origin = found
        if self._len - end <= _LOOP:
            origin = "loop"
        self._align = _Alignment(end, origin, length, length, end - length, self._len - length)

    # ------------------------------------------------------------------ drafting
    def propose(self, context_ids: Sequence[int], max_nodes: int) -> DraftTree:
        self._follow(context_ids)
        self._cells = {}
        if self._align is None and self._len:
            self._resync()
        if max_nodes <= 0:
            return DraftTree.empty()
        max_nodes = min(max_nodes, self.max_depth)
        guesses = self._guesses(max_nodes)
        if self._align is None:
            return self._tree(guesses, max_nodes) if guesses else DraftTree.empty()
        return self._draft(self._align, max_nodes, guesses)

    def _guesses(self, max_nodes: int) -> list[tuple[tuple[int, ...], float]]:
        """Scored branches where the copy may resume once the new text since the break ends.

        While the new text has no alignment that held (its first `resume_within` tokens),
        guess that it replaced as many old tokens at the anchor as it has (a renamed name, a changed
        value), one fewer or one more, or none (an insertion), and copy the source after each guess,
        each kind calibrated apart. A right guess saves the step that would emit the first copied
        token alone before `_resync` can find it. An alignment of at most `_WEAK` tokens does not
        stop the guessing: right after new text a short match somewhere is common and often wrong
        (`= 5` matching the `5` of `0.5`); the guesses and its chain then compete by score.
        """
        written = self._len - self._break_out
        align = self._align
        if self._anchor is None or not 1 <= written <= self.resume_within or \
                (align is not None and align.run > _WEAK):
            return []
        guesses = {0: "insert"}
        for old, guess in ((written, "same"), (written - 1, "fewer"), (written + 1, "more")):
            guesses.setdefault(old, guess)
        nodes = []
        for old, guess in guesses.items():
            if self._anchor + old < self._break_out:  # the old tokens lie before the new text
                path, scores, _ = self._copy(self._anchor + old, [], 0, [], 1.0, max_nodes,
                                             origin=f"resume-{guess}", held=0)
                nodes += [(tuple(path[: i + 1]), s) for i, s in enumerate(scores)]
        return nodes

    def _draft(self, align: _Alignment, max_nodes: int, guesses: list[tuple[tuple[int, ...], float]]) -> DraftTree:
        """The chain the alignment (`self._align`) predicts; where it applies a substitution the model has not
        followed yet (about as likely as not), also a branch with the old text; with any `guesses`,
        the `max_nodes` best-scored nodes of all."""
        trust = _trust(align.sub) if align.pending else 0
        path, scores, fork = self._copy(align.ptr, list(align.pending), trust, [], 1.0, max_nodes,
                                        origin=align.origin, held=align.run)
        if fork is None and not guesses:
            if not path:
                return DraftTree.empty()
            return DraftTree(np.asarray(path, np.int64), np.arange(-1, len(path) - 1), scores=np.asarray(scores),
                             sources=(self.name,) * len(path))
        nodes = [(tuple(path[: i + 1]), s) for i, s in enumerate(scores)]
        if fork is not None:
            depth, ptr, score = fork
            old, old_scores, _ = self._copy(ptr, [], _OLD, path[:depth], score, max_nodes - depth,
                                            origin=align.origin, held=align.run)
            nodes += [(tuple(old[: depth + i + 1]), s) for i, s in enumerate(old_scores)]
        return self._tree(nodes + guesses, max_nodes)

    def _tree(self, nodes: list[tuple[tuple[int, ...], float]], max_nodes: int) -> DraftTree:
        """The `max_nodes` best of several scored branches (path, score) as one tree."""
        nodes.sort(key=lambda node: (-node[1], len(node[0])))  # best first, parents first
        return merge_proposals([(p, s, (), self.name) for p, s in nodes], max_nodes)  # no cells: merge ignores them

    def _copy(self, ptr: int, pending: list[int], trust: int, prefix: list[int], score: float,
              max_nodes: int, *, origin: str, held: int) -> tuple[list[int], list[float], tuple[int, int, float] | None]:
        """Copy the source from `ptr` below `prefix` (substitutions applied), scoring each edge by
        its cell: how the copy was found (`origin`) and how many tokens it held before (`held`).

        Returns the path (prefix included), the new nodes' scores, and where the first substitution
        not yet followed was applied: (its depth, its source position, the score before it).
        `trust=_OLD` copies the old text at `ptr` even where a substitution would apply.
        """
        end, base = self._len, ptr
        ahead = self._tokens[ptr : min(end, ptr + 2 * max_nodes)].tolist()
        path = list(prefix)
        scores: list[float] = []
        fork: tuple[int, int, float] | None = None
        rates: dict[tuple, float] = {}  # cell -> calibrated edge rate, looked up once a call
        old_first = trust == _OLD
        while len(scores) < max_nodes:
            if not pending:
                trust = _OLD if old_first else 0
                if ptr >= end:  # copying what this draft just wrote (a repeating span)
                    if ptr - end >= len(path):
                        break
                    pending = [path[ptr - end]]
                    ptr += 1
                elif not old_first and self._subs and (sub := self._substitution(ptr)) is not None:
                    trust = _trust(sub)
                    if trust == 1 and fork is None:
                        fork = (len(path), ptr, score)
                    pending = list(sub.new)
                    ptr += len(sub.old)
                else:
                    pending = [ahead[ptr - base] if ptr - base < len(ahead) else int(self._tokens[ptr])]
                    ptr += 1
                old_first = False
            run = bucket(held + len(path), _RUN_EDGES)
            fine = (origin, trust, run)
            coarse = ("sub", trust) if trust else ("run", run)
            rate = rates.get(fine)
            if rate is None:
                prior = _SUB_PRIOR[trust] if trust else _prior(_RUN_EDGES[run - 1] if run else 0)
                rate = rates[fine] = self.calibrator.estimate(fine, coarse, prior)
            score *= rate
            if score < self.min_score:
                break
            path.append(pending.pop(0))
            scores.append(score)
            self._cells[tuple(path)] = (fine, coarse)
        return path, scores, fork
