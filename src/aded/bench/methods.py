"""The methods a benchmark compares, behind one call: `run(prompt_ids, baseline_ids) -> TurnResult`.

- `hf`, `hf-pld` (HF backend): transformers' own `model.generate` (greedy or sampled; `hf-pld` adds
  prompt lookup with `prompt_lookup_num_tokens=10`), every field that shapes the output set
  explicitly, so neither the model's generation_config nor transformers' defaults (top_k=50) leak in. Their prefill is the time to the first
  generated token, read from a streamer inside the same `generate` call, so nothing is subtracted
  or timed twice.
- `llama.cpp`, `llama.cpp-pld` (llama.cpp backend): llama-cpp-python's `Llama(model_path=...)`
  `generate` on the same file with the same context size and threads, plain or with its own prompt
  lookup (`LlamaPromptLookupDecoding(num_pred_tokens=10)`), as users run them.
- every aded drafter by name, through `SpeculativeDecoder` with a fresh drafter and budget policy
  per method (learning drafters keep learning across questions, as in a server) and one shared
  verification cost model.
- `oracle`: drafts the baseline's own output as a chain; the ceiling of any drafter with this tree
  budget on this machine.

A method that cannot be built here (a missing optional package, a datastore that cannot be made) is
returned as skipped with the reason instead of failing the run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from aded.backends.tokens import common_prefix, eos_token_ids
from aded.budget import Budget, CostAwareBudget
from aded.decoding import sampling_fields
from aded.drafters import DRAFTERS
from aded.drafters.base import Drafter, LearningDrafter
from aded.drafters.oracle import OracleDrafter

__all__ = ["DecodeSettings", "TurnResult", "Method", "HFGenerate", "hf_generation_config", "LlamaCppGenerate", "AdedMethod",
           "SettingsMethod", "method_names", "baseline_of", "PEERS"]

#: per backend, its plain decoding (the baseline, first) and its own prompt lookup
PEERS = {"hf": ("hf", "hf-pld"), "llama.cpp": ("llama.cpp", "llama.cpp-pld")}


def baseline_of(backend: str) -> str:
    return PEERS[backend][0]


def method_names(backend: str = "hf") -> list[str]:
    """The methods `aded bench` runs by default (`all`) on a backend, its baseline first."""
    return [*PEERS[backend], *DRAFTERS, "oracle"]


@dataclass
class TurnResult:
    """One generation (one turn of one question) by one method."""

    output_ids: list[int]
    prefill_s: float  # prompt forward until the first generated token(s) are known
    decode_s: float  # everything after that: drafting, verifying, bookkeeping
    step_lengths: list[int]  # tokens emitted per decoding step after the first token(s)
    first_tokens: int = 1  # tokens known when prefill ends (hf-pld's first step may emit several)
    draft_s: float = 0.0
    draft_nodes: int = 0
    cached_tokens: int = 0  # prompt tokens kept from the session's previous turn (not prefilled)

    @property
    def tokens(self) -> int:
        return len(self.output_ids)

    @property
    def decode_tokens(self) -> int:
        return sum(self.step_lengths)

    @property
    def steps(self) -> int:
        return len(self.step_lengths)


class Method(ABC):
    name: str = "method"

    @abstractmethod
    def run(self, prompt_ids: list[int], baseline_ids: list[int] | None) -> TurnResult:
        """Generate for `prompt_ids`; `baseline_ids` is the baseline's output for the same prompt."""

    def warm_up(self, prompt_ids: list[int]) -> None:  # noqa: B027
        """Run each code path once (a short generation) so first-call costs land in no timing."""

    def resume(self, held: Sequence[int]) -> None:  # noqa: B027
        """Start the next run from a prompt cache holding at most the prefix it shares with `held`
        (what plain decoding left cached after the session's previous turn; empty: a new session)."""

    def snapshot(self) -> Any:
        """What the method has learned so far (None: nothing), for `restore` before a repeated run."""
        return None

    def restore(self, snapshot: Any) -> None:  # noqa: B027
        """Forget what was learned since `snapshot`: a repeated turn must not draft from its own
        earlier answer."""


@dataclass(frozen=True)
class DecodeSettings:
    """What every method shares about decoding: the same length limit, stop tokens and sampling."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    max_draft_nodes: int = 24

    @classmethod
    def for_model(cls, runner, tokenizer, max_new_tokens: int, **fields) -> DecodeSettings:
        """Settings with the model's stop tokens (as `aded.load` finds them) and a pad id, so the
        benchmark and `aded demo` build their methods alike."""
        eos = tuple(eos_token_ids(runner, tokenizer))
        pad = tokenizer.pad_token_id
        pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
        return cls(max_new_tokens, eos, pad_id, **fields)

    @property
    def greedy(self) -> bool:
        return not sampling_fields(self.temperature)["do_sample"]


class _TimingStreamer:
    """A transformers streamer that timestamps each `put`: the first is the prompt, the second the
    first generated token(s) (end of prefill), each later one a decoding step."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_at: float | None = None
        self.first_tokens = 0
        self.step_lengths: list[int] = []

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        count = int(value.numel())
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.first_tokens = count
        else:
            self.step_lengths.append(count)

    def end(self) -> None:
        pass


class SettingsMethod(Method):
    """A method that runs with `settings` alone: its warm-up is a short run of them."""

    settings: DecodeSettings

    def warm_up(self, prompt_ids: list[int]) -> None:
        saved = self.settings
        self.settings = replace(saved, max_new_tokens=min(8, saved.max_new_tokens))
        try:
            self.run(prompt_ids, None)
        finally:
            self.settings = saved


class LlamaCppGenerate(SettingsMethod):
    """llama-cpp-python's high-level `Llama.generate` as users call it, on the runner's file with
    its context size, threads and weight layout; a session's turn keeps the prefix its prompt
    shares with the cache (`generate`'s own prefix match), which `resume` sets to what the previous
    turn left, as for aded's runner. Steps are counted as `llama_decode` calls (`eval`)."""

    def __init__(self, name: str, runner, settings: DecodeSettings, prompt_lookup: int | None = None) -> None:
        self.name = name
        self.settings = settings
        self.llm = runner.plain_decoder(prompt_lookup, settings.seed)
        self._evals: list[int] = []
        self._produced = 0
        self._kept = 0  # prompt tokens the run's `generate` kept cached (its first eval starts there)
        plain_eval = self.llm.eval

        def counted_eval(tokens):
            if not self._evals:
                self._kept = self.llm.n_tokens
            self._evals.append(self._produced)
            return plain_eval(tokens)

        self.llm.eval = counted_eval

    def resume(self, held: Sequence[int]) -> None:
        cached = self.llm._input_ids  # what its cells hold; `generate` matches prompts against it
        self.llm.n_tokens = common_prefix(cached.tolist(), held)

    def run(self, prompt_ids: list[int], baseline_ids: list[int] | None) -> TurnResult:
        s = self.settings
        greedy = s.greedy
        eos = set(s.eos_token_ids)
        self._evals.clear()
        self._produced = 0
        output: list[int] = []
        start = time.perf_counter()
        first_at = None
        tokens = self.llm.generate(prompt_ids, temp=0.0 if greedy else s.temperature,
                                   top_k=0 if greedy else s.top_k, top_p=1.0 if greedy else s.top_p,
                                   min_p=0.0, typical_p=1.0, repeat_penalty=1.0, reset=True)  # keeps the shared prefix
        try:
            for token in tokens:
                if first_at is None:
                    first_at = time.perf_counter()
                output.append(int(token))
                self._produced = len(output)
                if token in eos or len(output) >= s.max_new_tokens:
                    break
        finally:
            tokens.close()
        end = time.perf_counter()
        # evals after the prompt's: each is one decoding step, emitting what came before the next
        marks = self._evals[1:] + [len(output)]
        steps = [b - a for a, b in zip(marks, marks[1:]) if b > a]
        first_at = first_at if first_at is not None else end
        return TurnResult(output, first_at - start, end - first_at, steps, 1 if output else 0,
                          cached_tokens=self._kept)


def hf_generation_config(settings: DecodeSettings, prompt_lookup: int | None = None):
    """transformers' `GenerationConfig` for `settings`, naming the fields that shape the output.

    transformers 5 fills the fields a passed config leaves unset from the model's generation_config
    (e.g. Qwen's repetition_penalty 1.05, top_k 20), then from its own defaults (top_k 50); either
    would make the baseline decode something other than aded. So the penalties, n-gram bans and
    minimum length are named off, and a sampled run names every warper too, with aded's meaning
    (top_k 0 = off). Fields whose only "off" is unset (forced or banned tokens) cannot be named;
    causal chat models do not set them.
    """
    from transformers import GenerationConfig

    fields: dict[str, Any] = {**sampling_fields(settings.temperature), "num_beams": 1,
                              "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
    if not settings.greedy:  # warpers: transformers warns when they are named for greedy decoding
        fields.update(top_k=settings.top_k, top_p=settings.top_p, min_p=0.0, typical_p=1.0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0)
    if prompt_lookup:
        fields["prompt_lookup_num_tokens"] = prompt_lookup
    return GenerationConfig(max_new_tokens=settings.max_new_tokens,
                            eos_token_id=list(settings.eos_token_ids) or None,
                            pad_token_id=settings.pad_token_id, **fields)


class HFGenerate(Method):
    """transformers' `generate` as users call it, with `hf_generation_config`: no model defaults
    (such as repetition penalties, which would make greedy outputs incomparable)."""

    def __init__(self, name: str, runner, settings: DecodeSettings, prompt_lookup: int | None = None) -> None:
        self.name = name
        self.model = runner.plain_decoder(prompt_lookup, settings.seed)
        self.settings = settings
        self.config = hf_generation_config(settings, prompt_lookup)

    def warm_up(self, prompt_ids: list[int]) -> None:
        saved = self.config.max_new_tokens
        self.config.max_new_tokens = min(8, saved)
        try:
            self.run(prompt_ids, None)
        finally:
            self.config.max_new_tokens = saved

    def run(self, prompt_ids: list[int], baseline_ids: list[int] | None) -> TurnResult:
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)  # [1, n]
        streamer = _TimingStreamer()
        if self.config.do_sample:
            torch.manual_seed(self.settings.seed)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.config, streamer=streamer)
            end = time.perf_counter()
        output = out[0, len(prompt_ids):].tolist()
        first_at = streamer.first_at if streamer.first_at is not None else end
        return TurnResult(output, first_at - start, end - first_at, streamer.step_lengths,
                          streamer.first_tokens)


class AdedMethod(Method):
    """One aded drafter on the shared runner, with its own budget policy over the shared costs."""

    def __init__(self, name: str, runner, drafter: Drafter, settings: DecodeSettings, budget: Budget | None) -> None:
        from aded.decoding import GenerationConfig, SpeculativeDecoder

        self.name = name
        self.drafter = drafter
        self.runner = runner
        self.budget = budget if budget is not None else CostAwareBudget()
        self.decoder = SpeculativeDecoder(runner, drafter, settings.eos_token_ids, self.budget)
        self.config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            **sampling_fields(settings.temperature),
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            max_draft_nodes=settings.max_draft_nodes,
        )

    def snapshot(self) -> Any:
        state = self.drafter.state_dict() if isinstance(self.drafter, LearningDrafter) else None
        state = None if state is None else {k: np.array(v, copy=True) for k, v in state.items()}
        return state, self.budget.snapshot()

    def restore(self, snapshot: Any) -> None:
        state, budget = snapshot
        if state is not None and isinstance(self.drafter, LearningDrafter):  # as `snapshot` took it
            self.drafter.load_state_dict(state)
        self.budget.restore(budget)

    def resume(self, held: Sequence[int]) -> None:
        self.runner.forget(held)  # the methods share one runner: each starts as plain decoding left it

    def run(self, prompt_ids: list[int], baseline_ids: list[int] | None) -> TurnResult:
        if isinstance(self.drafter, OracleDrafter):
            self.drafter.expect(baseline_ids or [])
        result = self.decoder.generate(prompt_ids, self.config)
        stats = result.stats
        return TurnResult(list(result.token_ids), stats.prefill_s, stats.decode_s,
                          list(stats.accepted_lengths), 1 if result.token_ids else 0,
                          stats.draft_s, stats.draft_nodes, stats.cached_prompt_tokens)
