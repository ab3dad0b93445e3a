"""``run.json``: what a run folder's numbers were measured with, one entry per session of the run
(a resumed run adds one): versions, git commit, start time, machine, device, backend, threads."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..atomic import atomic_write_text

RUN_INFO = "run.json"


def git_commit() -> str | None:
    """The commit of the eqprop source in use, when it runs from a git checkout (None otherwise)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def session_info(device: torch.device, backend: str, first_epoch: int, command: list[str] | None = None) -> dict[str, Any]:
    """This session's entry."""
    info: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "first_epoch": first_epoch,
        "command": command if command is not None else sys.argv,
        "eqprop": __version__, "git_commit": git_commit(), "torch": torch.__version__,
        "python": platform.python_version(), "host": socket.gethostname(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device), "backend": backend,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def record_session(out_dir: Path, info: dict[str, Any]) -> None:
    """Add ``info`` to the folder's ``run.json`` (written atomically; an unreadable file restarts)."""
    path = out_dir / RUN_INFO
    try:
        sessions = json.loads(path.read_text())["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        sessions = []
    atomic_write_text(path, json.dumps({"sessions": sessions + [info]}, indent=1) + "\n")
