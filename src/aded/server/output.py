"""What of the generated text a client gets: vLLM's output fields, applied on the engine's worker.

The library's `TextStream` gives the text as `tokenizer.decode(ids, skip_special_tokens=True)`, cut
where the first stop string begins, with the id that ended generation (EOS or a `stop_token_ids`
id) decoded like any other. vLLM answers differently, and clients written for it expect that:

- the text of the id that ended generation (a `stop_token_ids` hit, or EOS) is dropped, unless
  `include_stop_str_in_output` is true;
- with `include_stop_str_in_output`, a stop string that ended generation is kept at the end;
- with `skip_special_tokens: false`, special tokens are written as their text.

`OutputRules` holds those fields for one request; a request that sets none of them is relayed as
the library streams it (`OutputRules.shapes_text` is false). Otherwise `OutputText` rebuilds the
text: while streaming it relays what cannot change any more (it holds back as many characters as
the ending id's text may take, and with special tokens kept the stop strings' length), and at the
end `finish` gives the final text and what was not relayed yet. With special tokens kept it
decodes the ids itself (the engine then asks the library for logprobs, which carry each step's
ids; they are not sent unless the client asked for them) in a window, as vLLM's incremental
detokenizer does, so a stream costs time linear in its length.

Tool calls are parsed here too (`aded.tools.parse_tool_calls` with the declared tools' schemas,
so fenced JSON calls are recognised; `parallel_tool_calls: false` keeps the first call only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from aded.tools import parse_tool_calls

__all__ = ["OutputRules", "OutputText", "first_stop"]

_END_MARGIN = 1  # a token decoded alone may lack the space it has after its neighbour


@dataclass(frozen=True)
class OutputRules:
    skip_special_tokens: bool = True
    include_stop_str: bool = False
    end_ids: frozenset[int] = frozenset()  # ids that end generation (stop_token_ids, and EOS unless ignored)
    stop_token_ids: tuple[int, ...] = ()
    stops: tuple[str, ...] = ()
    tools: tuple[dict, ...] | None = None  # declared and rendered tools: calls are parsed
    parallel_tool_calls: bool = True
    logprobs_wanted: bool = False  # the client asked for logprobs (else any asked for here are not sent)

    @property
    def shapes_text(self) -> bool:
        """Does the text differ from what the library streams?"""
        return not self.skip_special_tokens or self.include_stop_str or bool(self.stop_token_ids)

    @property
    def needs_ids(self) -> bool:
        """Must the stream carry each step's ids (its logprobs) for this text?"""
        return not self.skip_special_tokens

    def finish_calls(self, completion):
        """The completion with its tool calls parsed from its text (when tools were rendered)."""
        if self.tools is None:
            return completion
        content, calls = parse_tool_calls(completion.text, list(self.tools))
        if not self.parallel_tool_calls:
            calls = calls[:1]
        finish = completion.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"  # as OpenAI reports a turn that ends in calls
        elif not calls and finish == "tool_calls":
            finish = "stop"
        return replace(completion, content=content, tool_calls=calls, finish_reason=finish)


class OutputText:
    """The text of one generation under `rules`: `piece` per streamed piece, `finish` at the end."""

    def __init__(self, tokenizer, rules: OutputRules) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        skip = rules.skip_special_tokens
        ends = rules.end_ids if not rules.include_stop_str else frozenset()
        #: characters held back: the ending id's text, which `finish` may drop
        self.holdback = max((len(tokenizer.decode([t], skip_special_tokens=skip)) + _END_MARGIN for t in ends),
                            default=0)
        self.stop_holdback = max((len(s) for s in rules.stops), default=1) - 1 if not skip else 0
        self.text = ""  # the text so far, as these rules write it (it may still lose its end)
        self.sent = ""  # what was relayed
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window offsets into _ids (vLLM's prefix and read offsets)

    def piece(self, piece: str, entries: Sequence[Any] | None) -> str:
        """What to relay now, given the library's next piece and the logprobs of the ids committed
        since the previous one."""
        if self.rules.skip_special_tokens:
            self.text += piece
            ready = len(self.text)
        else:
            for entry in entries or ():
                self._ids.append(int(entry.token_id))
            self.text += self._decoded()
            ready = len(self.text) - self.stop_holdback
            cut = first_stop(self.text, self.rules.stops)
            if cut is not None:
                ready = min(ready, cut[0])
        ready -= self.holdback
        if ready <= len(self.sent):
            return ""
        out = self.text[len(self.sent):ready]
        self.sent += out
        return out

    def _decoded(self) -> str:
        """The text the ids added since the last call (held while it ends in an incomplete character)."""
        ids = self._ids
        before = self._decode(ids[self._prefix:self._read])
        now = self._decode(ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return now[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.rules.skip_special_tokens)

    def finish(self, completion) -> tuple[Any, str]:
        """(the completion with its final text, the text not relayed yet)."""
        text = final_text(self.tokenizer, completion, self.rules)
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        return replace(completion, text=text, content=text), rest  # calls: `OutputRules.finish_calls`


def final_text(tokenizer, completion, rules: OutputRules) -> str:
    """The whole output text under `rules` (see the module's docstring)."""
    ids = completion.token_ids
    skip = rules.skip_special_tokens
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    if skip:
        text = completion.text  # the library's: cut where a stop string begins
        stop = next((s for s in sorted(rules.stops, key=len) if full.startswith(s, len(text))), None) \
            if len(text) < len(full) else None
    else:
        cut = first_stop(full, rules.stops)
        text, stop = (full, None) if cut is None else (full[:cut[0]], cut[1])
    if stop is not None:
        return text + stop if rules.include_stop_str else text
    if (completion.finish_reason in ("stop", "tool_calls") and ids and ids[-1] in rules.end_ids
            and not rules.include_stop_str):
        kept = len(tokenizer.decode(ids[:-1], skip_special_tokens=skip))
        return text[:kept]
    return text


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(where, which) of the first stop string in `text`: the earliest start, the shortest on a tie."""
    found = [(at, len(s), s) for s in stops if s and (at := text.find(s)) >= 0]
    if not found:
        return None
    at, _, stop = min(found)
    return at, stop
