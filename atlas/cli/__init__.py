"""The ``atlas`` console command.

Each module of this package contributes its verbs through ``register(app)``, so the CLI grows
with the library without a central list to keep in sync.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from atlas.errors import InvalidInput

app = typer.Typer(help="Tissue Atlas ingest pipeline: slides in, analysis-ready data out.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}").register(app)


def main() -> None:
    """Entry point: clear one-line errors for bad input instead of tracebacks."""
    try:
        app()
    except InvalidInput as exc:
        for problem in exc.problems:
            typer.secho(f"error: {problem}", fg="red", err=True)
        sys.exit(1)
