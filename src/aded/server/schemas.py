"""Request and response bodies in the shapes of the OpenAI API, validated strictly.

Requests are strict (a string where a number belongs is an error, not a conversion) because a
silently coerced parameter is a wrong answer the client cannot see. Fields the API defines but
this server does not implement are accepted only at their neutral value (`n=1`, penalties 0), so a
request is never answered as if an option had been honoured when it was not. Unknown extra fields
are ignored, as OpenAI-compatible servers commonly do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChatMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ErrorBody",
    "ErrorResponse",
    "Usage",
    "AdedStats",
    "ChatCompletion",
    "ChatCompletionChunk",
    "TextCompletion",
    "ModelList",
    "error_payload",
]

MAX_STOP = 4  # as in the OpenAI API
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Parameters shared by both endpoints (OpenAI names and ranges)."""

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=100_000)  # extension, as in vLLM
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return value

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = Field(default=None)

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        return self


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    echo: bool = Field(default=False)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Union[str, list[int]]) -> Union[str, list[int]]:
        if len(value) == 0:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return self


# ---------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdedStats(BaseModel):
    """The extension field: how speculative decoding went for this response."""

    mean_accepted_tokens: float
    steps: int
    draft_nodes: int
    decode_tokens_per_s: float
    drafter: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: Usage
    aded: AdedStats


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
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
    logprobs: None = None
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
