"""``atlas upload SLIDE s3://bucket[/SLIDE_ID]``: validate, upload every file, manifest.json last."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from atlas.aws.s3 import BUCKET_OWNER_ENV
from atlas.aws.upload import UploadFailed, upload_slide


def upload(slide: Path = typer.Argument(..., help="slide folder <slide_id>/"),
           destination: str = typer.Argument(..., help="ingest bucket: s3://BUCKET or s3://BUCKET/SLIDE_ID "
                                                       "(slide id defaults to the folder name)"),
           bucket_owner: str = typer.Option(None, "--bucket-owner", envvar=BUCKET_OWNER_ENV, show_envvar=True,
                                            help="AWS account id owning the ingest bucket (optional, from the "
                                                 "data team): S3 then refuses every request if another account "
                                                 "owns a bucket of that name")) -> None:
    """Check the slide, upload it (multipart, resumable), and write manifest.json last to start processing."""
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            result = upload_slide(slide, destination, bucket_owner=bucket_owner, progress=progress)
    except UploadFailed as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    sent = ", ".join(result.uploaded) or "nothing"
    console.print(f"[green]✓[/] uploaded {len(result.uploaded)} file(s) ({result.bytes_sent / 2**20:.1f} MiB): {sent}")
    if result.skipped:
        console.print(f"  already there, skipped: {', '.join(result.skipped)}")
    console.print(f"manifest: {result.manifest_uri}\nrun id:   {result.run_id}")


def register(app: typer.Typer) -> None:
    app.command()(upload)
