"""Bake the segmentation weights into an image at build time: fetch from a URI, check the sha256.

Used by the Dockerfiles' ``weights`` stage (standard library only)::

    python fetch_weights.py URI SHA256 OUT [--required]

``URI`` is an https:// (or http://) URL; weights kept in a private S3 bucket are given as a
pre-signed URL (the image build has no AWS credentials). With an empty ``URI`` nothing is fetched
(the segment stage then uses its classical engine) unless ``--required``. A sha256 mismatch fails
the build, so an image never holds other weights than the configured ones.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 1 << 20


def fetch(uri: str, sha256: str, out: Path) -> None:
    """Download ``uri`` to ``out`` (via a temporary file) and check its sha256; SystemExit on failure."""
    if urlsplit(uri).scheme not in ("https", "http"):
        sys.exit(f"UNET_WEIGHTS_URI={uri!r}: give an https:// URL (for s3:// use a pre-signed URL)")
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        sys.exit(f"UNET_WEIGHTS_SHA256={sha256!r} is not a hex sha256 (64 characters)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(uri, timeout=60) as response, open(partial, "wb") as fh:
        while block := response.read(CHUNK):
            digest.update(block)
            fh.write(block)
    if digest.hexdigest() != expected:
        partial.unlink()
        sys.exit(f"weights from {uri} have sha256 {digest.hexdigest()}, expected {expected}: "
                 "wrong file or wrong UNET_WEIGHTS_SHA256")
    partial.replace(out)
    print(f"{out}: {out.stat().st_size} bytes, sha256 {expected}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("sha256")
    parser.add_argument("out", type=Path)
    parser.add_argument("--required", action="store_true", help="fail when no URI is given")
    args = parser.parse_args(argv)
    if not args.uri:
        if args.required:
            sys.exit("this image needs segmentation weights: build with --build-arg UNET_WEIGHTS_URI=... "
                     "--build-arg UNET_WEIGHTS_SHA256=...")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print("no UNET_WEIGHTS_URI: image without segmentation weights (classical engine)")
        return
    fetch(args.uri, args.sha256, args.out)


if __name__ == "__main__":
    main()
