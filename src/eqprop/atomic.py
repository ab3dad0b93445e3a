"""Atomic file writes: a crash or error leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` for the caller to fill.

    If the ``with`` block finishes, the file is flushed to disk and renamed
    onto ``target`` in one step; if it raises, the temporary file is deleted
    and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("r+b") as written:
            os.fsync(written.fileno())
        temporary.chmod(0o644)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(target.parent)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_write_path(Path(target)) as temporary:
        temporary.write_text(text)


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
