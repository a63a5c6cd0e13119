"""What the handlers share: the model, its engine, the parsing threads, tenants, state and metrics.

A request's body is parsed, templated and tokenized on a parsing thread (`prepare`), never on the
event loop, so one huge body does not hold `/health` or other clients' streams; it holds one of
the engine's queue slots meanwhile (the handler admits it once the body is in). Bodies larger than
`LARGE_BODY` take their own lane of one thread: they never keep an ordinary request waiting for a
thread, and at most one of them competes with the engine for the interpreter at a time.

With API keys, what the server tells a key (`health`, `metrics_text`, the `aded` field through
`stats`, `cached_tokens`) is that key's own, and how its requests drafted only where its learned
state is its own (metrics.py says why). The model is reached through the `Aded` facade only
(`context_length`, `vocab_size`, `end_token_ids`, `forget_cache`, `stream`, ...).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from aded.decoding import sampling_fields
from aded.drafters.base import LearningDrafter
from aded.server.engine import Engine, GenerationRequest, Job
from aded.server.errors import RequestError
from aded.server.logprobs import TokenTexts
from aded.server.metrics import Metrics
from aded.server.output import OutputRules
from aded.server.parsing import decode_body, parse_body, parse_json_object
from aded.server.prompts import PromptEncoder
from aded.server.schemas import (
    AdedStats,
    ChatCompletionRequest,
    ChatTokenizeRequest,
    CompletionRequest,
    DetokenizeRequest,
    FieldError,
    TextTokenizeRequest,
)
from aded.server.state import ModelStateFile, StateError, StateSaver, load_learned, model_mismatch
from aded.server.tenants import Tenants, tenant_of
from aded.tools import check_tools

__all__ = ["Service"]

log = logging.getLogger("aded.server")

_ENDPOINTS: dict[str, tuple[type[BaseModel], str]] = {"chat": (ChatCompletionRequest, "messages"),
                                                      "completions": (CompletionRequest, "prompt")}
_TOKENIZE: dict[str, type[BaseModel]] = {"messages": ChatTokenizeRequest, "prompt": TextTokenizeRequest}
_PROCESSING = ("logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
               "stop_token_ids", "ignore_eos", "min_tokens", "top_logprobs", "logprobs")
LARGE_BODY = 64 * 1024  # bytes: a body this big is parsed in the lane of large bodies


class Service:
    """Built from a loaded model and a resolved `ServerConfig`; loads the learned state at once
    (a state file of another model raises `StateError` before the port is bound)."""

    def __init__(self, lm, config) -> None:
        self.lm = lm
        self.config = config
        self.created = int(time.time())
        self.context = lm.context_length
        self.token_texts = TokenTexts(lm.tokenizer)
        self.encoder = PromptEncoder(lm.tokenizer, config.parse_threads + 1, lm.vocab_size)
        self.parsers = ThreadPoolExecutor(config.parse_threads, thread_name_prefix="aded-parse")
        self.large_parser = ThreadPoolExecutor(1, thread_name_prefix="aded-parse-large")
        self.metrics = Metrics(config.model_name, lm.drafter.name)  # the whole server's
        self._client_metrics: dict[str, Metrics] = {}  # each API key's own (see metrics.py)
        #: the prompt cache may pass from one client to another: `cached_tokens` would tell them apart
        self._owners_apart = len(set(config.api_keys) | set(config.admin_keys)) > 1 or config.state_per == "salt"
        self.engine = Engine(lm, config.max_queue, on_finish=self._finished, on_start=self._started)
        self._cache_owner: str | None = None  # whose prompt the runner's kept cells hold
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.metrics.gauges["aded_queue_depth"] = lambda: self.engine.pending
        state_file = None
        self.state_note = "no state file: learned state lives in memory only"
        if config.state_path is not None:
            from aded.store.datastore import tokenizer_identity

            state_file = ModelStateFile(config.state_path, lm.drafter.name, tokenizer_identity(lm.tokenizer),
                                        lm.model_id)
        self.tenants = Tenants(lm, state_file, config.max_tenants)
        self.saver: StateSaver | None = None
        if state_file is not None:
            try:
                drafter, self.state_note = load_learned(lm.drafter, state_file, self.tenants.fresh)
            except StateError as exc:  # said in models, not tokenizer hashes
                raise model_mismatch(state_file, lm.model_id, exc) from None
            self.tenants.set_shared(drafter)
            log.info("%s", self.state_note)
            if isinstance(drafter, LearningDrafter):
                self.saver = StateSaver(self.engine, self.tenants.export, config.save_interval, self.metrics)
                self.tenants.on_drop = self.saver.write_now

    def start(self) -> None:
        # What is loaded by now (model, tokenizer, libraries) lives as long as the server: frozen out
        # of the cyclic collector, whose full passes over it would stop every thread for 100+ ms
        # whenever a big body's parsing allocates many objects.
        gc.collect()
        gc.freeze()
        self.engine.start()
        if self.saver is not None:
            self.saver.start()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the handlers run on (`begin_shutdown` is scheduled on it)."""
        self.loop = loop
        self.stopping = asyncio.Event()  # set when the server begins to shut down

    def begin_shutdown(self) -> None:
        """On the event loop, at SIGTERM: refuse new requests, end the running one and the queued
        ones with a 503, and let bodies still being read go (`read_body` watches `stopping`)."""
        if self.stopping is not None:
            self.stopping.set()
        self.engine.begin_stop()

    def stop(self) -> None:
        """Stop the worker (a few seconds at most) and save what was learned."""
        if not self.engine.stop():
            log.warning("the worker is still busy (a long prompt's prefill); saving what was learned "
                        "before that request and exiting")
        if self.saver is not None:
            self.saver.stop()
        if self.engine.idle:
            self.tenants.activate(None)  # the model is left with the drafter it came with
        for pool in (self.parsers, self.large_parser):
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the worker's hooks
    def _started(self, job: Job) -> None:
        owner = job.request.cache_owner
        if owner != self._cache_owner:  # a client's cached prompt is not another's to time or count
            self.lm.forget_cache()
            self._cache_owner = owner
        self.tenants.activate(job.request.tenant)

    def _finished(self, job: Job, completion) -> None:
        if completion is not None:
            outcome = "finished"
        else:
            outcome = "cancelled" if job.cancelled.is_set() else "failed"
        stats = completion.stats if completion is not None else None
        prompt_tokens = len(job.request.prompt_ids)
        self.metrics.record_generation(outcome, prompt_tokens, stats)
        if job.request.client is not None:
            cached = self.cached_tokens(completion, job.request) if completion is not None else None
            self._metrics_of(job.request.client).record_generation(
                outcome, prompt_tokens, stats, private=self._private(job.request), cached_tokens=cached)
        if job.started:
            self.tenants.learned(job.request.tenant)
            if self.saver is not None:
                self.saver.save_soon()

    # ------------------------------------------------------------------ request -> job
    async def prepare(self, raw: bytes, endpoint: str, api_key: str | None,
                      charset: str | None = None) -> tuple[Any, GenerationRequest]:
        """The validated request and its generation job, computed on a parsing thread."""
        return await self._on_parser(raw, self._prepare, raw, endpoint, api_key, charset)

    async def _on_parser(self, raw: bytes, func, *args):
        pool = self.large_parser if len(raw) > LARGE_BODY else self.parsers
        return await asyncio.get_running_loop().run_in_executor(pool, _as_request_error, func, *args)

    def _prepare(self, raw: bytes, endpoint: str, api_key: str | None,
                 charset: str | None) -> tuple[Any, GenerationRequest]:
        model, param = _ENDPOINTS[endpoint]
        request: Any = parse_body(decode_body(raw, charset), model)
        self._check_model(request.model)
        tenant = self._tenant(request, api_key)
        client = _client_of(api_key)
        owner = tenant or client
        output = _output_fields(request)
        rendered = output.get("tools") if output.get("tool_choice") != "none" else None
        if endpoint == "chat":
            prompt_ids = self.encoder.chat_ids(request.messages, rendered, request.chat_template_kwargs)
        else:
            prompt_ids = self.encoder.text_ids(request.prompt)
        generation = self._generation(request, prompt_ids, param, tenant, owner, output)
        return request, replace(generation, n=request.n, output=self._rules(request, generation, rendered),
                                client=client)

    def _rules(self, request, generation: GenerationRequest, tools: list[dict] | None) -> OutputRules:
        """The request's output fields (aded.server.output)."""
        stop_ids = tuple(request.stop_token_ids or ())
        ends = frozenset(stop_ids) | (frozenset() if request.ignore_eos else self.lm.end_token_ids)
        return OutputRules(skip_special_tokens=request.skip_special_tokens,
                           include_stop_str=request.include_stop_str_in_output, end_ids=ends,
                           stop_token_ids=stop_ids, stops=generation.stop,
                           tools=None if tools is None else tuple(tools),
                           parallel_tool_calls=getattr(request, "parallel_tool_calls", None) is not False,
                           logprobs_wanted=request.num_top_logprobs() is not None)

    # ------------------------------------------------------------------ /tokenize and /detokenize
    async def tokenize(self, raw: bytes, charset: str | None = None) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt, or chat messages through the template, as token ids."""
        return await self._on_parser(raw, self._tokenize, raw, charset)

    def _tokenize(self, raw: bytes, charset: str | None) -> dict[str, Any]:
        body = parse_json_object(decode_body(raw, charset), "")
        kinds = [name for name in _TOKENIZE if name in body]
        if len(kinds) != 1:
            raise RequestError("give a prompt or chat messages to tokenize (one of them)", param="prompt")
        request: Any = parse_body(body, _TOKENIZE[kinds[0]])
        if request.model is not None:
            self._check_model(request.model)
        if kinds[0] == "messages":
            tools, choice = request.tool_fields()
            tools, choice = _checked_tools(tools, choice)
            ids = self.encoder.chat_ids(request.messages, tools if choice != "none" else None,
                                        request.chat_template_kwargs, request.add_generation_prompt)
        else:
            ids = self.encoder.text_ids(request.prompt, request.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.context, "tokens": ids}
        out["token_strs"] = [self.token_texts.text(t) for t in ids] if request.return_token_strs else None
        return out

    async def detokenize(self, raw: bytes, charset: str | None = None) -> dict[str, Any]:
        """vLLM's /detokenize: token ids as text (special tokens written out)."""
        return await self._on_parser(raw, self._detokenize, raw, charset)

    def _detokenize(self, raw: bytes, charset: str | None) -> dict[str, Any]:
        request = parse_body(decode_body(raw, charset), DetokenizeRequest)
        if request.model is not None:
            self._check_model(request.model)
        return {"prompt": self.encoder.text_of(request.tokens)}

    def _check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise RequestError(f"the model {model!r} does not exist here; this server serves "
                               f"{self.config.model_name!r}", 404, param="model", code="model_not_found")

    def _tenant(self, request, api_key: str | None) -> str | None:
        """Whose learned state drafts the request. `prompt_cache_key` (OpenAI's) is the salt where
        state is kept per salt (a `cache_salt` given too wins); elsewhere it changes nothing."""
        if request.cache_salt is not None and self.config.state_per != "salt":
            raise RequestError(f"cache_salt separates learned state only on a server started with state_per "
                               f"'salt'; this one keeps it {self.config.state_per!r}", param="cache_salt",
                               code="unsupported_parameter")
        salt = request.cache_salt or request.prompt_cache_key
        return tenant_of(self.config.state_per, api_key, salt)

    def _generation(self, request, prompt_ids: list[int], param: str, tenant: str | None, owner: str | None,
                    output: dict[str, Any]) -> GenerationRequest:
        """Sampling parameters checked against the context, as `Aded.stream` keyword arguments;
        `output`: the structured-output fields (`_output_fields`), whose grammar is built here, on
        the parsing thread, as a check (so llguidance's tokenizer view is built on first use here)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty after tokenisation", param=param)
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context holds "
                               f"{self.context} (and at least one token must be generated)",
                               param=param, code="context_length_exceeded")
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestError(f"max_tokens is {request.max_tokens}, but the prompt's {len(prompt_ids)} tokens "
                               f"leave room for {room} in this model's context of {self.context}",
                               param="max_tokens", code="context_length_exceeded")
        max_tokens = request.max_tokens or min(self.config.default_max_tokens, room)
        temperature = 1.0 if request.temperature is None else request.temperature
        generation = {"max_new_tokens": max_tokens, **sampling_fields(temperature),
                      "top_p": request.top_p, "top_k": request.top_k,
                      "seed": request.seed, "max_draft_nodes": self.config.max_draft_nodes,
                      **self._processing(request), **output}
        try:
            self.lm.generation_config(**dict(generation))  # validates the combination
        except ValueError as exc:
            blamed = _blamed(str(exc), output)
            message = str(exc) if blamed is None or str(exc).startswith(blamed) else f"{blamed}: {exc}"
            raise RequestError(message, param=blamed) from exc
        return GenerationRequest(prompt_ids, generation, tuple(request.stop_list()), request.stream, tenant, owner)

    def _processing(self, request) -> dict[str, Any]:
        """The fields processors.py honours, as `GenerationConfig` keywords (None: left out);
        token ids outside this model's vocabulary are refused here, naming the field."""
        vocab_size = self.lm.vocab_size
        bias = {int(key): value for key, value in (request.logit_bias or {}).items()}
        for name, ids in (("logit_bias", bias), ("stop_token_ids", request.stop_token_ids or ())):
            outside = next((t for t in ids if t >= vocab_size), None)
            if outside is not None:
                raise RequestError(f"{name} holds token id {outside}, outside this model's vocabulary "
                                   f"(ids 0 to {vocab_size - 1})", param=name)
        top = request.num_top_logprobs()
        return {"logit_bias": bias or None, "presence_penalty": request.presence_penalty,
                "frequency_penalty": request.frequency_penalty, "repetition_penalty": request.repetition_penalty,
                "min_p": request.min_p, "stop_token_ids": request.stop_token_ids, "ignore_eos": request.ignore_eos,
                "min_tokens": request.min_tokens, "logprobs": top is not None or None, "top_logprobs": top or None}

    # ------------------------------------------------------------------ responses
    def check_model(self, model: str) -> None:
        self._check_model(model)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "aded",
                "max_model_len": self.context}

    def health(self, api_key: str | None, authenticated: bool) -> dict[str, Any]:
        """Liveness for probes; with keys set, what the server did only for a key holder, and for
        a key that is no admin's only its own share (its requests, its drafting)."""
        keyed = bool(self.config.api_keys or self.config.admin_keys)
        if keyed and not authenticated:
            return {"status": "ok"}
        out = {"status": "ok", "model": self.config.model_name, "backend": self.lm.backend,
               "drafter": self.lm.drafter.name, "state_per": self.config.state_per, "queue": self.engine.pending}
        if keyed and not self.is_admin(api_key):
            mine = self._metrics_of(_client_of(api_key) or "")
            return {**out, "completed": mine.finished, "mean_accepted_tokens": round(mine.mean_accepted_tokens(), 4)}
        return {**out, "completed": self.engine.completed,
                "mean_accepted_tokens": round(self.metrics.mean_accepted_tokens(), 4),
                "state": self.state_note, "tenants": self.tenants.count}

    def is_admin(self, api_key: str | None) -> bool:
        """Does `api_key` read the whole server's figures? (Anyone does on a server without keys.)"""
        if not (self.config.api_keys or self.config.admin_keys):
            return True
        return api_key is not None and api_key in self.config.admin_keys

    def metrics_text(self, api_key: str | None) -> str:
        """The whole server's metrics for an admin (or anyone without keys), else the key's own."""
        if self.is_admin(api_key):
            return self.metrics.render()
        return self._metrics_of(_client_of(api_key) or "").render()

    def record_http(self, api_key: str | None, endpoint: str, status: int, seconds: float) -> None:
        self.metrics.record_http(endpoint, status, seconds)
        client = _client_of(api_key)
        if client is not None:
            self._metrics_of(client).record_http(endpoint, status, seconds)

    def _metrics_of(self, client: str) -> Metrics:
        """The metrics of one client (an API key's hash), made on first use (keys are configured,
        so there are few)."""
        metrics = self._client_metrics.get(client)
        if metrics is None:
            metrics = self._client_metrics.setdefault(client, Metrics(self.config.model_name, self.lm.drafter.name))
            metrics.gauges["aded_queue_depth"] = lambda: self.engine.pending
        return metrics

    def cached_tokens(self, completion, generation: GenerationRequest) -> int:
        """`usage.prompt_tokens_details.cached_tokens` of a request: the prompt tokens kept from the
        previous request. Where the prompt cache passes between clients (several keys, or tenants
        per salt) it is forgotten when another client's request runs, so the count would tell a
        client that someone else ran in between: there it is 0, always."""
        if self._owners_apart and generation.cache_owner is not None:
            return 0
        return completion.stats.cached_prompt_tokens

    def _private(self, generation: GenerationRequest) -> bool:
        """May the client see how its request was drafted? Not where API keys are set and its
        learned state is shared (how well it drafted tells what others' outputs taught the
        drafter), unless the operator turned the `aded` statistics on."""
        if self.config.aded_stats is not None:
            return self.config.aded_stats
        return not ((self.config.api_keys or self.config.admin_keys) and generation.tenant is None)

    def stats(self, completions, generation: GenerationRequest) -> AdedStats | None:
        """The `aded` extension field of `completions` (one request's choices, together), or None
        where it would tell one client about another's requests: by default off when API keys are
        set and the learned state is shared."""
        if not self._private(generation):
            return None
        steps = sum(c.stats.steps for c in completions)
        accepted = sum(sum(c.stats.accepted_lengths) for c in completions)
        decoded = sum(max(0, c.stats.generated_tokens - 1) for c in completions)
        seconds = sum(c.stats.decode_s for c in completions)
        return AdedStats(mean_accepted_tokens=round(accepted / steps if steps else 0.0, 4), steps=steps,
                         draft_nodes=sum(c.stats.draft_nodes for c in completions),
                         decode_tokens_per_s=round(decoded / seconds if seconds > 0 else 0.0, 3),
                         drafter=self.lm.drafter.name)


def _output_fields(request) -> dict[str, Any]:
    """`response_format`, `tools` and `tool_choice` as `Aded.stream` keywords (the library's
    OpenAI shapes), checked by `aded.tools.check_tools`; absent ones are left out."""
    out: dict[str, Any] = {}
    try:
        response_format = request.output_format()
    except FieldError as exc:
        raise RequestError(str(exc), param=exc.param) from exc
    if response_format is not None:
        out["response_format"] = response_format
    tools, choice = request.tool_fields() if hasattr(request, "tool_fields") else (None, None)
    if tools is None and choice is None:
        return out
    tools, choice = _checked_tools(tools or [], choice)
    out.update({"tools": tools, "tool_choice": choice} if tools else {"tool_choice": choice} if choice else {})
    return out


def _client_of(api_key: str | None) -> str | None:
    """Who sent a request, by its API key's hash (None without keys)."""
    return tenant_of("key", api_key, None)


def _checked_tools(tools, choice):
    """`aded.tools.check_tools`, its ValueError a 400 naming the field."""
    try:
        return check_tools(tools, choice)
    except ValueError as exc:
        raise RequestError(str(exc), param=_blamed(str(exc), {"tools": tools})) from exc


def _as_request_error(func, *args):
    """`func(*args)` on a parsing thread: whatever a body can provoke is the body's fault, never a 500."""
    try:
        return func(*args)
    except RequestError:
        raise
    except Exception as exc:
        log.exception("a request could not be parsed")
        raise RequestError(f"the request could not be processed: {type(exc).__name__}") from exc


def _blamed(message: str, output: dict[str, Any]) -> str | None:
    """The request field a library ValueError is about, from how its message begins."""
    for name in (*_PROCESSING, "response_format", "tool_choice", "tools", "messages"):
        if message.startswith(name):
            return name
    if message.startswith("the tool call grammar"):
        return "tools"
    if "tool_choice" in message:
        return "tool_choice"
    return next((name for name in ("response_format", "tools") if output.get(name) is not None), None)
