"""Draft sources behind one protocol, looked up by name.

Each entry maps a drafter name to `module:Class`; modules are imported only when used, so an
optional dependency of one drafter never breaks another.
"""

from __future__ import annotations

import importlib
from typing import Any

from aded.drafters.base import Drafter, NoDrafter, StepFeedback

#: what `aded generate`, the API and the server use unless told otherwise, chosen by measurement
#: (benchmarks/drafts.md, runs in benchmarks/results/): on llama.cpp, the default backend, where a
#: verified node costs 45-90% of a step, suffix's small, precise trees are the fastest or tied with
#: edit's in every run; it drafts in well under a millisecond, needs no datastore (so it serves any
#: model) and also drafts from earlier requests' outputs. On transformers aded leads by 4-9%; the
#: hybrid is fastest on neither backend.
DEFAULT_DRAFTER = "suffix"

__all__ = ["DEFAULT_DRAFTER", "Drafter", "NoDrafter", "StepFeedback", "DRAFTERS", "make_drafter", "drafter_names",
           "drafter_summary"]

DRAFTERS: dict[str, str] = {
    "none": "aded.drafters.base:NoDrafter",
    "pld": "aded.drafters.pld:PromptLookupDrafter",
    "aded": "aded.drafters.aded:AdedDrafter",
    "aded-reference": "aded.drafters.aded_reference:AdedReferenceDrafter",
    "suffix": "aded.drafters.suffix:SuffixDrafter",
    "hybrid": "aded.drafters.hybrid:HybridDrafter",
    "edit": "aded.drafters.edit:EditDrafter",
}


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
    return (doc or "").strip().splitlines()[0] if doc else ""


def drafter_class(name: str) -> type[Drafter]:
    try:
        target = DRAFTERS[name]
    except KeyError:
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
