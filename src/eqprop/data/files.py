"""File handling shared by the dataset readers and the downloader.

Dataset files may be stored plain or gzip-compressed; checksums always refer to
the decompressed content. Files are written through a temporary file and an
atomic rename, so an interrupted or failed download never leaves a partial
file under a real dataset name.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from eqprop.data.errors import DataError

T = TypeVar("T")


class ContentError(ValueError):
    """A file's bytes do not match its dataset format or checksum.

    Decoders raise it with just the problem (e.g. ``"is corrupt (md5
    mismatch)"``); callers add the file name and the remedy, which differ
    between reading a local file and checking a download.
    """


def find_data_file(folder: Path, name: str) -> Path | None:
    """Return ``folder/name`` or else ``folder/name.gz``, whichever exists first; None if neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def gunzip(data: bytes) -> bytes:
    """Decompress gzip ``data``, reporting a truncated or damaged stream as ContentError."""
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as error:
        raise ContentError("is not a valid gzip file (truncated or damaged)") from error


def read_data_file(path: Path) -> bytes:
    """Return the decompressed content of ``path`` (gzip if its name ends in ``.gz``)."""
    data = path.read_bytes()
    return gunzip(data) if path.suffix == ".gz" else data


def read_dataset_file(folder: Path, name: str, dataset: str, decode: Callable[[bytes, str], T]) -> T:
    """Locate dataset file ``name`` in ``folder``, decode and verify it.

    ``decode(content, name)`` parses the decompressed content and raises
    ContentError on any problem. Every failure (missing, unreadable, damaged)
    becomes a one-line DataError naming the file and what to do.
    """
    path = find_data_file(folder, name)
    blocking = next((place for place in (folder, *folder.parents) if place.exists()), None)
    if path is None and blocking is not None and not blocking.is_dir():
        raise DataError(f"{dataset} folder {folder} cannot exist: {blocking} is a file, not a folder; point "
                        "--data-dir (or $EQPROP_DATA) at a data root, a folder that holds one folder per dataset")
    if path is None:
        raise DataError(
            f"{dataset} file {folder / name}[.gz] is missing: put the {dataset} files in {folder} "
            f"(see the README's Data section), point --data-dir at a data root holding {folder.name}/, "
            f"or, with internet access, run with --download"
        )
    try:
        return decode(read_data_file(path), name)
    except ContentError as error:
        raise DataError(f"{dataset} file {path} {error}: replace it with a good copy, or delete it and, with "
                        "internet access, run with --download") from None
    except OSError as error:
        raise DataError(f"cannot read {dataset} file {path}: {error.strerror or error}") from None


