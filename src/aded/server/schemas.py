"""Request and response bodies in the shapes of the OpenAI API, validated strictly.

Requests are strict (a string where a number belongs is an error, not a conversion) because a
silently coerced parameter is a wrong answer the client cannot see. For the same reason no field
is ever dropped: an unknown field is refused by name, and a field the API defines that this server
does not honour yet is accepted only at its neutral value (`NOT_SUPPORTED_YET`, one line per
field, so honouring one later is deleting its line).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "NOT_SUPPORTED_YET",
    "FieldError",
    "ErrorBody",
    "ErrorResponse",
    "Usage",
    "PromptTokensDetails",
    "AdedStats",
    "ChatCompletion",
    "ChatCompletionChunk",
    "TextCompletion",
    "ModelCard",
    "ModelList",
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
    content: Union[str, list[TextPart], None] = None  # None only beside an assistant's tool_calls
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls, sent back
    tool_call_id: Optional[str] = None  # which call a tool message answers
    # what an OpenAI response message carries besides, so a client may send one back unchanged
    refusal: None = None
    function_call: None = None
    audio: None = None
    annotations: Optional[list[Any]] = Field(default=None, max_length=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class FunctionSpec(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]


class _Sampling(_Strict):
    """Parameters shared by both endpoints (OpenAI names and ranges; vLLM's for extensions)."""

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=100_000)  # extension, as in vLLM
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an end-user id for the operator's logs; changes no output
    cache_salt: Optional[str] = Field(default=None, min_length=1)  # vLLM's: whose learned state
    # processors of the library (GenerationConfig); token ids are checked against the vocabulary
    # by the service, which knows it
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    logit_bias: Optional[dict[str, float]] = None  # token id (a decimal string) -> bias in [-100, 100]
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = None
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = Field(default=None, ge=0)
    response_format: Optional[ResponseFormat] = None  # a grammar (the library's), on both endpoints
    # defined, not honoured yet: see NOT_SUPPORTED_YET
    n: int = Field(default=1, ge=1)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids written as decimal strings, got {key[:20]!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values are in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                 f"got {bias} for token {key}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _options_need_stream(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def num_top_logprobs(self) -> int | None:
        """Alternatives asked for per generated token; None when no logprobs are asked for.

        Each endpoint answers it (the two spell the field differently: chat has `logprobs: true`
        plus `top_logprobs: n`, completions `logprobs: n`); this base is never a request itself."""
        raise NotImplementedError(f"{type(self).__name__} must say how it asks for logprobs")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        """`max_completion_tokens` is the newer name of `max_tokens`; two different limits are an error."""
        given = {self.max_tokens, self.max_completion_tokens} - {None}
        if len(given) > 1:
            raise FieldError("max_completion_tokens", f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) differ; give one of them")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # alternatives per token
    best_of: Optional[int] = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Union[str, list[int]]) -> Union[str, list[int]]:
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value

    def num_top_logprobs(self) -> int | None:
        return self.logprobs


def _is(*neutral: Any) -> Callable[[Any], bool]:
    """Neutral when equal to one of `neutral` with the same type (`logprobs: 0` is not `false`)."""
    return lambda value: any(type(value) is type(n) and value == n for n in neutral)


#: Fields of the API this server does not honour yet -> whether a value is the neutral one. A
#: request with any other value is refused with a 400 naming the field, never answered as if the
#: field had been honoured. A field honoured later loses its line here.
NOT_SUPPORTED_YET: dict[str, Callable[[Any], bool]] = {
    "n": _is(1),
    "best_of": _is(None, 1),
    "echo": _is(False),
    "suffix": _is(None, ""),
    "parallel_tool_calls": _is(None, True),  # true is what is done: any number of calls
}


# ---------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens kept from the previous request instead of computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


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
    bytes: Optional[list[int]] = None


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]  # null when the answer is only tool calls (kept as null in the body)
    tool_calls: Optional[list[dict[str, Any]]] = None  # OpenAI-shaped, as `Completion.tool_calls`


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: Usage
    aded: Optional[AdedStats] = None


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # each with its "index", in the final delta


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    aded: Optional[AdedStats] = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[TextLogprobs] = None
    finish_reason: Optional[str] = None


class TextCompletion(BaseModel):
    """Both the whole response and each streamed chunk (as in the OpenAI API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[TextChoice]
    usage: Optional[Usage] = None
    aded: Optional[AdedStats] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aded"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_payload(message: str, type_: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()
