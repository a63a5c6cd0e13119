"""The answers of /v1/chat/completions and /v1/completions, whole or streamed, in OpenAI's shapes.

A request has `n` choices (the engine generates them one after another); each choice is answered
with its index. Shapes follow OpenAI's, field for field where clients read them:

- every choice, streamed chunk or not, carries `logprobs` (null unless asked for) and
  `finish_reason` (null until the choice's last chunk);
- a stream opens each chat choice with `{"role": "assistant", "content": ""}` and ends it with a
  chunk whose delta is empty (or holds the tool calls); with `stream_options.include_usage`, one
  more chunk, after all choices, has `choices: []` and the usage (as OpenAI and vLLM send it);
- `usage` counts the prompt once and the tokens of every choice;
- the `aded` extension field (the service decides whether to show it) holds the speculation
  statistics of the whole request, or of one choice in its last streamed chunk.

With tools rendered, streamed text passes through a `CallHolder` (one per choice), so tool-call
markup never reaches a content delta. Requests made with the legacy `functions` are answered in
the legacy shape: `message.function_call` (the first call) and finish reason "function_call".
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from aded.server.engine import Job
from aded.server.logprobs import chat_logprobs, text_logprobs
from aded.tools import FENCE_OPEN, TOOL_CALL_OPEN, fenced_calls, outside_spans, tool_call_spans

__all__ = ["ChatReply", "TextReply", "CallHolder", "sse"]


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Reply(ABC):
    """One request's answer: `whole(completions)`, or `stream(job)`."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, service, body, generation, request_id: str) -> None:
        self.service = service
        self.body = body
        self.generation = generation
        self.id = f"{self.id_prefix}-{request_id}"
        self.created = int(time.time())
        self.model = service.config.model_name
        self.n = generation.n
        self.usage_chunks = body.stream and body.include_usage()

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict:
        out = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
               "choices": choices}
        out.update({k: v for k, v in extra.items() if v is not None})
        return out

    def _usage(self, completions: Sequence[Any]) -> dict:
        prompt = len(completions[0].prompt_token_ids)
        generated = sum(len(c.token_ids) for c in completions)
        cached = self.service.cached_tokens(completions[0], self.generation)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _stats(self, completions: Sequence[Any]) -> dict | None:
        stats = self.service.stats(completions, self.generation)
        return None if stats is None else stats.model_dump()

    @abstractmethod
    def _logprobs(self, entries, offset: int = 0) -> dict | None:
        """The choice's `logprobs` field in this endpoint's shape (chat and text spell it apart)."""

    def stream(self, job: Job) -> StreamingResponse:
        """Server-sent events of the job; a client that goes away cancels it (frees the worker)."""
        return StreamingResponse(self._events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, job: Job):
        num_sent = [0] * self.n  # logprobs relayed per choice
        completions: list[Any] = [None] * self.n
        finished = 0
        try:
            for index in range(self.n):
                for event in self._opening(index):
                    yield event
            while finished < self.n:
                kind, value = await job.next_event()
                if kind == "piece":
                    index, piece, entries = value
                    num_sent[index] += len(entries or ())
                    shown = self._piece(index, piece, entries)
                    if shown is not None:  # None: the piece is held back
                        yield shown
                elif kind == "done":
                    index, completion = value
                    rest = completion.logprobs[num_sent[index]:] if completion.logprobs else None
                    for event in self._closing(index, completion, rest or None):
                        yield event
                    completions[index] = completion
                    finished += 1
                else:
                    yield sse(value.payload())
                    break
            if finished == self.n and self.usage_chunks:
                yield sse(self._envelope(self.chunk_name, [], usage=self._usage(completions)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op when finished; stops generation when the client left

    def _opening(self, index: int) -> list[str]:
        return []

    @abstractmethod
    def _piece(self, index: int, piece: str, entries) -> str | None:
        """One streamed piece of choice `index` as an event; None while it is held back."""

    @abstractmethod
    def _closing(self, index: int, completion, entries) -> list[str]:
        """The last events of choice `index`: what was held back, and its finish reason."""


class ChatReply(_Reply):
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, service, body, generation, request_id: str) -> None:
        super().__init__(service, body, generation, request_id)
        self.legacy = body.legacy_functions
        tools = generation.output.tools
        self.holders = [CallHolder(tools) if tools is not None else None for _ in range(self.n)]

    def _logprobs(self, entries, offset: int = 0) -> dict | None:
        return None if entries is None else chat_logprobs(self.service.token_texts, entries).model_dump()

    def _message(self, completion) -> tuple[dict, str]:
        message: dict[str, Any] = {"role": "assistant", "content": completion.content, "refusal": None}
        finish = completion.finish_reason
        calls = completion.tool_calls or None
        if calls and self.legacy:
            message["function_call"] = dict(calls[0]["function"])
            finish = "function_call" if finish == "tool_calls" else finish
        elif calls:
            message["tool_calls"] = calls
        return message, finish

    def whole(self, completions: Sequence[Any]) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            message, finish = self._message(completion)
            choices.append({"index": index, "message": message, "logprobs": self._logprobs(completion.logprobs),
                            "finish_reason": finish})
        return self._envelope(self.object_name, choices, usage=self._usage(completions),
                              aded=self._stats(completions))

    def _chunk(self, index: int, delta: dict, finish: str | None = None, entries=None, **extra) -> str:
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": finish}
        return sse(self._envelope(self.chunk_name, [choice], **extra))

    def _opening(self, index: int) -> list[str]:
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def _piece(self, index: int, piece: str, entries) -> str | None:
        holder = self.holders[index]
        if holder is None:
            return self._chunk(index, {"content": piece}, None, entries)
        shown = holder.take(piece, entries)
        return self._chunk(index, {"content": shown}, None, entries if shown else None) if shown else None

    def _closing(self, index: int, completion, entries) -> list[str]:
        out = []
        holder = self.holders[index]
        message, finish = self._message(completion)
        if holder is not None:
            entries = holder.held_entries(entries)
            rest = holder.rest(completion.text)
            if rest:
                out.append(self._chunk(index, {"content": rest}))
            if "tool_calls" in message:
                out.append(self._chunk(index, {"tool_calls": [{"index": i, **call}
                                                              for i, call in enumerate(message["tool_calls"])]}))
            elif "function_call" in message:
                out.append(self._chunk(index, {"function_call": message["function_call"]}))
        out.append(self._chunk(index, {}, finish, entries, aded=self._stats([completion])))
        return out


class TextReply(_Reply):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, service, body, generation, request_id: str) -> None:
        super().__init__(service, body, generation, request_id)
        self.offsets = [0] * self.n  # where each choice's next token text starts, for `text_offset`

    def _logprobs(self, entries, offset: int = 0) -> dict | None:
        return None if entries is None else text_logprobs(self.service.token_texts, entries, offset).model_dump()

    def _choice(self, index: int, text: str, finish: str | None, entries) -> dict:
        logprobs = self._logprobs(entries, self.offsets[index])
        if logprobs is not None:
            self.offsets[index] += sum(len(token) for token in logprobs["tokens"])
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def whole(self, completions: Sequence[Any]) -> dict:
        choices = [self._choice(i, c.text, c.finish_reason, c.logprobs) for i, c in enumerate(completions)]
        return self._envelope(self.object_name, choices, usage=self._usage(completions),
                              aded=self._stats(completions))

    def _piece(self, index: int, piece: str, entries) -> str | None:
        return sse(self._envelope(self.chunk_name, [self._choice(index, piece, None, entries)]))

    def _closing(self, index: int, completion, entries) -> list[str]:
        choice = self._choice(index, "", completion.finish_reason, entries)
        return [sse(self._envelope(self.chunk_name, [choice], aded=self._stats([completion])))]


_FENCE_BLOCK = re.compile(r"```(?:json|JSON|xml)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)


class CallHolder:
    """Streamed chat text with tools rendered: text is relayed until a tool call may have begun,
    then held. A call may begin at `<tool_call>`, at a code fence (a fenced JSON call; a fence that
    closes without holding one is relayed, and relaying goes on), or with an answer that opens with
    "{" (a bare call). Once a call has begun, the rest is held to the end, where `rest` gives the
    held text that is content (markup dropped, as in the whole answer) and the calls come in one
    delta. Tokens of held text have their logprobs sent with the choice's last chunk."""

    MARKERS = (TOOL_CALL_OPEN, FENCE_OPEN)

    def __init__(self, tools: Sequence[dict]) -> None:
        self.tools = list(tools)
        self.schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in self.tools}
        self.text = ""  # all text so far
        self.sent = 0  # characters relayed
        self.holding = False  # a call has begun: hold to the end
        self.entries: list = []  # logprobs of tokens whose text is held

    def take(self, piece: str, entries) -> str:
        """What of the text, with `piece` added, to relay now."""
        self.text += piece
        ready = self.sent if self.holding else self._ready()
        shown = self.text[self.sent:ready]
        self.sent = max(self.sent, ready)
        if not shown:  # a piece not relayed: its tokens' logprobs come with the final chunk
            self.entries += entries or []
        return shown

    def _ready(self) -> int:
        """How far the text may be relayed: to the first place a call may begin."""
        text, at = self.text, self.sent
        if not text[:at].strip() and text.lstrip().startswith("{"):
            self.holding = True  # a bare call
            return at
        while True:
            starts = [i for i in (text.find(marker, at) for marker in self.MARKERS) if i >= 0]
            if not starts:  # a marker may be cut at the end: wait for the next piece
                tail = next((i for i in range(max(at, len(text) - max(map(len, self.MARKERS)) + 1), len(text))
                             if any(m.startswith(text[i:]) for m in self.MARKERS)), len(text))
                return tail
            start = min(starts)
            if text.startswith(TOOL_CALL_OPEN, start):
                self.holding = True
                return start
            fence = _FENCE_BLOCK.match(text, start)
            if fence is None:  # not closed yet (or no fence at all: wait for a newline after it)
                return start
            inner = fence.group(1)
            if TOOL_CALL_OPEN in inner or fenced_calls(inner, self.schemas):
                self.holding = True
                return start
            at = fence.end()  # a code block, not a call: relay it and look on

    def held_entries(self, rest):
        """The logprobs for the final chunk: those of the pieces held back, and `rest`."""
        return (self.entries + list(rest or [])) or None

    def rest(self, text: str) -> str:
        """The content not relayed yet, given the choice's whole text: its markup dropped."""
        spans = tool_call_spans(text, self.tools)
        content = outside_spans(text, spans)
        return content[self.sent:] if content.startswith(text[:self.sent]) else ""
