"""``atlas data ls | cost | get | open``: published results for external analysts (requester pays)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from atlas.aws import access
from atlas.aws.release import RESULTS_BUCKET_ENV
from atlas.aws.s3 import BUCKET_OWNER_ENV

data_app = typer.Typer(help="Published results (requester pays, us-east-1): list, price, download, open lazily. "
                            "Your AWS account pays its requests and transfer.", no_args_is_help=True)

BUCKET = typer.Option(None, "--bucket", envvar=RESULTS_BUCKET_ENV, show_envvar=True,
                      help="results bucket name (from the data team)")
OWNER = typer.Option(None, "--bucket-owner", envvar=BUCKET_OWNER_ENV, show_envvar=True,
                     help="AWS account id owning the results bucket (optional, from the data team): S3 then "
                          "refuses every request if another account owns a bucket of that name")
RUN = typer.Option(None, "--run", help="run id of the release (default: the latest release)")
LEVELS = typer.Option(None, "--levels", help="data levels, e.g. 2,3,4 (2 image, 3 masks, 4 tables, 5 overview, "
                                             "qc; default all)")


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB / TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def usd(x: float) -> str:
    """Dollars: cents from $1 up, otherwise up to six decimals (small downloads cost fractions of a cent)."""
    return f"${x:,.2f}" if x >= 1 else "$" + (f"{x:.6f}".rstrip("0").rstrip(".") or "0")


def level_token(level: int | None) -> str:
    """How ``--levels`` names a level: its number, or ``qc`` for QC and provenance."""
    return str(level) if level is not None else access.QC_TOKEN


@data_app.command("ls")
def ls(slide: str = typer.Argument(None, help="slide id (default: list the slides)"), run: str = RUN,
       bucket: str = BUCKET, owner: str = OWNER,
       index: str = typer.Option(None, "--index", help="list the slides of a portal instead (its address, "
                                                       "https://.../index.json, or a local index.json); no AWS "
                                                       "account needed")) -> None:
    """List the published slides, or one slide's releases and its files by data level with sizes."""
    console = Console()
    if index is not None:
        ls_index(console, index, slide)
        return
    client = access.results_client(owner=owner, bucket=bucket)
    if slide is None:
        slides = access.list_published_slides(bucket=bucket, client=client)
        table = Table("slide", "latest release", "files", "size", "released", title=f"s3://{access.results_bucket(bucket)}")
        for s in slides:
            table.add_row(s.slide_id, s.run_id, str(s.files), human(s.bytes), s.released)
        console.print(table if slides else "no published slides yet")
        return
    releases = access.list_releases(slide, bucket=bucket, client=client)
    table = Table("run", "released", "", title=f"releases of {slide}")
    for r in releases:
        table.add_row(r.run_id, f"{r.released:%Y-%m-%d %H:%M:%S %Z}", "latest" if r.latest else "")
    console.print(table)
    release = access.get_release(slide, run, bucket=bucket, client=client)
    table = Table("level", "path", "files", "size", title=f"{release.prefix}", show_footer=True)
    table.columns[1].overflow = "fold"
    for item in access.items(release.files):
        table.add_row(level_token(item.level), item.path, str(item.files), human(item.size))
    table.columns[0].footer, table.columns[2].footer = "total", str(len(release.files))
    table.columns[3].footer = human(release.size)
    console.print(table)
    console.print("levels: " + "; ".join(f"{level_token(k)} {v}" for k, v in access.LEVEL_NAMES.items()),
                  highlight=False)
    console.print(f"price a download: atlas data cost {slide} --levels 2,3,4")


def ls_index(console: Console, location: str, slide: str | None) -> None:
    """The slides a portal's index.json lists (or one of them, by level)."""
    from atlas.aws.portal import read_index

    doc = read_index(location)
    slides = [s for s in doc["slides"] if slide is None or s["slide_id"] == slide]
    table = Table("slide", "latest release", "released", "cells", "markers", "size", "download", "overview",
                  title=f"{location} (s3://{doc.get('results_bucket', '?')})")
    for s in slides:
        table.add_row(s["slide_id"], s["run_id"], s.get("released", ""),
                      "" if s.get("cells") is None else f"{s['cells']:,}", ", ".join(s.get("markers", [])),
                      human(s.get("bytes", 0)), usd(s.get("download_cost_usd", 0)), s.get("overview", ""))
    console.print(table if slides else "no such slide in the portal" if slide else "no released slides yet")
    for s in slides if slide else []:
        for level in s.get("levels", []):
            console.print(f"{level_token(level['level'])}: {human(level['bytes'])}  {level['command']}",
                          highlight=False, soft_wrap=True)


@data_app.command("cost")
def cost(slide: str = typer.Argument(..., help="slide id"), levels: str = LEVELS,
         from_region: str = typer.Option(None, "--from-region", help="AWS region you would read from, e.g. eu-west-1"),
         run: str = RUN, bucket: str = BUCKET, owner: str = OWNER) -> None:
    """Estimate what downloading levels of a release costs your account.

    Inside us-east-1, from another region, and to the internet.
    """
    console = Console()
    wanted = access.parse_levels(levels)
    release = access.get_release(slide, run, bucket=bucket, client=access.results_client(owner=owner, bucket=bucket))
    estimate = access.estimate_cost(release, wanted, from_region=from_region)
    chosen = "all levels" if wanted is None else "levels " + ", ".join(sorted(map(level_token, wanted)))
    console.print(f"[bold]{slide}[/] release {release.run_id}, {chosen}: {estimate.files} files, "
                  f"{human(estimate.bytes)}, {estimate.get_requests:,} GET requests")
    table = Table("reading", "transfer", "requests", "total")
    for s in estimate.scenarios:
        table.add_row(s.where, usd(s.transfer_usd), usd(s.request_usd), f"[bold]{usd(s.total_usd)}[/]")
    console.print(table)
    console.print("Assumptions:")
    for line in estimate.assumptions:
        console.print(f"  - {line}", highlight=False)


@data_app.command("get")
def get(slide: str = typer.Argument(..., help="slide id"), out: Path = typer.Option(..., "-o", "--out",
                                                                                   help="download folder"),
        levels: str = LEVELS, run: str = RUN, bucket: str = BUCKET, owner: str = OWNER,
        threads: int = typer.Option(access.DOWNLOAD_THREADS, help="parallel requests")) -> None:
    """Download levels of a release (parallel ranged GETs), resuming an interrupted download, sha256-checked."""
    console = Console(stderr=True)
    wanted = access.parse_levels(levels)
    client = access.results_client(owner=owner, bucket=bucket)
    release = access.get_release(slide, run, bucket=bucket, client=client)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        result = access.download_release(release, out, levels=wanted, client=client, threads=threads,
                                         progress=progress)
    console.print(f"[green]✓[/] {len(result.fetched)} file(s) downloaded ({human(result.bytes_fetched)} in "
                  f"{result.requests:,} requests), {len(result.verified)} already there and verified"
                  + (f", {len(result.resumed)} resumed" if result.resumed else ""))
    console.print(f"into {result.target}")
    if result.corrupt:
        for bad in result.corrupt:
            console.print(f"[red]error:[/] {bad.path}: sha256 {bad.actual_sha256} does not match the release manifest "
                          f"({bad.expected_sha256}); the file was tampered with or damaged and was not kept -- tell "
                          "the data team", highlight=False)
        raise typer.Exit(1)


@data_app.command("open")
def open_(slide: str = typer.Argument(..., help="slide id"), run: str = RUN, bucket: str = BUCKET,
          owner: str = OWNER) -> None:
    """Open the slide's OME-Zarr lazily over S3: print its levels and a Python snippet that reads a region."""
    console = Console()
    client = access.results_client(owner=owner, bucket=bucket)
    release = access.get_release(slide, run, bucket=bucket, client=client)
    group = access.open_zarr_group(slide, client=client, release=release)
    store = group.store
    multiscale = group.attrs["multiscales"][0]
    channels = [c.get("label", str(i)) for i, c in enumerate(group.attrs.get("omero", {}).get("channels", []))]
    scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
    console.print(f"[bold]{store.prefix}[/]  OME-Zarr (NGFF {multiscale.get('version', '?')}), lazy: chunks are read "
                  "on access, requester pays", highlight=False)
    console.print(f"channels ({len(channels)}): {', '.join(channels)}")
    console.print(f"pixel size: {scale[-1]} µm; axes: {', '.join(a['name'] for a in multiscale['axes'])}")
    table = Table("level", "shape", "chunks", "dtype", "size")
    first = None
    for k, dataset in enumerate(multiscale["datasets"]):
        array = group[dataset["path"]]
        first = array if first is None else first
        size = sum(n for key, n in store.sizes.items() if key.startswith(dataset["path"] + "/"))
        table.add_row(str(k), str(array.shape), str(array.chunks), str(array.dtype), human(size))
    console.print(table)
    if "labels" in group:
        console.print(f"masks: {', '.join(group['labels'].attrs.get('labels', []))} (group['labels'][NAME])")
    console.print(f"metadata read: {store.requests} requests, {human(store.bytes_fetched)}")
    y, x = (min(512, n) for n in first.shape[-2:])
    console.print("\nIn Python (reads only the chunks a region touches):", highlight=False)
    console.print(snippet(slide, release.bucket, channels[0] if channels else "0", y, x), highlight=False,
                  markup=False, soft_wrap=True)


def snippet(slide: str, bucket: str, channel: str, y: int, x: int) -> str:
    """The Python example ``atlas data open`` prints (tests run it)."""
    return (f"from atlas.aws.access import open_zarr\n"
            f"image = open_zarr(\"{slide}\", bucket=\"{bucket}\")   # (C, Y, X) level 0, nothing read yet\n"
            f"region = image[0, 0:{y}, 0:{x}]   # channel 0 ({channel}): a numpy array; one GET per chunk touched\n"
            f"print(region.shape, region.dtype, region.mean())")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
