"""What a request may ask of the decoding loop, and the checks that make a bad request fail when
it is made rather than mid-generation.

Validation was spread over the decoding loop and the processors; it lives here, below both, so
`aded.processors` can name `GenerationConfig` without importing `aded.decoding` (which imports
it) and each rule is stated once. Sampling's own fields are `verify.Sampling`'s to check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from aded.verify import Sampling

if TYPE_CHECKING:
    from aded.grammar import Grammar

__all__ = ["GenerationConfig", "SamplingFields", "sampling_fields", "check_processing", "logit_bias_pairs", "token_id_tuple",
           "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat `top_logprobs`


class SamplingFields(TypedDict):
    """What `sampling_fields` returns: keyword arguments of `GenerationConfig`."""

    do_sample: bool
    temperature: float


def sampling_fields(temperature: float) -> SamplingFields:
    """`do_sample` and `temperature` for a user's temperature, decided here for every surface (API,
    CLI, server, benchmark): OpenAI's convention, 0 means greedy; above 0 samples at it."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else 1.0}


@dataclass(frozen=True)
class GenerationConfig:
    """Named as in transformers' GenerationConfig (sampling, `repetition_penalty`, `min_p`), OpenAI's
    API (`logit_bias`, `presence_penalty`, `frequency_penalty`, `logprobs`, `top_logprobs`) and
    vLLM's (`stop_token_ids`, `ignore_eos`, `min_tokens`); `max_draft_nodes` bounds each draft tree.

    All of them hold with speculation on: each draft node is judged with the processors applied in
    its own context (processors.py has their order and semantics). `stop_token_ids` end generation
    as EOS does (finish reason "stop", the id kept in the output); `ignore_eos` makes the model's EOS
    an ordinary token; `min_tokens` holds back both until that many tokens are generated (stop
    strings are text, checked by the caller, and still end generation). `logprobs` are the model's
    raw log-probabilities (before processors and warpers), as vLLM reports them by default.
    A `grammar` (from `response_format` or a required tool call) masks every row and prunes every
    draft to what it allows; generation then ends where it is complete.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_draft_nodes: int = 24
    min_p: float = 0.0
    # given as a mapping (token id -> bias) or pairs; kept as sorted pairs, as `stop_token_ids` is kept a tuple
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0  # OpenAI's, over the output, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, over the output, in [-2, 2]
    repetition_penalty: float = 1.0  # transformers', over prompt + output, > 0 (1 = off)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, in [0, 20]; needs `logprobs`
    grammar: Grammar | None = None  # the output must match it (grammar.py; the API makes it)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.max_draft_nodes <= 1024:
            raise ValueError(f"max_draft_nodes must be in [0, 1024], got {self.max_draft_nodes}")
        self.sampling()  # validates temperature, top_k, top_p, min_p even when greedy: a typo is an error
        object.__setattr__(self, "logit_bias", logit_bias_pairs(self.logit_bias))
        stop_ids = () if self.stop_token_ids is None else self.stop_token_ids
        object.__setattr__(self, "stop_token_ids", token_id_tuple("stop_token_ids", stop_ids))
        check_processing(self)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p)


def _check_range(name: str, value, low: float, high: float) -> None:
    """ValueError naming `name` unless `value` is a real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def check_processing(config: GenerationConfig) -> None:
    """ValueError naming the first bad processor or logprobs field of `config` (sampling's fields
    are `Sampling`'s to check; `logit_bias` and `stop_token_ids` are normalised before this)."""
    _check_range("presence_penalty", config.presence_penalty, -2, 2)
    _check_range("frequency_penalty", config.frequency_penalty, -2, 2)
    penalty = config.repetition_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {penalty!r}")
    for name in ("ignore_eos", "logprobs"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    if not _is_int(config.min_tokens) or not 0 <= config.min_tokens <= config.max_new_tokens:
        raise ValueError(f"min_tokens must be an integer in [0, max_new_tokens = {config.max_new_tokens}], "
                         f"got {config.min_tokens!r}")
    if not _is_int(config.top_logprobs) or not 0 <= config.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                         f"got {config.top_logprobs!r}")
    if config.top_logprobs and not config.logprobs:
        raise ValueError("top_logprobs needs logprobs=True")
    if config.grammar is not None:
        if not callable(getattr(config.grammar, "start", None)):
            raise ValueError(f"grammar must be an aded.grammar.Grammar, got {config.grammar!r}")
        for name in ("ignore_eos", "min_tokens"):  # a grammar decides where the output may end
            if getattr(config, name):
                raise ValueError(f"{name} cannot be combined with a grammar (response_format or a "
                                 "required tool call): generation ends where the grammar is complete")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_id(name: str, value) -> int:
    try:
        token = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        token = -1
    if token < 0:
        raise ValueError(f"{name} must hold token ids (non-negative integers), got {value!r}")
    return token


def token_id_tuple(name: str, values: Iterable[int]) -> tuple[int, ...]:
    """Validated token ids, in the given order, without repeats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of token ids, got {values!r}")
    return tuple(dict.fromkeys(_token_id(name, v) for v in values))


def logit_bias_pairs(bias: Mapping[int, float] | Iterable[tuple[int, float]] | None
                     ) -> tuple[tuple[int, float], ...]:
    """`logit_bias` (token id -> bias, or such pairs) as sorted pairs, hashable so that the config
    stays frozen; each bias in OpenAI's range [-100, 100]. Ids may be decimal strings, as JSON
    object keys are."""
    if bias is None:
        return ()
    if isinstance(bias, (str, bytes)) or not isinstance(bias, (Mapping, Iterable)):
        raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
    items = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
        key, value = item
        _check_range(f"logit_bias[{key!r}]", value, -100, 100)
        if isinstance(key, str) and key.isdecimal():
            key = int(key)
        pairs[_token_id("logit_bias", key)] = float(value)
    return tuple(sorted(pairs.items()))
