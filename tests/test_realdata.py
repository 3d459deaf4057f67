"""tests/realdata.py: ../shared/data in place when present, else each dataset fetched and checked.

The fetch is exercised offline: a local HTTP server plays the origins (a raw-file host and a wheel
on a package index), serving copies of the real files, so the same pooch code paths run as on a
fresh clone; nothing here reaches the internet.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import zipfile

import pooch
import pytest
from realdata import ORIGINS, PINS, SHARED_DATA, Origin, data_root, read_pins

from atlas.slide.convention import sha256_file


@pytest.fixture
def origin_server(tmp_path):
    """(root folder, base URL) of a local HTTP server standing for the public origins."""
    root = tmp_path / "origin"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", refuse)


def test_pins_are_the_shared_checksums_of_every_origin_folder(shared_data):
    pins = read_pins()
    folders = {o.folder for o in ORIGINS}
    assert {rel.split("/", 2)[0] + "/" + rel.split("/", 2)[1] for rel in pins} == folders
    for rel, digest in pins.items():
        assert sha256_file(shared_data / rel) == digest, rel
    if SHARED_DATA.is_dir():   # the pins are the lines of SHA256SUMS for these files
        assert read_pins(SHARED_DATA / "SHA256SUMS").items() >= pins.items()


def test_shared_data_is_used_in_place_without_the_network(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    assert data_root(shared=shared, cache=tmp_path / "cache") == shared
    assert not (tmp_path / "cache").exists()


def test_a_fresh_clone_fetches_each_file_from_its_origin_checked_by_sha256(origin_server, shared_data, tmp_path,
                                                                           monkeypatch):
    root, url = origin_server
    pins = read_pins()
    raw, wheel = ORIGINS[3], ORIGINS[1]    # steinbock from a file host, DSB2018 from a wheel
    for rel in (r for r in pins if r.startswith(raw.folder + "/")):
        (root / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / rel, root / "raw" / rel)
    with zipfile.ZipFile(root / "stardist.whl", "w") as zf:
        for rel in (r for r in pins if r.startswith(wheel.folder + "/")):
            zf.write(shared_data / rel, wheel.member_dir + rel.rsplit("/", 1)[1])
        zf.writestr("stardist/__init__.py", "")
    origins = [Origin(raw.folder, f"{url}raw/{raw.folder}/"),
               Origin(wheel.folder, f"{url}stardist.whl",
                      archive_sha256=hashlib.sha256((root / "stardist.whl").read_bytes()).hexdigest(),
                      member_dir=wheel.member_dir)]
    cache = tmp_path / "cache"

    assert data_root(shared=tmp_path / "absent", cache=cache, origins=origins) == cache
    fetched = [r for r in pins if r.startswith((raw.folder + "/", wheel.folder + "/"))]
    assert len(fetched) == 25
    for rel in fetched:
        assert (cache / rel).read_bytes() == (shared_data / rel).read_bytes(), rel

    _no_network(monkeypatch)            # a second session: everything is in the cache
    assert data_root(shared=tmp_path / "absent", cache=cache, origins=origins) == cache
    monkeypatch.undo()

    victim = next(r for r in fetched if r.endswith("panel.csv"))
    (root / "raw" / victim).write_text("channel,name\n")            # the origin changed under the pin
    (cache / victim).unlink()
    with pytest.raises(ValueError, match="SHA256 hash of downloaded file"):
        data_root(shared=tmp_path / "absent", cache=cache, origins=origins)
    assert not (cache / victim).exists(), "a file that fails its pin is not kept"


def test_a_wheel_member_that_differs_from_its_pin_is_refused(origin_server, shared_data, tmp_path):
    root, url = origin_server
    wheel = ORIGINS[1]
    with zipfile.ZipFile(root / "other.whl", "w") as zf:
        zf.writestr(wheel.member_dir + "img2d.tif", b"not the image")
        zf.writestr(wheel.member_dir + "mask2d.tif", (shared_data / wheel.folder / "mask2d.tif").read_bytes())
    origin = Origin(wheel.folder, f"{url}other.whl", member_dir=wheel.member_dir,
                    archive_sha256=hashlib.sha256((root / "other.whl").read_bytes()).hexdigest())
    with pytest.raises(ValueError, match=f"img2d.tif in {url}other.whl has sha256 .* update {PINS.name}"):
        data_root(shared=tmp_path / "absent", cache=tmp_path / "cache", origins=[origin])
    assert not (tmp_path / "cache" / wheel.folder / "img2d.tif").exists()
