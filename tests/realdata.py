"""The real test data: ``../shared/data`` where it exists, else fetched from its public origins.

Tests and benchmarks get the data folder from :func:`data_root` (tests through the ``shared_data``
fixture). Beside the repository (here, and in CI) that is ``../shared/data``, read in place and
without touching the network. On a fresh clone without it, every dataset listed in :data:`ORIGINS`
is downloaded once into a cache (pooch; ``$ATLAS_TEST_DATA`` or the user cache folder) from the
repository commit or package release it was taken from, each file checked against the sha256
pinned in ``realdata.sha256`` (the lines of ``../shared/data/SHA256SUMS`` for those files;
tests/test_realdata.py keeps the two in step). The cache mirrors ``../shared/data``'s layout.

Not fetched: ``segmentation/dsb2018_fluo_tuning`` (its label masks are built from per-nucleus PNGs,
not files of the origin) -- benchmarks that tune on it need ``../shared/data``.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from atlas.slide.convention import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PINS = Path(__file__).with_name("realdata.sha256")
CACHE_ENV = "ATLAS_TEST_DATA"


@dataclass(frozen=True)
class Origin:
    """Where the files of one dataset folder come from.

    Attributes
    ----------
    folder : str
        The dataset's folder, relative to the data root, e.g. ``segmentation/stardist_dsb2018``.
    url : str
        Base URL of the files (a file ``folder/x/y`` is at ``url + "x/y"``), or with ``archive_sha256``
        the URL of a zip archive (a wheel) holding them.
    archive_sha256 : str, optional
        The archive's own sha256.
    member_dir : str
        Folder of the files inside the archive.
    """

    folder: str
    url: str
    archive_sha256: str | None = None
    member_dir: str = ""


ORIGINS = (
    Origin("stitching/basicpy_wsi_brain",
           "https://raw.githubusercontent.com/peng-lab/BaSiCPy/bbb6d9aa994e3c3233efc5967d7ea5e49b269a29/"
           "data/WSI_brain/"),
    Origin("segmentation/stardist_dsb2018",
           "https://files.pythonhosted.org/packages/4a/41/1552e918b9c79d46f878f65fb7fd1594ade491cfa7782c2732ccd4a70209/"
           "stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
           archive_sha256="2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023",
           member_dir="stardist/data/images/"),
    Origin("models/unet2d_nuclei_broad",
           "https://raw.githubusercontent.com/bioimage-io/spec-bioimage-io/63a2ea093d29277ba168635b6f322123b1da4ada/"
           "example_descriptions/models/unet2d_nuclei_broad/"),
    Origin("quantification/steinbock_imc",
           "https://raw.githubusercontent.com/BodenmillerGroup/TestData/e04bf08af2a050eae657151677070b0e8919ab06/"
           "datasets/210308_ImcTestData/steinbock/"),
)


def read_pins(path: Path = PINS) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-format file (``<hex>  <path>`` lines)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            pins[name.strip().removeprefix("*")] = digest.lower()
    return pins


def default_cache() -> Path:
    import pooch

    return Path(os.environ.get(CACHE_ENV) or pooch.os_cache("tissue-atlas-test-data"))


def data_root(*, shared: Path = SHARED_DATA, cache: Path | None = None, origins: Iterable[Origin] = ORIGINS,
              pins: dict[str, str] | None = None) -> Path:
    """The folder holding the real test data (see the module docstring).

    Returns ``shared`` when it is a folder (no network, nothing checked: its own SHA256SUMS covers
    it); otherwise ``cache`` after fetching whatever of ``origins`` is missing or differs from the pins.

    Raises
    ------
    ValueError
        A fetched file does not have its pinned sha256 (the origin changed or the transfer broke).
    """
    if Path(shared).is_dir():
        return Path(shared)
    cache = Path(cache) if cache is not None else default_cache()
    pins = read_pins() if pins is None else pins
    for origin in origins:
        files = {rel: digest for rel, digest in pins.items() if rel.startswith(origin.folder + "/")}
        if not files:
            raise ValueError(f"no pinned files for {origin.folder} in {PINS.name}")
        fetch = _fetch_from_archive if origin.archive_sha256 else _fetch_files
        fetch(origin, files, cache)
    return cache


def _fetch_files(origin: Origin, files: dict[str, str], cache: Path) -> None:
    """Each file from ``origin.url`` by its path in the dataset, hash-checked by pooch."""
    import pooch

    names = {rel[len(origin.folder) + 1:]: f"sha256:{digest}" for rel, digest in files.items()}
    store = pooch.create(path=cache / origin.folder, base_url=origin.url, registry=names, retry_if_failed=2)
    for name in names:
        store.fetch(name)


def _fetch_from_archive(origin: Origin, files: dict[str, str], cache: Path) -> None:
    """The files out of a pinned zip archive (a wheel), each checked against its own pin."""
    import pooch

    missing = {rel: d for rel, d in files.items() if not (cache / rel).is_file() or sha256_file(cache / rel) != d}
    if not missing:
        return
    archive = pooch.retrieve(origin.url, known_hash=f"sha256:{origin.archive_sha256}",
                             path=cache / ".archives", fname=origin.url.rsplit("/", 1)[-1])
    with zipfile.ZipFile(archive) as zf:
        for rel, digest in missing.items():
            data = zf.read(origin.member_dir + rel[len(origin.folder) + 1:])
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"{rel} in {origin.url} has sha256 {hashlib.sha256(data).hexdigest()}, "
                                 f"pinned {digest}: update {PINS.name} only after checking the new file")
            target = cache / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
