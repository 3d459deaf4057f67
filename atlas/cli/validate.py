"""``atlas validate SLIDE``."""
from __future__ import annotations

from pathlib import Path

import typer

from atlas.slide.validate import validate_slide


def validate(slide: Path = typer.Argument(...,
                                          help="slide folder <slide_id>/ (markers.csv, raw/, manifest.json)")) -> None:
    """Report every problem of a slide at once (file + fix); exit 1 if any. Never modifies the slide."""
    problems = validate_slide(slide)
    for problem in problems:
        typer.secho(f"✗ {problem.file}: {problem.message}\n    fix: {problem.fix}", fg="red")
    if problems:
        typer.secho(f"{len(problems)} problem(s) in {slide}", fg="red", bold=True)
        raise typer.Exit(1)
    typer.secho(f"✓ {slide} is a valid slide", fg="green")


def register(app: typer.Typer) -> None:
    app.command()(validate)
