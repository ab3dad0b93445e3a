"""One writer per run folder: an OS file lock held for the run's lifetime.

``with RunLock(folder):`` takes an exclusive ``flock`` on ``folder/.lock``.
The operating system releases it when the process ends, however it ends, so a
crash never leaves a stale lock. A second run or resume of a locked folder
fails at once with one line naming the holder (its PID, host and start time,
written into the lock file by the holder).
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """The run folder is held by another live eqprop process."""


class RunLock:
    """An exclusive lock on a run folder (created if missing) while the ``with`` block runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunLockedError(f"{self.folder} is in use by another eqprop run ({holder}); wait for it to "
                                     "end, or choose another --out") from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # no holder any more (the file stays: removing it would race)
            os.close(self._fd)          # closing releases the lock
            self._fd = None
