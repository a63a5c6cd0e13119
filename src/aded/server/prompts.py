"""Chat messages and completion prompts -> token ids, on the request-parsing threads.

Text that came from a client is text: the chat template is applied with transformers'
`sanitize_control_tokens=True`, so a user who writes "<|im_start|>system" in a message gets those
characters tokenized as characters, and only the control tokens the template itself writes are
control tokens. (A /v1/completions prompt is the model's raw input; its special tokens stay special,
as in every OpenAI-compatible server.)

Each parsing thread takes its own copy of the tokenizer from a small pool: a Rust tokenizer must
not be used by two threads at once, and the engine's copy is busy decoding.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aded.server.errors import RequestError
from aded.server.parsing import parse_json_object
from aded.server.schemas import ChatMessage
from aded.tools import renders_tool_calls, require_tool_template

__all__ = ["PromptEncoder", "RESERVED_TEMPLATE_KWARGS"]

#: `apply_chat_template`'s own parameters, which `chat_template_kwargs` may not set
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})


class PromptEncoder:
    """`copies` tokenizer copies, one per thread that may encode at the same time."""

    def __init__(self, tokenizer, copies: int, vocab_size: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.vocab_size = vocab_size
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        self.renders_tool_calls = renders_tool_calls(tokenizer)
        try:  # why this template cannot take `tools`, once (the library's own check)
            require_tool_template(tokenizer, "tools were given")
            self._tools_refused: str | None = None
        except ValueError as exc:
            self._tools_refused = str(exc)
        self._free: queue.Queue = queue.Queue()
        for _ in range(copies):
            self._free.put(copy.deepcopy(tokenizer))

    @contextmanager
    def _tokenizer(self) -> Iterator[Any]:
        tokenizer = self._free.get()
        try:
            yield tokenizer
        finally:
            self._free.put(tokenizer)

    def chat_ids(self, messages: list[ChatMessage], tools: list[dict] | None = None,
                 template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> list[int]:
        """`tools` (checked by `aded.tools.check_tools`; None when not rendered) are rendered by the
        template, which must support them in the Hermes format the library parses;
        `template_kwargs` (`chat_template_kwargs`) are more variables for the template (such as
        `enable_thinking`), none of `apply_chat_template`'s own parameters."""
        if not self.has_chat_template:
            raise RequestError("this model has no chat template; use /v1/completions", param="messages")
        if tools and self._tools_refused:
            raise RequestError(self._tools_refused, param="tools", code="unsupported_parameter")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(template_kwargs or ()))
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets it",
                               param="chat_template_kwargs")
        names: dict[str, str] = {}  # tool call id -> function name, for the tool messages answering them
        rendered = [self._template_message(i, m, names) for i, m in enumerate(messages)]
        with self._tokenizer() as tokenizer:
            try:
                ids = tokenizer.apply_chat_template(rendered, tools=tools, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=False,
                                                    sanitize_control_tokens=True, **(template_kwargs or {}))
            except Exception as exc:  # the template is the model's Jinja code: any error is the input's
                raise RequestError(f"the chat template rejected these messages: {type(exc).__name__}: {exc}",
                                   param="messages") from exc
        return [int(t) for t in ids]

    def text_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            with self._tokenizer() as tokenizer:
                return [int(t) for t in tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]]
        too_big = [t for t in prompt if t >= self.vocab_size]
        if too_big:
            raise RequestError(f"token id {too_big[0]} is outside the vocabulary (size {self.vocab_size})",
                               param="prompt")
        return list(prompt)

    def text_of(self, ids: list[int]) -> str:
        """The text of token ids, special tokens written out (what /detokenize answers)."""
        outside = next((t for t in ids if t >= self.vocab_size), None)
        if outside is not None:
            raise RequestError(f"token id {outside} is outside the vocabulary (size {self.vocab_size})",
                               param="tokens")
        with self._tokenizer() as tokenizer:
            return tokenizer.decode(ids, skip_special_tokens=False)

    def _template_message(self, index: int, message: ChatMessage, names: dict[str, str]) -> dict[str, Any]:
        """The message as chat templates expect it: `developer` is `system`, tool-call arguments
        are objects (templates write them with `tojson`), as vLLM passes them, and a tool message
        gains the called function's `name` (as `aded.tools.template_messages` gives it)."""
        out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                               "content": message.text()}
        if message.name is not None:
            out["name"] = message.name
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
            if message.role == "tool" and "name" not in out and message.tool_call_id in names:
                out["name"] = names[message.tool_call_id]
        calls = message.calls()
        if calls:
            field = "tool_calls" if message.tool_calls else "function_call"
            if not self.renders_tool_calls:
                raise RequestError("this model's chat template cannot show earlier tool calls to the model",
                                   param=f"messages.{index}.{field}", code="unsupported_parameter")
            out["tool_calls"] = [{"id": call.id, "type": call.type,
                                  "function": {"name": call.function.name,
                                               "arguments": parse_json_object(
                                                   call.function.arguments,
                                                   f"messages.{index}.{field}.{j}.function.arguments")}}
                                 for j, call in enumerate(calls)]
            names.update((call.id, call.function.name) for call in calls)
        return out

