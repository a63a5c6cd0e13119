"""What every `aded` command shares: the friendly-error wrapper and the options several commands take.

Command modules import from here, never from `aded.cli` itself, so the package has no import cycle.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import typer

from aded.drafters import DEFAULT_DRAFTER, DEFAULT_DRAFTERS, drafter_names
from aded.models import DEFAULT_MODEL, ModelError

__all__ = ["friendly", "split_list", "datastore_option", "ModelOpt", "DrafterOpt", "DtypeOpt",
           "MaxNewOpt", "TempOpt", "TopPOpt", "TopKOpt", "SeedOpt", "NodesOpt", "BudgetOpt",
           "DatastoreOpt", "BackendOpt", "ThreadsOpt", "ChatOpt", "StateOpt"]


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ModelError, ValueError, OSError]
    try:
        from aded.store.datastore import DatastoreError

        errors.append(DatastoreError)
    except ImportError:
        pass
    return tuple(errors)


def friendly(func: Callable) -> Callable:
    """Turn expected failures into one clear line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except _user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def split_list(text: str) -> list[str]:
    """A comma-separated flag value as its non-empty parts."""
    return [part.strip() for part in text.split(",") if part.strip()]


def datastore_option(datastore: Path | None) -> dict:
    """`--datastore` as `aded.load` keyword arguments (none: the drafter's built-in default)."""
    return {"datastore": str(datastore)} if datastore is not None else {}


ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face folder, or .gguf file.")
DRAFTER_HELP = (f"Draft source: {DEFAULT_DRAFTER} (the backend's default: "
                + ", ".join(f"{name} on {backend}" for backend, name in DEFAULT_DRAFTERS.items())
                + f"), {', '.join(drafter_names())} (see `aded drafters`).")
DrafterOpt = typer.Option(DEFAULT_DRAFTER, "--drafter", "-d", help=DRAFTER_HELP)
DtypeOpt = typer.Option("float32", "--dtype", help="float32 or bfloat16.")
MaxNewOpt = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens to generate.")
TempOpt = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples.")
TopPOpt = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off).")
TopKOpt = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0 = off).")
SeedOpt = typer.Option(None, "--seed", help="Seed for sampling.")
NodesOpt = typer.Option(24, "--max-draft-nodes", min=0, max=1024, help="Largest draft tree per step.")
BudgetOpt = typer.Option("measured", "--budget", help="measured, typical or off (see README).")
DatastoreOpt = typer.Option(None, "--datastore", exists=True, dir_okay=False,
                            help="Tri-gram datastore for the aded and hybrid drafters (default: built-in).")
BackendOpt = typer.Option("auto", "--backend", help="auto (llama.cpp for GGUF files when installed, else transformers), hf, or llama.cpp.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")
RepackOpt = typer.Option("auto", "--repack", help="llama.cpp's weight repacking: auto (measured once per file and "
                         "machine), on (llama.cpp's default; fastest prompts on some CPUs, exact chains of 2 "
                         "drafted tokens on K-quants), or off (exact chains of up to 6).")
NumericsOpt = typer.Option("exact", "--numerics", help="exact (default: output identical to llama.cpp's plain decoding) or "
                           "batched (opt-in: llama.cpp's fastest batched kernels at any chain length, as llama-server "
                           "verifies; the output may differ from plain decoding where the model is unsure).")
ChatOpt = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: when the tokenizer has one).")
StateOpt = typer.Option(None, "--state", dir_okay=False,
                        help="File of the drafter's learned state: loaded at start (if it exists), saved after each reply.")
