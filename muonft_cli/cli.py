"""The `muonft` command line: Typer only. Each command parses, builds a config, calls the engine, prints.

torch / transformers are imported inside the commands (through the engine modules), so `muonft --help`
and `muonft --version` stay instant. Domain errors from the engine (`muonft_cli.errors`) become one line
on stderr and an exit code (2: bad input, 1: failure during work) here, and only here.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import typer

from muonft_cli import __version__
from muonft_cli.errors import MuonftError

app = typer.Typer(
    name="muonft",
    help="Fine-tune pretrained models with Muon without falling into the optimizer-mismatch trap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"muonft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """muonft: pretrain, fine-tune, sweep, evaluate and diagnose with Adam or Muon."""


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an engine function; turn domain errors into one line on stderr and their exit code."""
    try:
        return fn(*args, **kwargs)
    except MuonftError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


# Commands are registered below by the modules' owners (pretrain / finetune / eval / diagnose / sweep).


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
