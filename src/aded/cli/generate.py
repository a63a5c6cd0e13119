"""`aded generate` and `aded chat`: text in, streamed text out, with the run's statistics on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from aded.cli.common import (
    BackendOpt,
    BudgetOpt,
    ChatOpt,
    DatastoreOpt,
    DrafterOpt,
    DtypeOpt,
    MaxNewOpt,
    ModelOpt,
    NodesOpt,
    NumericsOpt,
    RepackOpt,
    SeedOpt,
    StateOpt,
    TempOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    datastore_option,
    friendly,
)

__all__ = ["generate", "chat"]

STDIN = "-"


def _read_prompt(prompt: str | None, prompt_file: str | Path | None) -> str:
    """The prompt from PROMPT or --prompt-file; `-` in either place means stdin, as in most tools.
    (`prompt_file` arrives as a str, though annotated a Path for typer to check it as a file.)"""
    if prompt_file is not None:
        if prompt is not None:
            raise ValueError("give a PROMPT or --prompt-file, not both")
        return sys.stdin.read() if prompt_file == STDIN else Path(prompt_file).read_text()
    if prompt is None:
        raise ValueError("no prompt: give PROMPT, --prompt-file FILE, or - to read stdin")
    return sys.stdin.read() if prompt == STDIN else prompt


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


def _write(stream) -> None:
    """Text to stdout as it is accepted, then the run's statistics to stderr."""
    from aded.progress import console

    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = stream.completion.stats
    console.print(
        f"[dim]{stats.generated_tokens} tokens in {stats.steps} steps · "
        f"{stats.mean_accepted_tokens:.2f} tokens/step · {stats.decode_tokens_per_s:.1f} tokens/s "
        f"(prefill {stats.prefill_s:.2f} s, drafting {stats.draft_s * 1000:.0f} ms)[/dim]"
    )


def _load(model, drafter, dtype, budget, backend, threads, datastore, state, repack="auto", numerics="exact"):
    """The model and drafter, the drafter starting from `state` when that file exists."""
    from aded.api import load
    from aded.progress import console

    lm = load(model, drafter=drafter, dtype=dtype, budget=budget, backend=backend, threads=threads,
              repack=repack, numerics=numerics, **datastore_option(datastore))
    if state is not None:
        console.print(f"[dim]{lm.load_learned(state)}[/dim]")
    return lm


@friendly
def generate(
    prompt: str | None = typer.Argument(None, help="The prompt, or - to read it from stdin."),
    # checked as a file, but passed on as str: typer lets `-` through only when the value stays a str
    prompt_file: Path | None = typer.Option(None, "--prompt-file", "-f", exists=True, dir_okay=False,
                                               allow_dash=True, path_type=str),
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = MaxNewOpt,
    temperature: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    seed: int | None = SeedOpt,
    dtype: str = DtypeOpt,
    chat: bool | None = ChatOpt,
    stop: list[str] = typer.Option([], "--stop", help="Stop before this string (repeatable)."),
    max_draft_nodes: int = NodesOpt,
    budget: str = BudgetOpt,
    datastore: Path | None = DatastoreOpt,
    backend: str = BackendOpt,
    threads: int | None = ThreadsOpt,
    repack: str = RepackOpt,
    numerics: str = NumericsOpt,
    state: Path | None = StateOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Generate a completion, streaming text as drafts are accepted."""
    text = _read_prompt(prompt, prompt_file)
    options = _generation_options(max_new_tokens, temperature, top_p, top_k, seed, max_draft_nodes)
    lm = _load(model, drafter, dtype, budget, backend, threads, datastore, state, repack, numerics)
    stream = lm.stream(text, stop=stop, chat=chat, **options)
    if as_json:
        for _ in stream:
            pass
        typer.echo(json.dumps(stream.completion.as_dict()))
    else:
        _write(stream)
    if state is not None:
        lm.save_learned(state)


@friendly
def chat(
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    max_new_tokens: int = MaxNewOpt,
    temperature: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    seed: int | None = SeedOpt,
    dtype: str = DtypeOpt,
    system: str | None = typer.Option(None, "--system", help="A system message."),
    max_draft_nodes: int = NodesOpt,
    budget: str = BudgetOpt,
    datastore: Path | None = DatastoreOpt,
    backend: str = BackendOpt,
    threads: int | None = ThreadsOpt,
    repack: str = RepackOpt,
    numerics: str = NumericsOpt,
    state: Path | None = StateOpt,
) -> None:
    """An interactive conversation that streams replies (empty line or Ctrl-D ends it)."""
    options = _generation_options(max_new_tokens, temperature, top_p, top_k, seed, max_draft_nodes)
    lm = _load(model, drafter, dtype, budget, backend, threads, datastore, state, repack, numerics)
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
        _write(stream)
        messages.append({"role": "assistant", "content": stream.completion.text})
        if state is not None:
            lm.save_learned(state)
