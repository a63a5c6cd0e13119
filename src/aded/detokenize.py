"""Text from token ids as they arrive, in time linear in the output: for streaming and stop strings.

Decoding the whole output again after every step costs O(n^2) over a generation. The
`IncrementalDetokenizer` decodes a short window instead, as vLLM's and TGI's
`detokenize_incrementally` do. It keeps two offsets into the ids: `prefix`, where the window
starts, and `read`, where the text already returned ends. A new token decodes `ids[prefix:]`,
and its text is what that adds to the text of `ids[prefix:read]`:

    ids     ▁Hello  ▁world  !          (a SentencePiece tokenizer)
    push "▁world":  window "▁Hello ▁world" -> "Hello world", less "Hello" -> " world"

Decoding "▁world" alone would give "world": SentencePiece drops the space that starts a string,
so a token's text can depend on the one before it, and the window keeps that neighbour.

Text is held back while it may still change: while it ends in U+FFFD (a character whose other
bytes have not arrived yet), and while the ids end in a run of byte-fallback tokens ("<0xE4>"),
which a SentencePiece decoder turns into text only as a whole (one invalid byte anywhere makes
every byte of the run U+FFFD). The pieces concatenate to the full decode.

`StopFinder` finds the first stop string in text that arrives in pieces, looking at each piece
and the last `max(len(stop)) - 1` characters before it only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["IncrementalDetokenizer", "StopFinder"]

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the byte-fallback decoder recognises


class IncrementalDetokenizer:
    """`push` one id at a time; each call returns the text that id completes ("" while held back).

    Text follows `tokenizer.decode(ids, skip_special_tokens=True)`; each id is decoded a bounded
    number of times (a window spans the last returned piece and the ids after it).
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._is_byte: dict[int, bool] = {}
        self._window: list[int] = []  # ids from the prefix offset on
        self._read = 0  # self._window[:self._read] produced text already returned
        self._read_text = ""  # the decode of self._window[:self._read]
        self._in_byte_run = False  # the last id that decodes to text is a byte-fallback token
        #: the text of the ids pushed since the last piece as they decode now (it may still change)
        self.held_text = ""

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        if token_id not in self._special_ids:  # skipped when decoding: a byte run goes on past it
            self._in_byte_run = self._byte_token(token_id)
        text = self._decode(self._window)
        self.held_text = text[len(self._read_text):]
        if self._in_byte_run or not self.held_text or text.endswith("\ufffd"):
            return ""
        del self._window[: self._read]  # the returned piece's ids become the next window's context
        self._read = len(self._window)
        self._read_text = self._decode(self._window)
        new_text, self.held_text = self.held_text, ""
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _byte_token(self, token_id: int) -> bool:
        if token_id not in self._is_byte:
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            self._is_byte[token_id] = isinstance(token, str) and bool(_BYTE_TOKEN.fullmatch(token))
        return self._is_byte[token_id]


class StopFinder:
    """Where the first stop string starts in text fed piece by piece.

    "First" is the earliest start among the strings the latest piece completes (the shortest on a
    tie), as if the whole text were searched after every piece. Text that may still change (an
    unfinished character) can be searched too, without being kept.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or not all(stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
        self.stops = tuple(stops)
        #: characters at the end of the text that may begin a stop string still to be completed
        self.holdback = max(len(s) for s in self.stops) - 1
        self._tail = ""  # the last `holdback` characters fed
        self._length = 0  # characters fed

    def find(self, piece: str, held: str = "") -> int | None:
        """Where (counting from the first character fed) a stop string starts, if one ends in
        `piece` or in `held`, text after it that may still change (searched now, never kept)."""
        window = self._tail + piece
        origin = self._length - len(self._tail)
        self._length += len(piece)
        self._tail = window[max(0, len(window) - self.holdback):]
        window += held
        hits = [(window.find(s), len(s)) for s in self.stops if s in window]
        return origin + min(hits)[0] if hits else None
