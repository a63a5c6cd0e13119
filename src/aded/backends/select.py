"""Which engine runs a model, and loading it: `hf` (transformers, any torch device) or `llama.cpp`
(the GGUF file as it is). `auto` takes llama.cpp for a GGUF file or alias when llama-cpp-python is
installed, since it decodes such files several times faster on a CPU than the de-quantised copy;
otherwise transformers.
"""

from __future__ import annotations

import os

from aded.backends.base import BACKENDS
from aded.models import ModelError, load_model, load_tokenizer, resolve_model

__all__ = ["choose_backend", "load_runner", "choose_repack", "predicted_speed", "REPACK_CHOICES", "NUMERICS"]

#: what `repack=` takes: "auto" (measure both settings once per file and machine), "on", "off"
REPACK_CHOICES = ("auto", "on", "off")
#: what `numerics=` takes: "exact" (every verified row bit-identical to one-token decoding, the
#: default) or "batched" (llama.cpp's fastest batched kernels at any chain length, opt-in)
NUMERICS = ("exact", "batched")
#: the chance a drafted token is accepted at which `choose_repack` compares settings: copy-heavy
#: turns (edits, agents, sessions), where the longer exact chains of a setting are worth most
REFERENCE_ACCEPTANCE = 0.8


def choose_backend(spec: str | os.PathLike, backend: str = "auto", device: str = "cpu") -> str:
    """The concrete backend ("hf" or "llama.cpp") for a model spec; a clear error when it cannot."""
    from aded.backends.llama_cpp import llama_cpp_available

    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    source = resolve_model(spec)
    if backend == "auto":
        return "llama.cpp" if source.is_gguf and device == "cpu" and llama_cpp_available() else "hf"
    if backend == "llama.cpp":
        if not source.is_gguf:
            raise ModelError(f"the llama.cpp backend runs GGUF files; {spec} is a Hugging Face "
                             "folder (use --backend hf)")
        if not llama_cpp_available():
            raise ModelError("the llama.cpp backend needs llama-cpp-python; `bash scripts/setup.sh` "
                             "builds it (about 11 minutes once), or use --backend hf")
        if device != "cpu":
            raise ModelError("this build of the llama.cpp backend runs on the CPU; use --backend hf "
                             f"for {device}")
    return backend


def load_runner(spec: str | os.PathLike, backend: str = "auto", dtype: str = "float32",
                device: str = "cpu", n_ctx: int | None = None, threads: int | None = None,
                repack: str = "auto", numerics: str = "exact"):
    """(runner, tokenizer, model_id) for a model spec on the chosen backend.

    `model_id` names the model and its numeric format for caches such as the measured t(k).
    `dtype` and `device` apply to transformers; `n_ctx` and `repack` (llama.cpp's weight repacking:
    "auto", "on" or "off"; see `choose_repack`) to llama.cpp (default context: the model's
    training context, at most 8192); `threads` to both (default: physical cores). `numerics`
    "batched" (llama.cpp only) verifies chains of any length with llama.cpp's fastest kernels, on
    its default weight layout unless `repack` says otherwise: opt-in, since the output may then
    differ from plain decoding's (see `backends/llama_cpp.py`).
    """
    if repack not in REPACK_CHOICES:
        raise ModelError(f"repack must be one of {', '.join(REPACK_CHOICES)}, got {repack!r}")
    if numerics not in NUMERICS:
        raise ModelError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    chosen = choose_backend(spec, backend, device)
    if chosen == "llama.cpp":
        from aded.backends.llama_cpp import LlamaCppError, LlamaCppRunner

        tokenizer = load_tokenizer(spec)
        path = resolve_model(spec).path
        try:
            exact = numerics == "exact"
            repacked = choose_repack(path, threads) if repack == "auto" and exact else repack != "off"
            runner = LlamaCppRunner(path, n_ctx=n_ctx, n_threads=threads, repack=repacked,
                                    max_nodes=-1 if exact else None)
        except LlamaCppError as exc:
            raise ModelError(str(exc)) from exc
        _check_vocab(runner, tokenizer, spec)
        return runner, tokenizer, f"{spec}:gguf" + ("" if numerics == "exact" else ":batched")
    from aded.backends.hf import HFRunner

    if numerics != "exact":
        raise ModelError("numerics applies to the llama.cpp backend; transformers verifies a whole "
                         "draft tree in one forward and is compared with its own generate")
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    return HFRunner(model), tokenizer, f"{spec}:{dtype}"


def _check_vocab(runner, tokenizer, spec) -> None:
    """Text goes through the Hugging Face tokenizer: it must speak the file's vocabulary."""
    if len(tokenizer) > runner.vocab_size:
        raise ModelError(f"the tokenizer of {spec} has {len(tokenizer)} tokens but llama.cpp's "
                         f"vocabulary {runner.vocab_size}: they do not belong together")


def predicted_speed(max_nodes: int | None, costs, acceptance: float = REFERENCE_ACCEPTANCE) -> float:
    """Tokens a second of the best chain length up to `max_nodes` (None: any measured), where each
    drafted token is accepted with probability `acceptance` given its parent was."""
    longest = int(costs.sizes[-1]) if max_nodes is None else min(max_nodes, int(costs.sizes[-1]))
    best, expected = 0.0, 1.0  # tokens a step: the bonus token, then each drafted one that lands
    for k in range(longest + 1):
        if k:
            expected += acceptance ** k
        best = max(best, expected / costs(k))
    return best


def choose_repack(path: os.PathLike, threads: int | None = None) -> bool:
    """Whether llama.cpp should repack this file's weights for the CPU, by predicted decoding speed.

    Repacking gives llama.cpp its fastest prompt processing on some CPUs, but batch rows of repacked
    weights leave the one-row kernels from four rows on, which caps exact verified chains at two
    drafted tokens; without it K-quants stay exact up to six (`backends/llama_cpp.py`). Which pays
    depends on the CPU: each setting's exact chain length and t(k) are measured once per file, build
    and thread count (tens of seconds; the choice is cached with the numbers behind it) and the one
    predicting more tokens a second at `REFERENCE_ACCEPTANCE` wins. A file with nothing to repack
    (exact at any length with repacking on) keeps llama.cpp's default without a second load.
    """
    from pathlib import Path

    from aded.backends.llama_cpp import LlamaCppRunner, llama_build_identity
    from aded.budget import measure_costs
    from aded.fileio import file_sha256, remembered
    from aded.paths import cache_dir
    from aded.progress import status

    def measure() -> dict:
        measured: dict[str, dict] = {}
        with status(f"Choosing llama.cpp's weight layout for {Path(path).name} on this machine (once)"):
            for repack in (True, False):
                runner = LlamaCppRunner(path, n_ctx=1024, n_threads=threads, repack=repack)
                try:
                    if repack and runner.max_tree_nodes is None:
                        measured["on"] = {"max_tree_nodes": None, "predicted_tokens_per_s": None}
                        break  # exact at every length with llama.cpp's default: nothing to gain
                    costs = measure_costs(runner)
                    measured["on" if repack else "off"] = {
                        "max_tree_nodes": runner.max_tree_nodes,
                        "sizes": list(costs.sizes), "seconds": [round(t, 6) for t in costs.seconds],
                        "predicted_tokens_per_s": round(predicted_speed(runner.max_tree_nodes, costs), 3)}
                finally:
                    runner.close()
        speeds = {name: m["predicted_tokens_per_s"] or 0.0 for name, m in measured.items()}
        choice = "off" not in speeds or speeds["off"] <= speeds["on"]
        return {"repack": choice, "acceptance": REFERENCE_ACCEPTANCE, **measured}

    key = f"{file_sha256(Path(path))[:24]}|{llama_build_identity(threads)}"
    choice = remembered(cache_dir() / "repack-choice.json", key, measure,
                        lambda v: isinstance(v, dict) and isinstance(v.get("repack"), bool))
    return choice["repack"]
