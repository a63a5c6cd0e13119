"""What the handlers share: the model, its engine, the parsing threads, tenants, state and metrics.

A request's body is parsed, templated and tokenized on a parsing thread (`prepare`), never on the
event loop, so one huge body does not hold `/health` or other clients' streams; it holds one of
the engine's queue slots meanwhile (the handler admits it first). Bodies larger than `LARGE_BODY`
take their own lane of one thread: they never keep an ordinary request waiting for a thread, and
at most one of them competes with the engine for the interpreter at a time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aded.decoding import sampling_fields
from aded.tools import check_tools
from aded.server.engine import Engine, GenerationRequest, Job
from aded.server.errors import RequestError
from aded.server.logprobs import TokenTexts
from aded.server.metrics import Metrics
from aded.server.parsing import parse_body
from aded.server.prompts import PromptEncoder
from aded.server.schemas import AdedStats, ChatCompletionRequest, CompletionRequest
from aded.server.state import StateFile, StateSaver, load_learned
from aded.server.tenants import Tenants, tenant_of

__all__ = ["Service"]

log = logging.getLogger("aded.server")

_ENDPOINTS = {"chat": (ChatCompletionRequest, "messages"), "completions": (CompletionRequest, "prompt")}
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
        self.context = int(lm.runner.max_positions)
        self.token_texts = TokenTexts(lm.tokenizer)
        self.encoder = PromptEncoder(lm.tokenizer, config.parse_threads + 1, int(lm.runner.vocab_size))
        self.parsers = ThreadPoolExecutor(config.parse_threads, thread_name_prefix="aded-parse")
        self.large_parser = ThreadPoolExecutor(1, thread_name_prefix="aded-parse-large")
        self.metrics = Metrics(config.model_name, lm.drafter.name)
        self.engine = Engine(lm, config.max_queue, on_finish=self._finished, on_start=self._started)
        self._cache_owner: str | None = None  # whose prompt the runner's kept cells hold
        self.metrics.gauges["aded_queue_depth"] = lambda: self.engine.pending
        state_file = None
        self.state_note = "no state file: learned state lives in memory only"
        if config.state_path is not None:
            from aded.store.datastore import tokenizer_identity

            state_file = StateFile(config.state_path, lm.drafter.name, tokenizer_identity(lm.tokenizer))
        self.tenants = Tenants(lm, state_file, config.max_tenants)
        self.saver: StateSaver | None = None
        if state_file is not None:
            drafter, self.state_note = load_learned(lm.drafter, state_file, self.tenants.fresh)
            self.tenants.set_shared(drafter)
            log.info("%s", self.state_note)
            if drafter.learns:
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

    def stop(self) -> None:
        self.engine.stop()
        if self.saver is not None:
            self.saver.stop()
        self.tenants.activate(None)  # the model is left with the drafter it came with
        for pool in (self.parsers, self.large_parser):
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the worker's hooks
    def _started(self, job: Job) -> None:
        owner = job.request.cache_owner
        if owner != self._cache_owner:  # a client's cached prompt is not another's to time or count
            self.lm.runner.forget()
            self._cache_owner = owner
        self.tenants.activate(job.request.tenant)

    def _finished(self, job: Job, completion) -> None:
        if completion is not None:
            outcome = "finished"
        else:
            outcome = "cancelled" if job.cancelled.is_set() else "failed"
        stats = completion.stats if completion is not None else None
        self.metrics.record_generation(outcome, len(job.request.prompt_ids), stats)
        if job.started:
            self.tenants.learned(job.request.tenant)
            if self.saver is not None:
                self.saver.save_soon()

    # ------------------------------------------------------------------ request -> job
    async def prepare(self, raw: bytes, endpoint: str, api_key: str | None) -> tuple[Any, GenerationRequest]:
        """The validated request and its generation job, computed on a parsing thread."""
        pool = self.large_parser if len(raw) > LARGE_BODY else self.parsers
        return await asyncio.get_running_loop().run_in_executor(pool, self._prepare, raw, endpoint, api_key)

    def _prepare(self, raw: bytes, endpoint: str, api_key: str | None) -> tuple[Any, GenerationRequest]:
        model, param = _ENDPOINTS[endpoint]
        try:
            request = parse_body(raw, model)
            self._check_model(request.model)
            tenant = self._tenant(request, api_key)
            owner = tenant or (tenant_of("key", api_key, None) if self.config.api_keys else None)
            output = _output_fields(request)
            if endpoint == "chat":
                rendered = output.get("tools") if output.get("tool_choice") != "none" else None
                prompt_ids = self.encoder.chat_ids(request.messages, rendered)
            else:
                prompt_ids = self.encoder.text_ids(request.prompt)
            return request, self._generation(request, prompt_ids, param, tenant, owner, output)
        except RequestError:
            raise
        except Exception as exc:  # whatever a body can provoke is the body's fault, never a 500
            log.exception("a request could not be parsed")
            raise RequestError(f"the request could not be processed: {type(exc).__name__}") from exc

    def _check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise RequestError(f"the model {model!r} does not exist here; this server serves "
                               f"{self.config.model_name!r}", 404, param="model", code="model_not_found")

    def _tenant(self, request, api_key: str | None) -> str | None:
        if request.cache_salt is not None and self.config.state_per != "salt":
            raise RequestError(f"cache_salt separates learned state only on a server started with state_per "
                               f"'salt'; this one keeps it {self.config.state_per!r}", param="cache_salt",
                               code="unsupported_parameter")
        return tenant_of(self.config.state_per, api_key, request.cache_salt)

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
        vocab_size = int(self.lm.runner.vocab_size)
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
    def stats(self, completion, tenant: str | None) -> AdedStats | None:
        """The `aded` extension field, or None where it would tell one client about another's
        requests: by default off when API keys are set and the learned state is shared."""
        show = self.config.aded_stats
        if show is None:
            show = not (self.config.api_keys and tenant is None)
        if not show:
            return None
        s = completion.stats
        return AdedStats(mean_accepted_tokens=round(s.mean_accepted_tokens, 4), steps=s.steps,
                         draft_nodes=s.draft_nodes, decode_tokens_per_s=round(s.decode_tokens_per_s, 3),
                         drafter=self.lm.drafter.name)


def _output_fields(request) -> dict[str, Any]:
    """`response_format`, `tools` and `tool_choice` as `Aded.stream` keywords (the library's
    OpenAI shapes), checked by `aded.tools.check_tools`; absent ones are left out."""
    out: dict[str, Any] = {}
    if request.response_format is not None:
        out["response_format"] = request.response_format.model_dump(exclude_none=True)
    tools = getattr(request, "tools", None)
    choice = getattr(request, "tool_choice", None)
    if tools is None and choice is None:
        return out
    tools = [tool.model_dump(exclude_none=True) for tool in tools or ()]
    if not isinstance(choice, (str, type(None))):
        choice = choice.model_dump()
    try:
        tools, choice = check_tools(tools, choice)
    except ValueError as exc:
        raise RequestError(str(exc), param=_blamed(str(exc), {"tools": tools})) from exc
    out.update({"tools": tools, "tool_choice": choice} if tools else {"tool_choice": choice} if choice else {})
    return out


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
