"""Fetch the official MNIST and CIFAR-10 files into a data root and verify them.

Every file is downloaded into a temporary file in its destination folder,
checked against its published checksum, and only then renamed into place, so
a failed or interrupted download leaves no file under a dataset name. Files
already present and valid are not fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from tqdm import tqdm

from eqprop.data.cifar10 import CIFAR10_DIR, CIFAR10_SHA1, decode_cifar10_batch, read_cifar10_file
from eqprop.data.errors import DataError
from eqprop.atomic import atomic_write_path
from eqprop.data.files import ContentError, gunzip
from eqprop.data.mnist import MNIST_DIR, MNIST_FILES, decode_mnist, read_mnist_file

log = logging.getLogger(__name__)

MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE_DIR = "cifar-10-batches-bin"
TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


def fetch(url: str, out: BinaryIO) -> None:
    """Stream the body of ``url`` into ``out``; any network failure becomes a one-line DataError."""
    try:
        with urlopen(url, timeout=TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size and size.isdigit() else None, unit="B", unit_scale=True,
                      desc=url.rsplit("/", 1)[-1], leave=False, disable=None) as bar:  # a bar on terminals only
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, HTTPException) as error:
        raise DataError(f"could not download {url}: {_describe(error)}") from None


def _describe(error: BaseException) -> str:
    """One line saying why a download failed."""
    reason = error.reason if isinstance(error, URLError) and not isinstance(error, HTTPError) else error
    return " ".join(str(reason).split()) or type(error).__name__


@contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """Create ``folder``, and report any file-system failure while writing into it as a DataError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as error:
        raise DataError(
            f"cannot write dataset files into {folder}: {error.strerror or error}: "
            "point --data-dir at a writable folder"
        ) from None


def _is_valid(read: Callable[[Path, str], object], folder: Path, name: str) -> bool:
    """Whether ``read(folder, name)`` finds the file present and intact."""
    try:
        read(folder, name)
    except DataError:
        return False
    return True


def download_mnist(root: Path) -> None:
    """Make sure ``root/mnist/`` holds the four verified MNIST files, fetching those missing or invalid."""
    folder = root / MNIST_DIR
    with _writing_into(folder):
        for name in MNIST_FILES:
            if not _is_valid(read_mnist_file, folder, name):
                _download_mnist_file(folder, name)


def _download_mnist_file(folder: Path, name: str) -> None:
    """Fetch ``name.gz`` from the first mirror that serves a valid copy, and install it."""
    target = folder / f"{name}.gz"
    failures = []
    for mirror in MNIST_MIRRORS:
        url = mirror + target.name
        log.info("downloading %s", url)
        try:
            with atomic_write_path(target) as temporary:
                with temporary.open("wb") as out:
                    fetch(url, out)
                decode_mnist(gunzip(temporary.read_bytes()), name)
        except DataError as error:
            failures.append(str(error))
        except ContentError as error:
            failures.append(f"{url} {error}")
        else:
            # A damaged plain copy would shadow the new .gz file when loading.
            (folder / name).unlink(missing_ok=True)
            return
    raise DataError(f"could not download MNIST file {target.name}: " + "; ".join(failures))


def download_cifar10(root: Path) -> None:
    """Make sure ``root/cifar10/`` holds the six verified batch files.

    If any is missing or invalid, the official binary archive is fetched to a
    temporary file, checked against its md5, and the missing files are read
    out of it by their exact member names (nothing else in the archive is
    touched, so no member can write outside the folder).
    """
    folder = root / CIFAR10_DIR
    wanted = [name for name in CIFAR10_SHA1 if not _is_valid(read_cifar10_file, folder, name)]
    if not wanted:
        return
    log.info("downloading %s", CIFAR10_URL)
    with _writing_into(folder), tempfile.NamedTemporaryFile(
        dir=folder, prefix=".cifar-10-binary.", suffix=".part"
    ) as archive:
        fetch(CIFAR10_URL, archive)
        archive.seek(0)
        if _md5_of_stream(archive) != CIFAR10_ARCHIVE_MD5:
            raise DataError(f"could not download {CIFAR10_URL}: the archive is corrupt (md5 mismatch)")
        archive.seek(0)
        _install_from_archive(archive, folder, wanted)


def _md5_of_stream(stream: BinaryIO) -> str:
    """md5 of the rest of ``stream``, read in chunks so a large archive never sits in memory whole."""
    digest = hashlib.md5()
    while chunk := stream.read(_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _install_from_archive(archive: BinaryIO, folder: Path, names: list[str]) -> None:
    """Verify and install the batch files ``names`` from the archive, in one pass over it."""
    members = {f"{CIFAR10_ARCHIVE_DIR}/{name}": name for name in names}
    installed = set()
    try:
        with tarfile.open(fileobj=archive, mode="r|gz") as tar:
            for member in tar:
                name = members.get(member.name)
                if name is None:
                    continue
                if not member.isfile():
                    raise DataError(
                        f"the CIFAR-10 archive from {CIFAR10_URL}: {member.name} is not a regular file"
                    )
                _install_cifar10_file(tar.extractfile(member).read(), folder, name)
                installed.add(name)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise DataError(f"could not extract the CIFAR-10 archive from {CIFAR10_URL}: {error}") from None
    missing = sorted(set(names) - installed)
    if missing:
        raise DataError(f"the CIFAR-10 archive from {CIFAR10_URL} lacks {', '.join(missing)}")


def _install_cifar10_file(content: bytes, folder: Path, name: str) -> None:
    """Verify one batch file taken from the archive and write it atomically as ``folder/name``."""
    try:
        decode_cifar10_batch(content, name)
    except ContentError as error:
        raise DataError(f"CIFAR-10 archive member {CIFAR10_ARCHIVE_DIR}/{name} {error}") from None
    with atomic_write_path(folder / name) as temporary:
        temporary.write_bytes(content)
    # A damaged compressed copy must not be left beside the new plain file.
    (folder / f"{name}.gz").unlink(missing_ok=True)
