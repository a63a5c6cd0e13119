"""The Python API: `aded.load(model)` then `.generate(...)` or `.stream(...)`, with text in and out.

    >>> import aded
    >>> lm = aded.load("smollm2-135m-instruct", drafter="pld")
    >>> out = lm.generate("Summarise: ...", max_new_tokens=128)
    >>> out.text, out.stats.mean_accepted_tokens
    >>> for piece in lm.stream("Tell me a story"):
    ...     print(piece, end="", flush=True)

Argument names follow transformers' `generate` (`max_new_tokens`, `do_sample`, `temperature`,
`top_k`, `top_p`, `min_p`, `repetition_penalty`); `stop` takes strings, and `logit_bias`,
`presence_penalty`, `frequency_penalty`, `logprobs` and `top_logprobs` mean what they mean in the
OpenAI API; `stop_token_ids`, `ignore_eos` and `min_tokens` what they mean in vLLM. Every keyword is
a `GenerationConfig` field, and all of them hold with speculation on (the output is still exactly
what plain decoding with them would give).

    >>> out = lm.generate("Hi", logit_bias={504: -100}, logprobs=True, top_logprobs=2)
    >>> out.logprobs[0]   # TokenLogprob(token_id, logprob, top=((id, logprob), (id, logprob)))

Structured output and tools take OpenAI's fields, also with speculation on and lossless
(grammar.py, tools.py): `response_format` ({"type": "json_object"} or a "json_schema") constrains
the output; `tools` are rendered by the model's chat template and `tool_choice` ("auto", "none",
"required" or a named function) forces a call where asked; the calls come back parsed.

    >>> out = lm.generate("List two colours as JSON", response_format={"type": "json_object"})
    >>> out = lm.generate(messages, tools=[{"type": "function", "function": {...}}],
    ...                   tool_choice="required")
    >>> out.tool_calls   # [{"id": "call_...", "type": "function", "function": {"name", "arguments"}}]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aded.backends.tokens import eos_token_ids  # public here too: `aded.api.eos_token_ids`
from aded.budget import BUDGETS, cost_model, new_budget
from aded.decoding import GenerationConfig, GenerationStats, SpeculativeDecoder, sampling_fields
from aded.detokenize import IncrementalDetokenizer, StopFinder
from aded.drafters import DEFAULT_DRAFTER, Drafter, LearningDrafter, default_drafter, make_drafter
from aded.models import DEFAULT_MODEL
from aded.processors import TokenLogprob
from aded.tools import chat_prompt_ids, check_tools, output_grammar, parse_tool_calls

__all__ = ["load", "Aded", "Completion", "eos_token_ids"]

Messages = Sequence[dict[str, Any]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for (`logprobs=True`)
    # with tools rendered, OpenAI tool calls parsed from `text` (finish_reason "tool_calls" if any),
    # else None; `content`: the text without them (None when only calls remain)
    tool_calls: list[dict] | None = None
    content: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": self.finish_reason,
            "stats": {
                "steps": self.stats.steps,
                "generated_tokens": self.stats.generated_tokens,
                "mean_accepted_tokens": round(self.stats.mean_accepted_tokens, 4),
                "prefill_s": round(self.stats.prefill_s, 4),
                "cached_prompt_tokens": self.stats.cached_prompt_tokens,
                "decode_s": round(self.stats.decode_s, 4),
                "draft_s": round(self.stats.draft_s, 4),
                "verify_s": round(self.stats.verify_s, 4),
                "decode_tokens_per_s": round(self.stats.decode_tokens_per_s, 3),
            },
        }
        if self.tool_calls is not None:
            data["content"], data["tool_calls"] = self.content, self.tool_calls
        if self.logprobs is not None:
            data["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob,
                                 "top_logprobs": [{"token_id": i, "logprob": lp} for i, lp in t.top]}
                                for t in self.logprobs]
        return data


def load(
    model: str = DEFAULT_MODEL,
    drafter: str | Drafter = DEFAULT_DRAFTER,
    dtype: str = "float32",
    device: str = "cpu",
    budget: str = "measured",
    backend: str = "auto",
    n_ctx: int | None = None,
    threads: int | None = None,
    repack: str = "auto",
    numerics: str = "exact",
    **drafter_options: Any,
) -> Aded:
    """Load a model (alias, folder or .gguf) with a drafter, ready to generate.

    `backend`: "auto" (llama.cpp for GGUF files when llama-cpp-python is installed, else
    transformers), "hf" or "llama.cpp". `dtype` and `device` apply to transformers, `n_ctx` (the
    context size) and `repack` (llama.cpp's weight repacking: "auto" measures once which layout
    decodes faster with exact verified chains, "on" is llama.cpp's default, "off" keeps K-quant
    chains exact up to six drafted tokens) and `numerics` ("exact", the default: every verified row
    bit-identical to one-token decoding; "batched": llama.cpp's fastest kernels at any chain length,
    as llama-server verifies, whose output may differ from plain decoding's) to llama.cpp, `threads`
    to both.
    `budget`: "measured" (verify as many draft nodes as pay off on this machine, from a one-off
    timing of the model that is cached), "typical" (a CPU-like cost curve, no timing), or "off"
    (verify every proposed node).
    """
    from aded.backends.select import load_runner

    runner, tokenizer, model_id = load_runner(model, backend, dtype=dtype, device=device,
                                              n_ctx=n_ctx, threads=threads, repack=repack,
                                              numerics=numerics)
    return Aded(runner, tokenizer, drafter, model_id=model_id, budget=budget, **drafter_options)


class Aded:
    """A model runner, its tokenizer and a drafter; one request at a time.

    `model` is a runner (see backends/base.py) or a transformers causal LM, which is then run by
    the HF runner.
    """

    def __init__(self, model, tokenizer, drafter: str | Drafter = DEFAULT_DRAFTER, model_id: str = "model",
                 budget: str = "typical", **drafter_options: Any) -> None:
        from aded.backends.hf import as_runner

        self.runner = as_runner(model)
        self.model = getattr(self.runner, "model", None)  # the transformers model, if any
        self.tokenizer = tokenizer
        self.model_id = model_id
        if isinstance(drafter, str) and drafter == DEFAULT_DRAFTER:
            drafter = default_drafter(self.runner.backend)
        if isinstance(drafter, str):
            drafter = make_drafter(drafter, tokenizer, **drafter_options)
        self.drafter = drafter
        self._drafter_options = drafter_options  # for a fresh one of the same kind
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        #: t(k) the budget prices verification at (None: no budget, every drafted node verified)
        self.costs = cost_model(budget, self.runner, model_id)
        self.decoder = SpeculativeDecoder(self.runner, drafter, eos_token_ids(self.runner, tokenizer),
                                          new_budget(self.costs))
        self._grammar_tokenizer = None
        self._grammar_lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.runner.backend

    # ------------------------------------------------------------------ the drafter and what it learned
    def use_drafter(self, drafter: Drafter) -> None:
        """Draft the next requests with `drafter` (the server swaps its tenants' drafters this way)."""
        self.drafter = self.decoder.drafter = drafter

    def load_learned(self, path: str | os.PathLike) -> str:
        """Start the drafter from the learned state in `path` (what `save_learned` wrote), if the
        file exists; returns what happened, in words. A file that cannot be read is set aside
        (renamed `.corrupt-<time>`) and the drafter starts fresh; one made for another drafter or
        tokenizer raises `StateError`."""
        from aded.drafters.state_file import load_learned

        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"cannot keep learned state in {path}: its directory does not exist")
        drafter, note = load_learned(self.drafter, self._state_file(path), self.fresh_drafter)
        self.use_drafter(drafter)
        return note

    def fresh_drafter(self) -> Drafter:
        """A new drafter of the loaded kind and options, knowing nothing."""
        return make_drafter(self.drafter.name, self.tokenizer, **self._drafter_options)

    def save_learned(self, path: str | os.PathLike) -> None:
        """Write what the drafter has learned to `path`, atomically; nothing for one that never learns."""
        if isinstance(self.drafter, LearningDrafter):
            self._state_file(path).save(self.drafter.state_dict())

    def _state_file(self, path: str | os.PathLike):
        from aded.drafters.state_file import StateFile
        from aded.store.datastore import tokenizer_identity

        return StateFile(path, self.drafter.name, tokenizer_identity(self.tokenizer))

    # ------------------------------------------------------------------ prompts
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str | Messages, chat: bool | None = None, tools: Any = None,
                   tool_choice: Any = None) -> list[int]:
        """Token ids for a prompt string or a list of chat messages ({"role", "content"}, and
        OpenAI's tool calls and tool results), with `tools` rendered by the template (tools.py)."""
        use_chat = self.has_chat_template if chat is None else chat
        if isinstance(prompt, str) and not use_chat:
            if tools:
                raise ValueError("tools need the chat template (chat=True)")
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if use_chat and not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; use chat=False (--no-chat)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not use_chat:
            raise ValueError("a list of messages needs the chat template (chat=True)")
        return chat_prompt_ids(self.tokenizer, messages, tools, tool_choice)

    # ------------------------------------------------------------------ generation
    def generation_config(self, *, response_format: Any = None, tools: Any = None,
                          tool_choice: Any = None, **kwargs: Any) -> GenerationConfig:
        """The config for `Aded.stream`'s keywords; `response_format`, `tools` and `tool_choice`
        become its grammar (ValueError naming what is wrong with them)."""
        if kwargs.get("temperature") == 0:
            kwargs.update(sampling_fields(0))
        if response_format is not None or tools or tool_choice is not None:
            if kwargs.get("grammar") is not None:
                raise ValueError("give either a grammar or response_format / tools, not both")
            kwargs["grammar"] = output_grammar(self.tokenizer, lambda: self.grammar_tokenizer,
                                               response_format, tools, tool_choice)
        return GenerationConfig(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def grammar_tokenizer(self):
        """llguidance's view of the tokenizer, built on first use (about 1-3 s) and kept."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                from aded.grammar import grammar_tokenizer

                self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.runner.vocab_size)
            return self._grammar_tokenizer

    def generate(self, prompt: str | Messages | Sequence[int], *, stop: Sequence[str] = (),
                 chat: bool | None = None, **generation: Any) -> Completion:
        stream = self.stream(prompt, stop=stop, chat=chat, **generation)
        for _ in stream:
            pass
        assert stream.completion is not None  # set when the stream ends
        return stream.completion

    def stream(self, prompt: str | Messages | Sequence[int], *, stop: Sequence[str] = (),
               chat: bool | None = None, **generation: Any) -> TextStream:
        """Text pieces as steps are accepted; `.completion` holds the whole result at the end.

        `prompt` may also be token ids, used as they are (tools then already rendered in them, e.g.
        by `aded.tools.chat_prompt_ids`). With tools rendered, the completion's tool calls are parsed.
        """
        config = self.generation_config(**generation)
        tools, tool_choice = check_tools(generation.get("tools"), generation.get("tool_choice"))
        if isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], dict)):
            ids = self.prompt_ids(prompt, chat, tools, tool_choice)  # type: ignore[arg-type]  # text or messages
        else:
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]  # token ids
        declared = tuple(tools) if tools and tool_choice != "none" else None
        return TextStream(self, ids, config, tuple(s for s in stop if s), tools=declared)

    # ------------------------------------------------------------------ what a server needs to know
    @property
    def context_length(self) -> int:
        """Token positions the model holds, prompt and output together."""
        return int(self.runner.max_positions)

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores: 0 to vocab_size - 1."""
        return int(self.runner.vocab_size)

    @property
    def end_token_ids(self) -> frozenset[int]:
        """The ids that end generation unless `ignore_eos` (the model's and the tokenizer's EOS)."""
        return frozenset(self.decoder.eos_token_ids)

    def forget_cache(self) -> None:
        """Drop the prompt the runner keeps for the next request, which then computes its prompt in
        full (a server does this between clients: one's cached prompt is not another's to time)."""
        self.runner.forget()


class TextStream:
    """Text pieces of a generation as its steps commit tokens, and `.completion` at the end.

    Each token is decoded a bounded number of times, in a short window (detokenize.py), so a whole
    stream costs time linear in its length. A piece is held back while it may still change: an incomplete UTF-8
    character, or text that may begin a stop string. Pieces are the raw text, tool-call markup
    included; with `tools` (the declared tools, rendered in the prompt) the completion carries the
    parsed calls, fenced JSON calls that match a tool's schema included (`aded.tools.parse_tool_calls`).
    """

    def __init__(self, lm: Aded, prompt_ids: list[int], config: GenerationConfig,
                 stop: tuple[str, ...], tools: tuple[dict, ...] | None = None) -> None:
        self.lm = lm
        self.prompt_ids = prompt_ids
        self.stop = stop
        self.tools = tools
        self.completion: Completion | None = None
        self._detokenizer = IncrementalDetokenizer(lm.tokenizer)
        self._stops = StopFinder(stop) if stop else None
        self._num_ids = 0  # ids decoded
        self._pending = ""  # decoded text not yielded yet
        self._sent = 0  # characters yielded
        self._text_cut: int | None = None  # where the first stop string starts
        self._ids = lm.decoder.stream(prompt_ids, config, self._take)
        self._pieces: Generator[str, None, None] = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._ids.close()
        self._pieces.close()

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per token id committed so far (text may be held back longer), if asked for."""
        return self._ids.logprobs

    def _take(self, new_ids: list[int]) -> int | None:
        """The loop's per-step hook: decode the step's ids; if a stop string appeared, the number of
        ids that first contain it (those after it in the step are never decoded)."""
        for token_id in new_ids:
            self._num_ids += 1
            piece = self._detokenizer.push(token_id)
            self._pending += piece
            if self._stops is not None:  # held text counts: these ids may be the last ones
                start = self._stops.find(piece, self._detokenizer.held_text)
                if start is not None:
                    self._text_cut = start
                    return self._num_ids
        return None

    def _run(self) -> Generator[str, None, None]:
        holdback = self._stops.holdback if self._stops is not None else 0
        for _ in self._ids:  # `_take` has decoded the step's ids
            if self._text_cut is not None:  # the rest of the text may still be held
                ready = min(self._text_cut - self._sent, len(self._pending))
            else:
                ready = len(self._pending) - holdback
            if ready > 0:
                yield self._pending[:ready]
                self._pending = self._pending[ready:]
                self._sent += ready
        result = self._ids.result
        assert result is not None  # the loop sets it when it ends
        text = self.lm.tokenizer.decode(result.token_ids, skip_special_tokens=True)[: self._text_cut]
        if len(text) > self._sent:
            yield text[self._sent:]
        content, calls = text, None
        if self.tools is not None:
            content, calls = parse_tool_calls(text, self.tools)
        finish_reason = result.finish_reason
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"  # as OpenAI reports a turn that ends in calls
        self.completion = Completion(text, result.token_ids, self.prompt_ids, finish_reason,
                                     result.stats, result.logprobs, calls, content)
