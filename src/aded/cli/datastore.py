"""`aded datastore build|answers|info`: make a corpus datastore for a model's tokenizer, a corpus of
the model's own answers for it, or inspect a datastore."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from aded.cli.common import BackendOpt, ModelOpt
from aded.store.datastore import Datastore, DatastoreError

datastore_app = typer.Typer(help="Build and inspect tri-gram datastores for the aded drafter.", no_args_is_help=True)


def load_tokenizer(model: str):
    """The model's tokenizer (through `aded.models`, which also resolves aliases and GGUF files)."""
    from aded.models import load_tokenizer as load

    return load(model)


@datastore_app.command()
def build(
    corpus: list[Path] | None = typer.Option(None, "--corpus", help="Text files, folders, .jsonl or conversation .json; repeatable. Default: the default datastore's corpus."),
    out: Path | None = typer.Option(None, "--out", help="Datastore file to write (atomically). Default: the default datastore's cache path."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Model alias, folder or .gguf whose tokenizer to use."),
    top_k: int = typer.Option(12, "--top-k", help="Successors kept per two-token context."),
    bigram_top_k: int = typer.Option(12, "--bigram-top-k", help="Successors kept per one-token context."),
    min_count: int = typer.Option(2, "--min-count", help="Drop contexts seen fewer times (smaller file)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in JSON Lines records."),
    max_pairs: int = typer.Option(1 << 24, "--max-pairs", help="Counts held in memory before spilling to disk."),
) -> None:
    """Tokenise a corpus with the model's tokenizer and count its tri-grams into a datastore.

    Without --corpus and --out this (re)builds the default datastore the aded drafter uses.
    """
    from aded.store.build import BuildParams, build_datastore
    from aded.store.corpus import CorpusError
    from aded.store.datastore import tokenizer_identity
    from aded.store.default import default_corpus, default_datastore_file

    try:
        params = BuildParams(top_k=top_k, bigram_top_k=bigram_top_k, min_count=min_count, max_pairs=max_pairs)
        tokenizer = load_tokenizer(model)
        identity = tokenizer_identity(tokenizer, model)
        out = out or default_datastore_file(identity)
        store = build_datastore(corpus or default_corpus(identity), tokenizer, out, params, identity, text_field)
    except (ValueError, CorpusError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps({"out": str(out), "bytes": out.stat().st_size, **store.info()}, indent=1))


@datastore_app.command()
def answers(
    model: str = ModelOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Answers file (JSON Lines). Default: the cache path the default datastore reads for this model's tokenizer."),
    count: int = typer.Option(320, "--count", min=1, max=100_000, help="How many of the built-in varied prompts to answer."),
    prompts: Path | None = typer.Option(None, "--prompts", help="Your own prompts instead: a question file as `aded bench -q` reads (JSON Lines with id, category, turns; the first turn is asked)."),
    max_new_tokens: int = typer.Option(160, "--max-new-tokens", "-n", min=1, max=100_000, help="Most tokens per answer."),
    backend: str = BackendOpt,
) -> None:
    """Answer a few hundred varied prompts with the model (greedy) into a corpus of its own words.

    The default datastore counts these answers (weighted) for this model's tokenizer: run this once
    for a model other than the default (whose answers ship with aded), and the aded drafter's
    default datastore is rebuilt with them on next use. An interrupted run resumes where it stopped.
    """
    import aded
    from aded.progress import console
    from aded.store.answers import answer_prompts, cached_answers_file, write_answers
    from aded.store.datastore import tokenizer_identity

    try:
        asked = answer_prompts(count) if prompts is None else _own_prompts(prompts)
        lm = aded.load(model, drafter="suffix", backend=backend)  # lossless: the model's greedy answers
        identity = tokenizer_identity(lm.tokenizer, model)
        out = out or cached_answers_file(identity)
        header = {"model": model, "tokenizer": identity.to_json(), "max_new_tokens": max_new_tokens}

        def generate(prompt: str) -> str:
            return lm.generate([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens).text

        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"answering with {model}", total=len(asked))
            made = write_answers(generate, asked, out, header, on_answer=lambda _: progress.advance(task))
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps({"out": str(out), "answered_now": made, "prompts": len(asked)}))


def _own_prompts(path: Path) -> list[dict[str, str]]:
    """A question file in the benchmark's format (`id`, `category`, `turns`); the first turn is asked."""
    from aded.bench.questions import read_questions

    return [{"id": q.id, "category": q.category, "prompt": q.turns[0]} for q in read_questions(path)]


@datastore_app.command()
def info(file: Path = typer.Argument(..., help="A datastore file.")) -> None:
    """Print what a datastore holds: tokenizer identity, build parameters, sizes (checksums verified)."""
    try:
        store = Datastore.load(file)
    except DatastoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"file": str(file), "bytes": file.stat().st_size, **store.info()}, indent=1))
