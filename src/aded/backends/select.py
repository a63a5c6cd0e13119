"""Which engine runs a model, and loading it: `hf` (transformers, any torch device) or `llama.cpp`
(the GGUF file as it is). `auto` takes llama.cpp for a GGUF file or alias when llama-cpp-python is
installed, since it decodes such files several times faster on a CPU than the de-quantised copy;
otherwise transformers.
"""

from __future__ import annotations

import os

from aded.backends.base import BACKENDS
from aded.models import ModelError, load_model, load_tokenizer, resolve_model

__all__ = ["choose_backend", "load_runner"]


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
                device: str = "cpu", n_ctx: int | None = None, threads: int | None = None):
    """(runner, tokenizer, model_id) for a model spec on the chosen backend.

    `model_id` names the model and its numeric format for caches such as the measured t(k).
    `dtype` and `device` apply to transformers; `n_ctx` to llama.cpp (default: the model's
    training context, at most 8192); `threads` to both (default: physical cores).
    """
    chosen = choose_backend(spec, backend, device)
    if chosen == "llama.cpp":
        from aded.backends.llama_cpp import LlamaCppError, LlamaCppRunner

        tokenizer = load_tokenizer(spec)
        try:
            runner = LlamaCppRunner(resolve_model(spec).path, n_ctx=n_ctx, n_threads=threads)
        except LlamaCppError as exc:
            raise ModelError(str(exc)) from exc
        _check_vocab(runner, tokenizer, spec)
        return runner, tokenizer, f"{spec}:gguf"
    from aded.backends.hf import HFRunner

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
