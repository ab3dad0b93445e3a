"""Building and loading the C kernel: compiled once per machine with the system's C compiler.

The source ships inside the package; on first use it is compiled (about a
second) into the per-user cache folder ``$EQPROP_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/eqprop/kernels`` (``~/.cache/eqprop/kernels``), or a
temporary folder where that cannot be written, one library per floating type. The file name
holds a hash of the source, the compiler, its flags and the processor, so an
edited source, another compiler or another processor (``-march=native``
code must not run on a machine it was not built for) gets its own build. A
build is written under a temporary name and renamed into place, so
concurrent runs never load a half-written library.

Where no compiler works, :func:`load_kernel` raises :class:`KernelUnavailable`
with the reason, and callers run the phases with PyTorch instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..user_cache import user_cache_folder

SOURCE = Path(__file__).with_name("mlp_phase.c")
CACHE_ENV_VAR = "EQPROP_KERNEL_CACHE"
#: optimisation flags, tried in order: the first set the compiler accepts is used
FLAG_SETS = (["-O3", "-march=native", "-fno-trapping-math"], ["-O3", "-fno-trapping-math"])
_TYPE_FLAGS = {torch.float32: [], torch.float64: ["-DEQPROP_DOUBLE"]}


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (the message says why)."""


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The floating types the kernel is built for."""
    return tuple(_TYPE_FLAGS)


def cache_folder() -> Path:
    """Where built kernels are kept: ``$EQPROP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/eqprop/kernels``
    (``~/.cache/eqprop/kernels``)."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    return Path(from_env).expanduser() if from_env else user_cache_folder("kernels")


@lru_cache(maxsize=None)
def load_kernel(dtype: torch.dtype) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """The kernel's ``eqprop_mlp_phase`` for ``dtype`` (float32 or float64), built if needed.

    Raises :class:`KernelUnavailable`; the failure is cached too, so a machine
    without a compiler pays for the attempt once per process.
    """
    if dtype not in _TYPE_FLAGS:
        raise KernelUnavailable(f"the C kernel is built for float32 and float64, not {dtype}")
    compiler = os.environ.get("CC") or next(
        (found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc or clang)")
    errors = []
    folder = _writable(cache_folder())
    for flags in FLAG_SETS:
        flags = flags + _TYPE_FLAGS[dtype]
        path = folder / f"mlp_phase-{_build_key(compiler, flags)}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, path)
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError, KernelUnavailable) as error:
            errors.append(f"{' '.join(flags)}: {error}")
    raise KernelUnavailable("could not build the C kernel: " + "; ".join(errors))


def _writable(folder: Path) -> Path:
    """``folder``, created if needed; a per-user temporary folder where it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"eqprop-kernels-{user}"


def _build_key(compiler: str, flags: list[str]) -> str:
    """A hash of everything the built library depends on."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, *flags, platform.machine(), platform.system(), _processor_fingerprint()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:20]


def _processor_fingerprint() -> str:
    """The processor's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))


def _compile(compiler: str, flags: list[str], path: Path) -> None:
    """Compile the source into ``path`` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".so")
    os.close(handle)
    try:
        command = [compiler, *flags, "-fPIC", "-shared", "-pthread", str(SOURCE), "-o", temporary, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise KernelUnavailable(f"{Path(compiler).name} failed: {last}")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _bind(library: ctypes.CDLL) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """The kernel function with its C signature (ctypes releases the GIL while it runs)."""
    function = library.eqprop_mlp_phase
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [i64, pointer, pointer, pointer, pointer, ctypes.c_double, i64, pointer, pointer,
                         i64, pointer, pointer, i64, i64, i64]
    function.restype = ctypes.c_int
    return function
