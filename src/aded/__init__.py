"""aded: lossless, training-free speculative decoding with model-free draft trees.

    import aded
    lm = aded.load("smollm2-135m-instruct")
    print(lm.generate("Write a haiku about caches.").text)

Names are imported on first use, so `import aded` (and `aded --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Aded": "aded.api", "Completion": "aded.api", "load": "aded.api",
    "GenerationConfig": "aded.decoding", "GenerationResult": "aded.decoding",
    "GenerationStats": "aded.decoding", "SpeculativeDecoder": "aded.decoding",
    "Drafter": "aded.drafters", "StepFeedback": "aded.drafters", "make_drafter": "aded.drafters",
    "DraftTree": "aded.tree", "TreeBuilder": "aded.tree", "TokenLogprob": "aded.processors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aded' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
