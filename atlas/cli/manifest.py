"""``atlas manifest SLIDE``: write manifest.json for a slide folder after its last file."""
from __future__ import annotations

from pathlib import Path

import typer

from atlas.slide.convention import run_id_for
from atlas.slide.validate import write_checked_manifest


def manifest(slide: Path = typer.Argument(..., help="slide folder <slide_id>/ with every other file in place")) -> None:
    """Write manifest.json (every file's size and sha256) as `atlas upload` does; refuses an invalid slide.

    For slides copied to the ingest bucket by other means: copy manifest.json last, it starts the run.
    """
    path = write_checked_manifest(slide)
    run_id = run_id_for(slide.resolve().name, path.read_bytes())
    typer.secho(f"✓ {path} written; copy it last. Its run id: {run_id}", fg="green")


def register(app: typer.Typer) -> None:
    app.command()(manifest)
