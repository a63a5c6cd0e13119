"""The `aded` command: one typer app, its commands in one module per group.

    generate.py   generate, chat          models.py     models list|install, drafters
    bench.py      bench, bench compare, simulate
    datastore.py  datastore build|info    serve.py      serve      demo.py   demo
    common.py     the friendly-error wrapper and the options several commands share

Results go to stdout (text, or one JSON object with --json); progress and errors go to stderr.
Any expected failure (bad model, bad file, bad parameter) is one line `error: ...` and exit code 2,
never a traceback.
"""

from __future__ import annotations

import typer

from aded.cli.bench import bench_app, simulate_command
from aded.cli.common import friendly
from aded.cli.datastore import datastore_app
from aded.cli.demo import demo
from aded.cli.generate import chat, generate
from aded.cli.models import drafters, models_app
from aded.cli.serve import serve_command

__all__ = ["app", "main", "friendly"]

app = typer.Typer(
    name="aded",
    help="Lossless speculative decoding with model-free draft trees.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
for _name, _command in {"generate": generate, "chat": chat, "demo": demo, "drafters": drafters,
                        "serve": serve_command, "simulate": simulate_command}.items():
    app.command(_name)(_command)
app.add_typer(datastore_app, name="datastore")
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
