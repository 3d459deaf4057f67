"""The ``atlas`` console command.

Each module of this package contributes its verbs through ``register(app)``, so the CLI grows
with the library without a central list to keep in sync. ``atlas <verb>`` loads only the module
named after the verb when it registers that verb (``atlas quantify`` never imports the AWS or
segmentation code, which halves its start-up); anything else (``--help``, ``status``) loads them all.
``atlas.cli.app`` is the full command, built on first use.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from atlas.errors import InvalidInput

MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)))


def _root() -> None:
    """Tissue Atlas ingest pipeline: slides in, analysis-ready data out."""


def build_app(modules: tuple[str, ...] = MODULES) -> typer.Typer:
    """The typer app with the verbs of ``modules`` (default: all of them)."""
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    app.callback()(_root)   # a group even with one verb: ``atlas quantify ...`` keeps its verb
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(app)
    return app


def app_for(argv: list[str]) -> typer.Typer:
    """The app that can run ``argv``: only the verb's own module when it registers that verb."""
    verb = argv[1] if len(argv) > 1 else ""
    module = verb.replace("-", "_")
    if module in MODULES:
        app = build_app((module,))
        if verb in typer.main.get_command(app).commands:
            return app
    return build_app()


def __getattr__(name: str):
    if name == "app":
        globals()["app"] = app = build_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point: clear one-line errors for bad input instead of tracebacks."""
    try:
        app_for(sys.argv)()
    except InvalidInput as exc:
        for problem in exc.problems:
            typer.secho(f"error: {problem}", fg="red", err=True)
        sys.exit(1)
