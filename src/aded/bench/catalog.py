"""Which methods `aded bench` knows on a backend, and building them by name.

Apart from `methods.py` so that peers built on its method classes (the llama-server methods) and
the list of every method can both be named without a circle.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field

from aded.bench.llama_server import METHODS as LLAMA_SERVER_METHODS
from aded.bench.llama_server import LlamaServerMethod
from aded.bench.methods import PEERS, AdedMethod, DecodeSettings, HFGenerate, LlamaCppGenerate, Method, method_names
from aded.budget import measure_costs, new_budget
from aded.drafters import DRAFTERS, make_drafter
from aded.drafters.base import Drafter
from aded.drafters.oracle import OracleDrafter

__all__ = ["BATCHED", "MethodSet", "build_methods", "known_methods"]

#: a drafter's name with this suffix runs it in the opt-in mode on llama.cpp's own terms
BATCHED = "+batched"


def known_methods(backend: str = "hf") -> list[str]:
    """Every method `aded bench` knows on a backend: the default ones, and on llama.cpp, only when
    asked for by name, the `llama-server` peers (a server process each) and every drafter in the
    opt-in batched mode (`suffix+batched`: llama.cpp's fastest kernels at any chain length)."""
    if backend != "llama.cpp":
        return method_names(backend)
    return method_names(backend) + list(LLAMA_SERVER_METHODS) + [f"{name}{BATCHED}" for name in [*DRAFTERS, "oracle"]]


class _BatchedRunner:
    """The second runner that `+batched` methods share: the same file and context settings, on
    llama.cpp's own weight layout, verifying chains of any length (no exactness cap), with its own
    t(k) (timed when the first such method is built)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.made = None

    def get(self):
        if self.made is None:
            other = self.runner.sibling(repack=True, max_nodes=None)
            costs = measure_costs(other)
            self.made = other, (lambda: new_budget(costs))
        return self.made


@dataclass
class MethodSet:
    methods: list[Method] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason


def _drafter(name: str, tokenizer) -> Drafter:
    if name == "oracle":
        return OracleDrafter()
    if name == "aded-reference" and importlib.util.find_spec("draftretriever") is None:
        raise ImportError("draftretriever is not installed (pip install draftretriever==0.1.1)")
    return make_drafter(name, tokenizer)


def build_methods(names: Sequence[str], tokenizer, runner, settings: DecodeSettings,
                  make_budget) -> MethodSet:
    """The methods in `names` (the runner's baseline first), each fresh; unavailable ones skipped.

    `make_budget()` returns a new budget over the run's shared cost model.
    """
    known = known_methods(runner.backend)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))} on the {runner.backend} "
                         f"backend; choose from: {', '.join(known)}")
    baseline, peer = PEERS[runner.backend]
    ordered = [baseline] + [n for n in dict.fromkeys(names) if n != baseline]
    out = MethodSet()
    batched = _BatchedRunner(runner)
    for name in ordered:
        try:
            if name in PEERS["hf"]:
                out.methods.append(HFGenerate(name, runner, settings, 10 if name == peer else None))
            elif name in PEERS["llama.cpp"]:
                out.methods.append(LlamaCppGenerate(name, runner, settings, 10 if name == peer else None))
            elif name.startswith("llama-server"):
                out.methods.append(LlamaServerMethod(name, runner, settings))
            elif name.endswith(BATCHED):
                drafter = _drafter(name[: -len(BATCHED)], tokenizer)
                other, make_other_budget = batched.get()
                out.methods.append(AdedMethod(name, other, drafter, settings, make_other_budget()))
            else:
                drafter = _drafter(name, tokenizer)
                out.methods.append(AdedMethod(name, runner, drafter, settings, make_budget()))
        except (ImportError, RuntimeError, ValueError, OSError) as exc:
            if name == baseline:
                raise
            out.skipped[name] = f"{type(exc).__name__}: {exc}"
    return out
