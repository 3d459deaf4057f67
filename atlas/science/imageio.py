"""Opening the image files that users and earlier stages give, with errors that name the file and the fix."""
from __future__ import annotations

import os
from typing import BinaryIO

import tifffile

from atlas.errors import InvalidInput, Problem


def open_tiff(path: str | os.PathLike | BinaryIO, fix: str, *, name: str | None = None) -> tifffile.TiffFile:
    """``tifffile.TiffFile(path)``, or InvalidInput naming the file when it cannot be read as TIFF.

    Parameters
    ----------
    path : str or os.PathLike or binary file
        A path, or a seekable file object (e.g. ranged reads of an object in S3).
    fix : str
        What to give instead, for the error (e.g. ``"give a (pyramidal OME-)TIFF file"``).
    name : str, optional
        The file's name in the error (default: ``path``).

    Returns
    -------
    tifffile.TiffFile
        Open; the caller closes it (``with open_tiff(path, fix) as tif: ...``).

    Raises
    ------
    InvalidInput
        The file is missing, unreadable or not a TIFF.
    """
    try:
        return tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError) as exc:
        raise InvalidInput(Problem(name or str(path), f"cannot be read as TIFF ({exc})", fix)) from exc
