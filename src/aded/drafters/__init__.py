"""Draft sources behind one protocol, looked up by name.

Each entry maps a drafter name to `module:Class`; modules are imported only when used, so an
optional dependency of one drafter never breaks another.
"""

from __future__ import annotations

import importlib
from typing import Any

from aded.drafters.base import Drafter, LearningDrafter, NoDrafter, StepFeedback

#: The drafter each backend uses unless told otherwise, chosen by measurement (measured:
#: benchmarks/drafts.md; runs in benchmarks/results/). llama.cpp verifies one path a step, and a
#: verified node costs a large share of a CPU step there: suffix's small, precise trees are the
#: fastest or tied with edit's in every run; its drafting is a lookup, it needs no datastore (so it
#: serves any model) and it also drafts from earlier requests' outputs. transformers verifies a
#: whole tree for little more than one node: there the hybrid's merged trees accept the most tokens
#: a step in every run, and it is the fastest over edits, mixed tasks and MT-Bench together (ahead
#: of aded on edits, slightly behind it on the others, ahead of suffix on all three).
#: A backend not listed (vLLM's proposer verifies one path) takes llama.cpp's.
DEFAULT_DRAFTERS = {"llama.cpp": "suffix", "hf": "hybrid"}
#: `drafter="auto"`: the default of the backend the model runs on (`default_drafter`)
DEFAULT_DRAFTER = "auto"

__all__ = ["DEFAULT_DRAFTER", "DEFAULT_DRAFTERS", "DRAFTERS", "Drafter", "LearningDrafter", "NoDrafter", "StepFeedback",
           "default_drafter", "drafter_names", "drafter_summary", "make_drafter"]

DRAFTERS: dict[str, str] = {
    "none": "aded.drafters.base:NoDrafter",
    "pld": "aded.drafters.pld:PromptLookupDrafter",
    "aded": "aded.drafters.aded:AdedDrafter",
    "aded-reference": "aded.drafters.aded_reference:AdedReferenceDrafter",
    "suffix": "aded.drafters.suffix:SuffixDrafter",
    "hybrid": "aded.drafters.hybrid:HybridDrafter",
    "edit": "aded.drafters.edit:EditDrafter",
}


def default_drafter(backend: str) -> str:
    """The drafter `backend` uses when asked for "auto"."""
    return DEFAULT_DRAFTERS.get(backend, DEFAULT_DRAFTERS["llama.cpp"])


def drafter_names() -> list[str]:
    return list(DRAFTERS)


def drafter_summary(name: str) -> str:
    """One line on what a drafter does: its module's docstring opens with it (the protocol module
    holds `none`, whose own docstring says it)."""
    import inspect
    import sys

    cls = drafter_class(name)
    module = sys.modules[cls.__module__]
    doc = inspect.getdoc(cls) if module is sys.modules[Drafter.__module__] else inspect.getdoc(module)
    return doc.strip().splitlines()[0] if doc else ""


def drafter_class(name: str) -> type[Drafter]:
    try:
        target = DRAFTERS[name]
    except KeyError:
        if name == DEFAULT_DRAFTER:
            raise ValueError(f"{name!r} names the backend's default drafter: resolve it with "
                             "default_drafter(backend)") from None
        raise ValueError(f"unknown drafter {name!r}; choose one of: {', '.join(DRAFTERS)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_drafter(name: str, tokenizer: Any = None, **options: Any) -> Drafter:
    """Build a drafter by name; `options` go to its constructor, and so does `tokenizer` when the
    drafter takes one (`needs_tokenizer`: to find or check its datastore), so every caller can
    simply pass the model's tokenizer."""
    cls = drafter_class(name)
    if cls.needs_tokenizer and tokenizer is not None:
        options["tokenizer"] = tokenizer
    return cls(**options)
