"""aded: lossless, training-free speculative decoding with model-free draft trees.

    import aded
    lm = aded.load("smollm2-135m-instruct", drafter="pld")
    print(lm.generate("Write a haiku about caches.").text)
"""

from aded.api import Aded, Completion, load
from aded.decoding import GenerationConfig, GenerationResult, GenerationStats, SpeculativeDecoder
from aded.drafters import Drafter, StepFeedback, make_drafter
from aded.tree import DraftTree, TreeBuilder

__version__ = "0.1.0"

__all__ = [
    "Aded", "Completion", "load", "GenerationConfig", "GenerationResult", "GenerationStats",
    "SpeculativeDecoder", "Drafter", "StepFeedback", "make_drafter", "DraftTree", "TreeBuilder",
]
