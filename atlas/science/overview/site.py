"""The static site around the tiles: ``index.html`` (data inlined), the page's script and style,
and the browser libraries copied from the npm install of ``viewer/`` (never loaded from a CDN):
OpenSeadragon (the viewer), marked (markdown) and DOMPurify (sanitizing what marked makes).
"""
from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from atlas.errors import InvalidInput, Problem
from atlas.layout import OVERVIEW_PAGE

VIEWER_ENV = "ATLAS_VIEWER_DIR"
SETUP_HINT = ("run the setup command `./dev setup` (it runs `npm ci --prefix viewer`), or set ATLAS_VIEWER_DIR "
              "to OpenSeadragon's build/openseadragon folder")
VIEWER_FOLDER = "openseadragon"  # inside the overview
LIB_FOLDER = "lib"               # marked and DOMPurify, inside the overview
TEMPLATE_FILES = ("overview.js", "overview.css")
# npm package -> its browser build (UMD, a global), relative to the package folder
MARKDOWN_LIBS = {"marked": "lib/marked.umd.js", "dompurify": "dist/purify.min.js"}


def default_viewer_dir() -> Path:
    """``viewer/node_modules/openseadragon/build/openseadragon`` of this source tree."""
    return Path(__file__).resolve().parents[3] / "viewer" / "node_modules" / "openseadragon" / "build" / "openseadragon"


def find_viewer(viewer_dir: str | os.PathLike | None = None) -> Path:
    """OpenSeadragon's build folder: ``viewer_dir``, else env ATLAS_VIEWER_DIR, else the default.

    Raises
    ------
    InvalidInput
        When ``openseadragon.min.js`` or its ``images/`` are not there, saying how to install them.
    """
    folder = Path(viewer_dir or os.environ.get(VIEWER_ENV) or default_viewer_dir())
    if not (folder / "openseadragon.min.js").is_file() or not (folder / "images").is_dir():
        raise InvalidInput(Problem(str(folder), "OpenSeadragon (openseadragon.min.js and images/) is not "
                                   "installed there", SETUP_HINT))
    missing = [str(path) for path in markdown_libs(folder).values() if not path.is_file()]
    if missing:
        raise InvalidInput(Problem(missing[0], "the markdown libraries (marked, DOMPurify) are not installed beside "
                                   "OpenSeadragon", SETUP_HINT))
    return folder


def markdown_libs(folder: Path) -> dict[str, Path]:
    """Browser builds of marked and DOMPurify in the same node_modules as OpenSeadragon's ``folder``."""
    node_modules = folder.parents[2]  # node_modules/openseadragon/build/openseadragon
    return {name: node_modules / name / path for name, path in MARKDOWN_LIBS.items()}


def viewer_version(folder: Path) -> str:
    """OpenSeadragon's version from its package.json (two levels above the build folder), or "?"."""
    try:
        return json.loads((folder.parents[1] / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError, IndexError):
        return "?"


def copy_viewer(folder: Path, site: Path) -> None:
    """Copy the viewer script, its button images and its licence into ``site/openseadragon/``, and
    marked and DOMPurify with their licences into ``site/lib/``."""
    dest = site / VIEWER_FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "openseadragon.min.js", dest / "openseadragon.min.js")
    shutil.copytree(folder / "images", dest / "images", dirs_exist_ok=True)
    for licence in (folder / "LICENSE.txt", folder.parents[1] / "LICENSE.txt"):
        if licence.is_file():  # BSD-3-Clause: redistributions carry the notice
            shutil.copy2(licence, dest / "LICENSE.txt")
            break
    lib = site / LIB_FOLDER
    lib.mkdir(exist_ok=True)
    for name, script in markdown_libs(folder).items():
        shutil.copy2(script, lib / script.name)
        package = script.parents[1]
        for licence in sorted(package.glob("LICENSE*")):  # MIT; DOMPurify: Apache-2.0 or MPL-2.0
            shutil.copy2(licence, lib / f"{licence.name.replace('LICENSE', name.upper() + '-LICENSE')}.txt")


def write_site(site: Path, data: dict, title: str) -> None:
    """Write ``index.html`` with ``data`` inlined (so it also opens from disk) and its script and style."""
    template = resources.files("atlas.science.overview") / "template"
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = (template / OVERVIEW_PAGE).read_text(encoding="utf-8")
    html = html.replace("{{TITLE}}", _escape(title)).replace("{{DATA}}", payload)
    (site / OVERVIEW_PAGE).write_text(html, encoding="utf-8")
    for name in TEMPLATE_FILES:
        (site / name).write_bytes((template / name).read_bytes())


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
