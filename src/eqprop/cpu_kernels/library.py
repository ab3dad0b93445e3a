"""Building and loading the C kernel: compiled once per machine with the system's C compiler.

The source ships inside the package; on first use it is compiled (about a
second) into the per-user cache folder ``$EQPROP_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/eqprop/kernels`` (``~/.cache/eqprop/kernels``), or where
that cannot be written a temporary folder that only this user may write,
one library per floating type. The file name holds a hash of the source,
the compiler command, its flags and the processor, so an
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
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..user_cache import user_cache_folder

SOURCE = Path(__file__).with_name("mlp_phase.c")
CACHE_ENV_VAR = "EQPROP_KERNEL_CACHE"
#: optimisation flags, tried in order: the first set the compiler accepts is used
FLAG_SETS = (["-O3", "-march=native", "-fno-trapping-math"], ["-O3", "-fno-trapping-math"])
_TYPE_FLAGS = {torch.float32: [], torch.float64: ["-DEQPROP_DOUBLE"]}


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (the message says why)."""


@dataclass(frozen=True)
class Kernel:
    """The built library's entry points, with their C signatures (ctypes releases the GIL
    while they run); see mlp_phase.c for what each computes."""

    phase: ctypes._CFuncPtr   # type: ignore[name-defined]  # eqprop_mlp_phase: a whole phase
    linear: ctypes._CFuncPtr  # type: ignore[name-defined]  # eqprop_linear: x W^T + b
    outer: ctypes._CFuncPtr   # type: ignore[name-defined]  # eqprop_outer: alpha left^T right
    continual: ctypes._CFuncPtr  # type: ignore[name-defined]  # eqprop_continual_phase: C-EP/C-VF's nudged phase


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The floating types the kernel is built for."""
    return tuple(_TYPE_FLAGS)


def kernel_reads(tensors: Iterable[Tensor]) -> bool:
    """Whether the kernel can read these tensors as they are: all on the CPU, in one floating
    type it is built for, and no CPU autocast to honour."""
    tensors = list(tensors)
    dtype = tensors[0].dtype
    return (dtype in _TYPE_FLAGS and not torch.is_autocast_enabled("cpu")
            and all(t.is_cpu and t.dtype == dtype for t in tensors))


def check_status(status: int) -> None:
    """Raise if a kernel call reports that its scratch memory could not be allocated."""
    if status:
        raise MemoryError("eqprop's C kernel could not allocate its scratch memory")


def cache_folder() -> Path:
    """Where built kernels are kept: ``$EQPROP_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/eqprop/kernels``
    (``~/.cache/eqprop/kernels``)."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    return Path(from_env).expanduser() if from_env else user_cache_folder("kernels")


def load_kernel(dtype: torch.dtype) -> Kernel:
    """The kernel for ``dtype`` (float32 or float64), built if needed.

    Raises :class:`KernelUnavailable`. Successes and failures are both kept for
    the process (:func:`forget_loaded_kernels` forgets them), so a machine
    without a compiler pays for the attempt once.
    """
    if dtype not in _TYPE_FLAGS:
        raise KernelUnavailable(f"the C kernel is built for float32 and float64, not {dtype}")
    outcome = _load_or_reason(dtype)
    if isinstance(outcome, str):
        raise KernelUnavailable(outcome)
    return outcome


@lru_cache(maxsize=None)
def _load_or_reason(dtype: torch.dtype) -> Kernel | str:
    """The loaded kernel, or why it could not be built (returned, not raised, so it is cached)."""
    command = shlex.split(os.environ.get("CC", ""))
    if not command:
        found = next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)
        if found is None:
            return "no C compiler found (set CC, or install gcc or clang)"
        command = [found]
    elif shutil.which(command[0]) is None:
        return f"the C compiler {command[0]!r} named by CC was not found"
    try:
        folder = _build_folder()
    except KernelUnavailable as error:
        return str(error)
    errors = []
    for flags in FLAG_SETS:
        flags = flags + _TYPE_FLAGS[dtype]
        path = folder / f"mlp_phase-{_build_key(command, flags)}.so"
        try:
            if not path.exists():
                _compile(command, flags, path)
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, AttributeError, subprocess.SubprocessError, KernelUnavailable) as error:
            errors.append(f"{' '.join(flags)}: {error}")
    return "could not build the C kernel: " + "; ".join(errors)


def forget_loaded_kernels() -> None:
    """Forget what :func:`load_kernel` found (after changing ``CC`` or the cache folder)."""
    _load_or_reason.cache_clear()


def _build_folder() -> Path:
    """The cache folder, created if needed; where it cannot be written (or there is no home
    folder), a private per-user temporary folder, refused unless this user alone can write it."""
    try:
        folder = cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, RuntimeError):  # RuntimeError: no home folder to expand
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    folder = Path(tempfile.gettempdir()) / f"eqprop-kernels-{user}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        status = folder.lstat()
    except OSError as error:
        raise KernelUnavailable(f"no folder to build the C kernel in ({error})") from None
    owned = not hasattr(os, "getuid") or status.st_uid == os.getuid()
    if not stat.S_ISDIR(status.st_mode) or not owned or status.st_mode & 0o022:
        raise KernelUnavailable(f"{folder} is not a folder that only this user can write: not loading code from it")
    return folder


def _build_key(command: list[str], flags: list[str]) -> str:
    """A hash of everything the built library depends on."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*command, *flags, platform.machine(), platform.system(), _processor_fingerprint()):
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


def _compile(command: list[str], flags: list[str], path: Path) -> None:
    """Compile the source into ``path`` atomically (temporary name, then rename), readable by
    everyone who can read the folder (a shared cache)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".so")
    os.close(handle)
    try:
        compile_command = [*command, *flags, "-fPIC", "-shared", "-pthread", str(SOURCE), "-o", temporary, "-lm"]
        result = subprocess.run(compile_command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["(no message)"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise KernelUnavailable(f"{Path(command[0]).name} failed: {first_error.strip()}")
        os.chmod(temporary, 0o755)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _bind(library: ctypes.CDLL) -> Kernel:
    """The library's entry points with their C signatures."""
    pointer, i64, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    signatures = {
        "eqprop_mlp_phase": [i64, pointer, pointer, pointer, pointer, real, i64, pointer, pointer,
                             i64, i64, pointer, pointer, pointer, pointer, i64, i64, i64, real, i64, pointer,
                             pointer, i64],
        "eqprop_linear": [pointer, pointer, pointer, pointer, i64, i64, i64, i64],
        "eqprop_outer": [pointer, pointer, pointer, i64, i64, i64, real, i64],
        "eqprop_continual_phase": [i64, pointer, pointer, pointer, pointer, pointer, real, real, i64, pointer,
                                   pointer, i64, pointer, pointer, pointer, pointer, i64, i64, i64, pointer,
                                   pointer, pointer, real, pointer, pointer, pointer, i64],
    }
    functions = []
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = ctypes.c_int
        functions.append(function)
    return Kernel(*functions)
