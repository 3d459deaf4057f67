"""Reading a release lazily: the Level 2 OME-Zarr as ``zarr`` arrays over S3, one GET per chunk touched."""
from __future__ import annotations

from atlas import layout
from atlas.aws.access.errors import NotPublished, access_error
from atlas.aws.access.releases import PublishedRelease, get_release, results_client
from atlas.aws.s3 import requester_pays, s3_store
from atlas.errors import InvalidInput, Problem


def release_store(release: PublishedRelease, path: str, *, client=None):
    """A read-only zarr store over ``path`` (a ``*.zarr`` folder) of a release, keys from its manifest.

    Raises
    ------
    NotPublished
        The release has no files below ``path``.
    """
    top = path.rstrip("/") + "/"
    sizes = {f.path[len(top):]: f.size for f in release.files if f.path.startswith(top)}
    if not sizes:
        raise NotPublished(Problem(str(release.prefix.join(path)), f"release {release.run_id} has no {path}",
                                   f"`atlas data ls {release.slide_id}` lists what it has"))
    client = requester_pays(client) if client is not None else results_client()
    return s3_store(client, release.prefix.join(top), sizes=sizes, read_only=True, explain=access_error)


def open_zarr_group(slide_id: str, *, run_id: str | None = None, bucket: str | None = None, client=None,
                    release: PublishedRelease | None = None):
    """The slide's Level 2 OME-Zarr (NGFF 0.4) as a lazy, read-only ``zarr.Group`` over S3.

    Levels are ``group["0"]``, ``group["1"]``, ...; masks, when published, under ``group["labels"]``;
    channel names in ``group.attrs["omero"]["channels"]``. Nothing but metadata is read until you
    index an array; then one requester-pays GET per chunk touched. ``group.store.requests`` and
    ``group.store.bytes_fetched`` say what was read.

    Parameters
    ----------
    slide_id : str
    run_id : str, optional
        Default: the latest release.
    bucket : str
        The results bucket the data team named (not needed with ``release``).
    client : botocore S3 client, optional
        Default :func:`results_client`; a given client gets the request-payer header added. It must
        be for us-east-1.
    release : PublishedRelease, optional
        An already read release (skips reading the manifest again).
    """
    import zarr

    client = requester_pays(client) if client is not None else results_client()
    release = release or get_release(slide_id, run_id, bucket=bucket, client=client)
    store = release_store(release, layout.registration_zarr(release.slide_id), client=client)
    return zarr.open_group(store=store, mode="r")


def open_zarr(slide_id: str, *, level: int = 0, run_id: str | None = None, bucket: str | None, client=None):
    """The slide's registered image as a lazy ``zarr.Array`` ``(C, Y, X)`` read from S3 as needed.

    Parameters
    ----------
    slide_id : str
    level : int
        Pyramid level: 0 is full resolution, each next level halves Y and X.
    run_id, bucket, client
        As for :func:`open_zarr_group`.

    Returns
    -------
    zarr.Array
        Indexing it, e.g. ``image[0, 1000:1512, 2000:2512]`` (channel 0, a 512 x 512 region in
        pixels), reads only the chunks it touches (requester pays, one GET per chunk).

    Examples
    --------
    >>> image = open_zarr("S1", bucket="atlas-results-123456789012")      # doctest: +SKIP
    >>> region = image[:, 1000:1512, 2000:2512]                           # doctest: +SKIP
    """
    group = open_zarr_group(slide_id, run_id=run_id, bucket=bucket, client=client)
    datasets = group.attrs["multiscales"][0]["datasets"]
    if not 0 <= level < len(datasets):
        raise InvalidInput(Problem("level", f"level {level} does not exist", f"use 0..{len(datasets) - 1}"))
    return group[datasets[level]["path"]]
