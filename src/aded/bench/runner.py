"""The benchmark loop: every method on every question, fairly, in one process.

Fairness, as the field expects it:
- one loaded model shared by all methods, the same prompt token ids, threads and dtype;
- a warm-up of every code path (transformers' generate, prompt lookup, the tree verifier) first;
- methods interleaved per turn (the baseline first, the others in an order rotated per question),
  so a slow moment of the machine hits all methods alike;
- with `repeats` R > 1, each turn runs R times per method (the others' order rotated again each
  time), and rates are over all R: per-question timings on a small CPU spread by +-5-8%, so a
  category of one or two questions needs repeats before a few percent mean anything. Learning
  drafters and their budgets start every repeat from what they knew before the turn's first run,
  so no repeat drafts from its own earlier answer;
- decode time measured after the first token, prefill reported separately; drafting included;
- multi-turn questions are sessions: they feed the baseline's answer back through the chat
  template, so every method sees the same prompt ids at every turn, and every method's turn starts
  from the prompt cache plain decoding left after the previous turn (the session's first turn, and
  every question, from an empty one), so both engines keep the shared prefix as their front ends do
  and a method never starts from another's run of the same turn;
- greedy outputs compared token by token with the baseline.

The loop knows nothing of files: `run_bench` returns the results dict and `report` writes it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from aded.backends.base import physical_cores
from aded.backends.tokens import common_prefix
from aded.bench.catalog import MethodSet, build_methods
from aded.bench.methods import DecodeSettings, Method, TurnResult, baseline_of
from aded.bench.questions import Question
from aded.budget import BUDGETS, cost_model, new_budget
from aded.decoding import sampling_fields

__all__ = ["BenchConfig", "run_bench", "machine_info", "physical_cores"]


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (outputs comparable token by token)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_draft_nodes: int = 24
    budget: str = "measured"  # measured (cached t(k)), fresh (t(k) timed now), typical or off
    warmup: bool = True
    repeats: int = 1  # runs of every turn per method; rates are over all of them

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        sampling_fields(self.temperature)  # the one place that checks it
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")


# ---------------------------------------------------------------------------- machine and prompts
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(runner) -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_name(),
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **runner.describe(),
    }


class PromptBuilder:
    """Token ids of a conversation: through the chat template when the tokenizer has one, else the
    turns and answers joined by blank lines (base models)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            return [int(t) for t in ids]
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def answer(self, output_ids: list[int]) -> str:
        return self.tokenizer.decode(output_ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------- rows
class _Row:
    """One question x one method, filled turn by turn."""

    def __init__(self, question: Question, method: str, keep_ids: bool) -> None:
        self.question = question
        self.method = method
        self.keep_ids = keep_ids
        self.turns: list[dict[str, Any]] = []
        self.prompts: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.lengths: dict[int, int] = {}
        self.matched = 0
        self.compared = 0
        self.identical: bool | None = True

    def add(self, result: TurnResult, prompt_ids: list[int], baseline: list[int] | None,
            greedy: bool, repeat: int = 0, turn: int = 0) -> None:
        identical = None
        if greedy and baseline is not None:
            identical = result.output_ids == baseline
            self.matched += common_prefix(result.output_ids, baseline)
            self.compared += max(len(result.output_ids), len(baseline))
        if identical is None or self.identical is None:
            self.identical = None
        else:
            self.identical = self.identical and identical
        for length in result.step_lengths:
            self.lengths[length] = self.lengths.get(length, 0) + 1
        self.turns.append({
            "tokens": result.tokens, "decode_tokens": result.decode_tokens, "steps": result.steps,
            "decode_s": round(result.decode_s, 6), "prefill_s": round(result.prefill_s, 6),
            "draft_s": round(result.draft_s, 6), "draft_nodes": result.draft_nodes,
            "turn": turn, "prompt_tokens": len(prompt_ids), "cached_tokens": result.cached_tokens,
            "identical_to_baseline": identical, "repeat": repeat,
        })
        if self.keep_ids and repeat == 0:  # one recording per turn (replay reads them)
            self.prompts.append(list(prompt_ids))
            self.outputs.append(list(result.output_ids))

    def as_dict(self) -> dict[str, Any]:
        total = {k: sum(t[k] for t in self.turns) for k in
                 ("tokens", "decode_tokens", "steps", "decode_s", "prefill_s", "draft_s", "draft_nodes")}
        row = {
            "id": self.question.id, "source": self.question.source, "category": self.question.category,
            "method": self.method, **total,
            "decode_s": round(total["decode_s"], 6), "prefill_s": round(total["prefill_s"], 6),
            "draft_s": round(total["draft_s"], 6),
            "mean_accepted_tokens": round(total["decode_tokens"] / total["steps"], 4) if total["steps"] else None,
            "tokens_per_s": round(total["decode_tokens"] / total["decode_s"], 3) if total["decode_s"] > 0 else None,
            "identical_to_baseline": self.identical,
            "token_match_rate": round(self.matched / self.compared, 4) if self.compared else None,
            "accepted_lengths": {str(k): v for k, v in sorted(self.lengths.items())},
            "turns": self.turns,
        }
        if self.keep_ids:
            row["prompt_token_ids"] = self.prompts  # one list per turn
            row["output_token_ids"] = self.outputs
        return row


# ---------------------------------------------------------------------------- the loop
def _warm_up(methods: Sequence[Method], prompt_ids: list[int], runner, settings: DecodeSettings) -> None:
    """Run each code path once on a short generation, so first-call costs land in no method's time.
    Learning drafters see this prompt too; it is the same for all and costs them nothing. A
    throwaway prompt-lookup run on the shared runner verifies trees whatever the methods drafted."""
    from aded.bench.methods import AdedMethod
    from aded.drafters.pld import PromptLookupDrafter

    for method in methods:
        method.warm_up(prompt_ids)
    if any(isinstance(m, AdedMethod) for m in methods):
        short = replace(settings, max_new_tokens=min(8, settings.max_new_tokens))
        AdedMethod("warm-up", runner, PromptLookupDrafter(), short, None).run(prompt_ids, None)


def run_bench(model, tokenizer, questions: Sequence[Question], methods: Sequence[str],
              config: BenchConfig = BenchConfig(), model_name: str = "model",
              progress=None, model_id: str | None = None) -> dict[str, Any]:
    """Benchmark `methods` on `questions`; returns the results dict (see report.py for its shape).

    `model` is a runner (backends/base.py) or a transformers model (run by the HF runner); the
    runner's backend decides the baseline (`hf` or `llama.cpp`). `model_name` is recorded;
    `model_id` names the cached cost curve (default: the name and the dtype, as `aded.load` does).
    `progress` is a `BenchProgress`-like object (or None for silence). Ctrl-C stops after the
    questions already done, which are returned with `config.interrupted` set.
    """
    from aded.backends.hf import as_runner
    from aded.bench.report import summarize

    if not questions:
        raise ValueError("no questions to run")
    runner = as_runner(model)
    baseline = baseline_of(runner.backend)
    settings = DecodeSettings.for_model(runner, tokenizer, config.max_new_tokens,
                                        temperature=config.temperature, top_k=config.top_k,
                                        top_p=config.top_p, seed=config.seed,
                                        max_draft_nodes=config.max_draft_nodes)
    if model_id is None:
        model_id = f"{model_name}:{runner.describe().get('dtype', 'gguf')}"
    # one cost curve for every aded method: "measured" reuses the cached curve of this model and
    # machine (as `aded generate` does), "fresh" times it now (a final run on a quiet machine)
    costs = cost_model(config.budget, runner, model_id)
    built = build_methods(methods, tokenizer, runner, settings, lambda: new_budget(costs))
    session = _Session(runner, PromptBuilder(tokenizer), built, config, settings.greedy, progress, baseline)
    if config.warmup:
        _warm_up(built.methods, session.prompts.ids(questions[0].messages(0)), runner, settings)

    rows: list[dict[str, Any]] = []
    done, interrupted = 0, False
    if progress is not None:
        progress.start(len(questions), [m.name for m in built.methods])
    try:
        for index, question in enumerate(questions):
            finished = session.run_question(index, question)
            rows.extend(finished)
            done += bool(finished)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if progress is not None:
            progress.stop()
    return {
        "model": model_name,
        "machine": machine_info(runner),
        "config": {**asdict(config), "methods": [m.name for m in built.methods],
                   "backend": runner.backend, "baseline": baseline,
                   "chat_template": session.prompts.chat, "eos_token_ids": list(settings.eos_token_ids),
                   "cost_model": costs.as_dict() if costs is not None else None, "timing": TIMING_NOTE,
                   "questions": done, "interrupted": interrupted},
        "skipped": [{"method": k, "reason": v} for k, v in built.skipped.items()],
        "skipped_questions": session.skipped_questions,
        "questions": rows,
        "summary": summarize(rows, baseline),
    }


class _Session:
    """The state one run carries across questions: which methods are still running, and why others
    stopped."""

    def __init__(self, runner, prompts: PromptBuilder, built: MethodSet, config: BenchConfig,
                 greedy: bool, progress, baseline: str) -> None:
        self.runner = runner
        self.greedy = greedy
        self.baseline = baseline
        self.prompts = prompts
        self.built = built
        self.active: list[Method] = list(built.methods)
        self.config = config
        self.progress = progress
        self.skipped_questions: list[dict[str, str]] = []

    def run_question(self, index: int, question: Question) -> list[dict[str, Any]]:
        """Every active method on every turn of one question (baseline first, the rest rotated)."""
        order = self.active[:1] + _rotate(self.active[1:], index)
        rows = {m.name: _Row(question, m.name, keep_ids=m.name == self.baseline) for m in order}
        messages: list[dict[str, str]] = []
        held: list[int] = []  # what plain decoding holds cached when the next turn starts
        for turn in range(len(question.turns)):
            messages.extend(question.messages(turn))
            prompt_ids = self.prompts.ids(messages)
            limit = self.runner.max_positions
            if len(prompt_ids) + self.config.max_new_tokens + self.config.max_draft_nodes + 2 > limit:
                self.skipped_questions.append({
                    "id": question.id, "source": question.source,
                    "reason": f"{len(prompt_ids)} prompt tokens + {self.config.max_new_tokens} new "
                              f"exceed the model's {limit} positions"})
                return []
            baseline = self._turn(index, question, order, rows, prompt_ids, turn, held)
            messages.append({"role": "assistant", "content": self.prompts.answer(baseline)})
            held = prompt_ids + baseline[:-1]  # the answer's last token was emitted, never run
        return [r.as_dict() for r in rows.values() if r.turns]

    def _turn(self, index: int, question: Question, order: list[Method], rows: dict[str, _Row],
              prompt_ids: list[int], turn: int, held: list[int]) -> list[int]:
        """Turn `turn` of a session whose cache holds `held` when it starts, every repeat."""
        learned = {m.name: m.snapshot() for m in order} if self.config.repeats > 1 else {}
        answers = [self._run_turn_once(index, question, order, rows, prompt_ids, repeat, learned, turn, held)
                   for repeat in range(self.config.repeats)]
        return answers[0]  # the baseline's answer, fed to the next turn

    def _run_turn_once(self, index: int, question: Question, order: list[Method], rows: dict[str, _Row],
                       prompt_ids: list[int], repeat: int, learned: dict[str, Any], turn: int,
                       held: list[int]) -> list[int]:
        """Every active method once on this turn; a repeat first restores what each had learned."""
        baseline: list[int] = []
        for method in order[:1] + _rotate(order[1:], repeat):
            if method not in self.active:
                continue
            if repeat:
                method.restore(learned[method.name])
            method.resume(held)
            if self.progress is not None:
                self.progress.update(index, question, method.name)
            try:
                result = method.run(prompt_ids, baseline)
            except (RuntimeError, ValueError) as exc:
                if method.name == self.baseline:
                    raise
                self.built.skipped[method.name] = f"failed on question {question.key}: {exc}"
                self.active.remove(method)
                rows.pop(method.name, None)
                continue
            if method.name == self.baseline:
                baseline = result.output_ids
            rows[method.name].add(result, prompt_ids, baseline, self.greedy, repeat, turn)
            if self.progress is not None:
                self.progress.record(method.name, result)
        return baseline


TIMING_NOTE = ("decode_s starts when the first generated token is known: for aded methods after the "
               "prefill forward, for hf and hf-pld at the streamer's first token inside the same "
               "generate call (time to first token); prefill_s is the time before that. tokens_per_s "
               "counts the tokens after the first over decode_s, drafting included.")


def _rotate(items: list, by: int) -> list:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]
