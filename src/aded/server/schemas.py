"""Request and response bodies in the shapes of the OpenAI API, validated strictly.

Requests are strict (a string where a number belongs is an error, not a conversion) because a
silently coerced parameter is a wrong answer the client cannot see. For the same reason no field
is ever dropped: an unknown field is refused by name, and a field the API defines that this server
does not honour yet is accepted only at its neutral value (`NOT_SUPPORTED_YET`, one line per
field, so honouring one later is deleting its line). The fields that cannot change what this server
answers (`user`, `store`, `metadata`, `service_tier`, `reasoning_effort` for models that do not
reason) are validated and accepted, since the common clients send them.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "TextTokenizeRequest",
    "ChatTokenizeRequest",
    "DetokenizeRequest",
    "NOT_SUPPORTED_YET",
    "FieldError",
    "ErrorBody",
    "ErrorResponse",
    "AdedStats",
    "error_payload",
]

MAX_STOP = 4  # as in the OpenAI API
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 100  # as in the OpenAI API
MAX_CHAT_TOP_LOGPROBS = 20  # as in the OpenAI API
MAX_COMPLETION_LOGPROBS = 5  # as in the OpenAI API
_TOKEN_ID = re.compile("[0-9]{1,10}")  # the key is an int; more digits could not be a token id anyway


class FieldError(ValueError):
    """A check across fields that names the field to blame (pydantic would name the whole body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only beside an assistant's tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, sent back
    tool_call_id: str | None = None  # which call a tool message answers
    # what an OpenAI response message carries besides, so a client may send one back unchanged; an
    # earlier refusal is shown to the model as that turn's text
    refusal: str | None = None
    function_call: FunctionCall | None = None  # legacy: an assistant's call, as `tool_calls` now
    audio: None = None
    annotations: list[Any] | None = Field(default=None, max_length=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_function_result(cls, data: Any) -> Any:
        """A legacy `function` message (the answer to an assistant's `function_call`) is the tool
        message of today: it answers the call `calls()` names `call_0`, and keeps its function name."""
        if isinstance(data, dict) and data.get("role") == "function":
            if not isinstance(data.get("name"), str) or not data["name"]:
                raise FieldError("name", "a function message needs the name of the function it answers")
            data = {**data, "role": "tool", "tool_call_id": data.get("tool_call_id") or "call_0"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ChatMessage:
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.tool_calls and self.function_call:
            raise FieldError("function_call", "give tool_calls or the legacy function_call, not both")
        if self.refusal is not None and self.role != "assistant":
            raise FieldError("refusal", f"only assistant messages carry a refusal, not {self.role} messages")
        if self.role == "tool" and not self.tool_call_id:
            raise FieldError("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.function_call
                                                                        or self.refusal is not None)):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls "
                             "or a refusal)")
        return self

    def text(self) -> str | None:
        if self.content is None:
            return self.refusal
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def calls(self) -> list[ToolCall] | None:
        """The assistant's calls, the legacy `function_call` as one of them."""
        if self.function_call is not None:
            return [ToolCall(id="call_0", function=self.function_call)]
        return self.tool_calls


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_only_for_json_schema(self) -> ResponseFormat:
        if self.json_schema is not None and self.type != "json_schema":
            raise FieldError("json_schema", f"a json_schema is read only with type json_schema; with type "
                             f"{self.type!r} it would be ignored (send type json_schema, or leave it out)")
        return self


class FunctionSpec(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]


class NamedFunction(_Strict):
    """The legacy `function_call` naming a function."""

    name: str


MAX_N = 16  # choices per request (each is a generation of its own)
MAX_METADATA = 16  # key-value pairs, as in the OpenAI API


class _Sampling(_Strict):
    """Parameters shared by both endpoints (OpenAI names and ranges; vLLM's for extensions)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)  # extension, as in vLLM
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, min_length=1)  # vLLM's: whose learned state
    prompt_cache_key: str | None = Field(default=None, min_length=1)  # a salt where state is per salt
    # accepted, and changing nothing this server outputs
    user: str | None = None  # an end-user id for the operator's logs
    store: bool | None = None  # nothing is stored for later retrieval either way
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    # output of vLLM's (aded.server.output)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | str | None = None  # vLLM's: a JSON schema, as response_format
    # processors of the library (GenerationConfig); token ids are checked against the vocabulary
    # by the service, which knows it
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None  # a grammar (the library's), on both endpoints
    n: int = Field(default=1, ge=1, le=MAX_N)  # choices: the request run n times

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids written as decimal strings, got {key[:20]!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values are in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                 f"got {bias} for token {key}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream: true")
        if self.guided_json is not None and self.response_format is not None:
            raise FieldError("guided_json", "give response_format or guided_json (vLLM's name for a JSON "
                             "schema), not both")
        return self

    def output_format(self) -> dict[str, Any] | None:
        """`response_format` as the library takes it; vLLM's `guided_json` as a json_schema one."""
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                import json

                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise FieldError("guided_json", f"guided_json is not a JSON schema: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise FieldError("guided_json", "guided_json must be a JSON schema (an object)")
            return {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}}
        if self.response_format is None:
            return None
        return self.response_format.model_dump(exclude_none=True)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @abstractmethod
    def num_top_logprobs(self) -> int | None:
        """Alternatives asked for per generated token; None when no logprobs are asked for.

        Each endpoint answers it (the two spell the field differently: chat has `logprobs: true`
        plus `top_logprobs: n`, completions `logprobs: n`); this base is never a request itself."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call is returned
    functions: list[FunctionSpec] | None = Field(default=None, min_length=1)  # legacy `tools`
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy `tool_choice`
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the chat template
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # no reasoning here

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        """`max_completion_tokens` is the newer name of `max_tokens`; two different limits are an error."""
        given = {self.max_tokens, self.max_completion_tokens} - {None}
        if len(given) > 1:
            raise FieldError("max_completion_tokens", f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) differ; give one of them")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.functions is not None and self.tools is not None:
            raise FieldError("functions", "give tools or the legacy functions, not both")
        if self.function_call is not None and self.tool_choice is not None:
            raise FieldError("function_call", "give tool_choice or the legacy function_call, not both")
        if self.function_call is not None and self.functions is None:
            raise FieldError("function_call", "function_call needs functions")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def legacy_functions(self) -> bool:
        """Were tools given as the legacy `functions` (so calls are answered as `function_call`)?"""
        return self.functions is not None

    def tool_fields(self) -> tuple[list[dict] | None, Any]:
        """(tools, tool_choice) as OpenAI's current fields, the legacy ones converted."""
        if self.functions is not None:
            legacy = self.function_call
            choice: Any = legacy
            if isinstance(legacy, NamedFunction):
                choice = {"type": "function", "function": {"name": legacy.name}}
            return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.functions], choice
        current = self.tool_choice
        tools = None if self.tools is None else [tool.model_dump(exclude_none=True) for tool in self.tools]
        return tools, current.model_dump() if isinstance(current, NamedToolChoice) else current

    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # alternatives per token
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value

    def num_top_logprobs(self) -> int | None:
        return self.logprobs


class TextTokenizeRequest(_Strict):
    """vLLM's /tokenize body for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class ChatTokenizeRequest(_Strict):
    """vLLM's /tokenize body for chat messages (through the chat template, as for a completion)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def tool_fields(self) -> tuple[list[dict] | None, Any]:
        return (None if self.tools is None else [tool.model_dump(exclude_none=True) for tool in self.tools]), None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _is(*neutral: Any) -> Callable[[Any], bool]:
    """Neutral when equal to one of `neutral` with the same type (`logprobs: 0` is not `false`)."""
    return lambda value: any(type(value) is type(n) and value == n for n in neutral)


#: Fields of the API this server does not honour yet -> whether a value is the neutral one. A
#: request with any other value is refused with a 400 naming the field, never answered as if the
#: field had been honoured. A field honoured later loses its line here.
NOT_SUPPORTED_YET: dict[str, Callable[[Any], bool]] = {
    "best_of": _is(None, 1),
    "echo": _is(False),
    "suffix": _is(None, ""),
}


# ---------------------------------------------------------------------------- responses
# (the answers' shapes are written out in replies.py; these are the parts built from models)
class AdedStats(BaseModel):
    """The extension field: how speculative decoding went for this response."""

    mean_accepted_tokens: float
    steps: int
    draft_nodes: int
    decode_tokens_per_s: float
    drafter: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat's shape: one entry per generated token, its alternatives best first."""

    content: list[TokenLogprobEntry]


class TextLogprobs(BaseModel):
    """Completions' (legacy) shape: parallel lists, one item per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_payload(message: str, type_: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()
