"""`aded datastore build|info`: make a corpus datastore for a model's tokenizer, or inspect one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from aded.store.datastore import Datastore, DatastoreError

datastore_app = typer.Typer(help="Build and inspect tri-gram datastores for the aded drafter.", no_args_is_help=True)


def load_tokenizer(model: str):
    """The model's tokenizer (through `aded.models`, which also resolves aliases and GGUF files)."""
    from aded.models import load_tokenizer as load

    return load(model)


@datastore_app.command()
def build(
    corpus: Optional[List[Path]] = typer.Option(None, "--corpus", help="Text files, folders, .jsonl or conversation .json; repeatable. Default: the default datastore's corpus."),
    out: Optional[Path] = typer.Option(None, "--out", help="Datastore file to write (atomically). Default: the default datastore's cache path."),
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
        store = build_datastore(corpus or default_corpus(), tokenizer, out, params, identity, text_field)
    except (ValueError, CorpusError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps({"out": str(out), "bytes": out.stat().st_size, **store.info()}, indent=1))


@datastore_app.command()
def info(file: Path = typer.Argument(..., help="A datastore file.")) -> None:
    """Print what a datastore holds: tokenizer identity, build parameters, sizes (checksums verified)."""
    try:
        store = Datastore.load(file)
    except DatastoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"file": str(file), "bytes": file.stat().st_size, **store.info()}, indent=1))
