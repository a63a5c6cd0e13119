"""The library's `TokenLogprob`s in OpenAI's two response shapes.

A token's text is the tokenizer's decoding of that one id (special tokens included, so EOS shows as
itself), and its `bytes` the UTF-8 of that text: a token holding part of a multi-byte character
decodes to U+FFFD, as in other OpenAI-compatible servers. Logprobs are log-softmax of the model's
raw logits (what `Aded.generate(logprobs=True)` returns), floored at `MIN_LOGPROB` so the JSON
never holds -Infinity.

In a stream, each chunk carries the logprobs of the tokens committed since the previous chunk:
the incremental detokenizer may hold text back (an incomplete character, a possible stop string),
so a chunk's tokens and its text can differ by a few tokens; the final chunk carries those left.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from aded.processors import TokenLogprob
from aded.server.schemas import ChatLogprobs, TextLogprobs

__all__ = ["MIN_LOGPROB", "TokenTexts", "chat_logprobs", "text_logprobs"]

MIN_LOGPROB = -9999.0  # as vLLM: a finite floor for JSON


class TokenTexts:
    """Token id -> its text, cached (the same few ids recur among the alternatives)."""

    def __init__(self, tokenizer) -> None:
        self.text = functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))


def _floor(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> dict:
        text = texts.text(token_id)
        return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}

    return ChatLogprobs.model_validate(
        {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                     for e in entries]})


def text_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob], offset: int = 0) -> TextLogprobs:
    """Completions' lists; `offset` is where the first token's text starts in the completion. With
    `logprobs: 0` (no alternatives) each `top_logprobs` item holds the sampled token's own entry,
    as OpenAI's legacy completions answer."""
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(texts.text(entry.token_id))
        offset += len(tokens[-1])
    return TextLogprobs(tokens=tokens, token_logprobs=[_floor(e.logprob) for e in entries],
                        top_logprobs=[{texts.text(i): _floor(lp) for i, lp in e.top} if e.top
                                      else {token: _floor(e.logprob)} for token, e in zip(tokens, entries)],
                        text_offset=offsets)
