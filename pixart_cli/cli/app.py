"""The Typer application: its name, help and the --version flag. Commands register on it (commands.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from pixart_cli import __version__

app = typer.Typer(
    name="pixart",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run PixArt text-to-image models in memory-staged steps: encode (T5) → denoise (transformer) → "
    "decode (VAE). Each stage loads only its own model. stdout carries only the written paths.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"pixart-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Run PixArt text-to-image models in memory-staged steps."""
