"""Downloading: verification, mirror fallback and atomic installation, with urlopen faked (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path
from urllib.error import HTTPError, URLError

import numpy as np
import pytest

from eqprop.data import DataError, load_dataset
from eqprop.data import download as download_module
from eqprop.data.cifar10 import CIFAR10_SHA1, RECORD_BYTES, RECORDS_PER_FILE
from eqprop.data.download import (
    CIFAR10_ARCHIVE_DIR,
    CIFAR10_URL,
    MNIST_MIRRORS,
    download_cifar10,
    download_mnist,
)
from eqprop.data.mnist import MNIST_FILES

PRIMARY, FALLBACK = MNIST_MIRRORS


class FakeWeb:
    """Stands in for urllib's urlopen: serves registered bytes or raises registered errors; logs requests."""

    def __init__(self) -> None:
        self.pages: dict[str, bytes | Exception] = {}
        self.requests: list[str] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.requests.append(url)
        page = self.pages.get(url, URLError("Name or service not known"))
        if isinstance(page, Exception):
            raise page
        response = io.BytesIO(page)
        response.headers = {"Content-Length": str(len(page))}  # as an http.client response has
        return response


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> FakeWeb:
    fake = FakeWeb()
    monkeypatch.setattr(download_module, "urlopen", fake)
    return fake


@pytest.fixture(scope="module")
def shared_mnist(data_root: Path) -> Path:
    """The real MNIST files of the shared data root."""
    return data_root / "mnist"


@pytest.fixture
def only_mnist_test_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Limit the downloader to the two small MNIST test files, to keep these tests fast."""
    names = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    monkeypatch.setattr(download_module, "MNIST_FILES", {name: MNIST_FILES[name] for name in names})
    return names


def serve_mnist(web: FakeWeb, shared_mnist: Path, mirror: str) -> None:
    for name in MNIST_FILES:
        web.pages[f"{mirror}{name}.gz"] = (shared_mnist / f"{name}.gz").read_bytes()


def test_mnist_download_installs_verified_files(tmp_path: Path, web: FakeWeb, shared_mnist: Path) -> None:
    serve_mnist(web, shared_mnist, PRIMARY)
    data = load_dataset("mnist", "test", tmp_path, download=True)
    installed = sorted(path.name for path in (tmp_path / "mnist").iterdir())
    assert installed == sorted(f"{name}.gz" for name in MNIST_FILES)
    assert web.requests == [f"{PRIMARY}{name}.gz" for name in MNIST_FILES]
    reference = load_dataset("mnist", "test", shared_mnist.parent)
    assert data.x.equal(reference.x) and data.y.equal(reference.y)


def test_mnist_download_falls_back_to_the_second_mirror(
    tmp_path: Path, web: FakeWeb, shared_mnist: Path, only_mnist_test_files: list[str]
) -> None:
    serve_mnist(web, shared_mnist, FALLBACK)
    web.pages[f"{PRIMARY}t10k-images-idx3-ubyte.gz"] = HTTPError(PRIMARY, 503, "Unavailable", {}, None)
    download_mnist(tmp_path)  # the primary mirror fails differently for the images and the labels
    expected = [f"{mirror}{name}.gz" for name in only_mnist_test_files for mirror in MNIST_MIRRORS]
    assert web.requests == expected
    load_dataset("mnist", "test", tmp_path)


def test_valid_files_are_not_fetched_again(
    tmp_path: Path, web: FakeWeb, shared_mnist: Path, only_mnist_test_files: list[str]
) -> None:
    serve_mnist(web, shared_mnist, PRIMARY)
    download_mnist(tmp_path)
    web.requests.clear()
    download_mnist(tmp_path)
    assert web.requests == []


def test_damaged_local_file_is_replaced(
    tmp_path: Path, web: FakeWeb, shared_mnist: Path, only_mnist_test_files: list[str]
) -> None:
    serve_mnist(web, shared_mnist, PRIMARY)
    download_mnist(tmp_path)
    damaged = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"  # a plain copy shadows the .gz when loading
    damaged.write_bytes(b"not an IDX file")
    web.requests.clear()
    download_mnist(tmp_path)
    assert web.requests == [f"{PRIMARY}t10k-labels-idx1-ubyte.gz"]
    assert not damaged.exists()
    load_dataset("mnist", "test", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte"])
def test_corrupt_download_leaves_nothing_behind(
    tmp_path: Path, web: FakeWeb, shared_mnist: Path, only_mnist_test_files: list[str], damage: str
) -> None:
    serve_mnist(web, shared_mnist, PRIMARY)
    payload = (shared_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes()
    if damage == "truncated":
        payload, problem = payload[:-10], "is not a valid gzip file (truncated or damaged)"
    else:
        content = bytearray(gzip.decompress(payload))
        content[500] = (content[500] + 1) % 10
        payload, problem = gzip.compress(bytes(content)), "is corrupt (md5 mismatch)"
    for mirror in MNIST_MIRRORS:
        web.pages[f"{mirror}t10k-labels-idx1-ubyte.gz"] = payload
    with pytest.raises(DataError) as caught:
        download_mnist(tmp_path)
    assert str(caught.value) == (
        "could not download MNIST file t10k-labels-idx1-ubyte.gz: "
        f"{PRIMARY}t10k-labels-idx1-ubyte.gz {problem}; {FALLBACK}t10k-labels-idx1-ubyte.gz {problem}"
    )
    assert [path.name for path in (tmp_path / "mnist").iterdir()] == ["t10k-images-idx3-ubyte.gz"]


def test_network_errors_become_one_line_data_errors(tmp_path: Path, web: FakeWeb) -> None:
    web.pages[f"{PRIMARY}train-images-idx3-ubyte.gz"] = HTTPError(PRIMARY, 404, "Not Found", {}, None)
    web.pages[f"{FALLBACK}train-images-idx3-ubyte.gz"] = TimeoutError("timed out")
    with pytest.raises(DataError) as caught:
        download_mnist(tmp_path)
    assert str(caught.value) == (
        "could not download MNIST file train-images-idx3-ubyte.gz: "
        f"could not download {PRIMARY}train-images-idx3-ubyte.gz: HTTP Error 404: Not Found; "
        f"could not download {FALLBACK}train-images-idx3-ubyte.gz: timed out"
    )
    assert list((tmp_path / "mnist").iterdir()) == []


def synthetic_batch() -> bytes:
    """A well-formed CIFAR-10 batch file with cheap content (labels cycle, pixels follow the label)."""
    records = np.zeros((RECORDS_PER_FILE, RECORD_BYTES), np.uint8)
    records[:, 0] = np.arange(RECORDS_PER_FILE) % 10
    records[:, 1:] = records[:, :1] * 20
    return records.tobytes()


def tar_gz(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def serve_archive(web: FakeWeb, monkeypatch: pytest.MonkeyPatch, archive: bytes) -> None:
    web.pages[CIFAR10_URL] = archive
    monkeypatch.setattr(download_module, "CIFAR10_ARCHIVE_MD5", hashlib.md5(archive).hexdigest())


FEW_CIFAR10_FILES = ("data_batch_1.bin", "test_batch.bin")


@pytest.fixture
def synthetic_cifar(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Make the synthetic batch the expected content of every CIFAR-10 file.

    To keep the tests fast, the downloader is also limited to FEW_CIFAR10_FILES.
    """
    content = synthetic_batch()
    sha1 = hashlib.sha1(content).hexdigest()
    for name in CIFAR10_SHA1:
        monkeypatch.setitem(CIFAR10_SHA1, name, sha1)
    monkeypatch.setattr(download_module, "CIFAR10_SHA1", {name: sha1 for name in FEW_CIFAR10_FILES})
    return content


def archive_members(content: bytes) -> dict[str, bytes]:
    """The archive entries of FEW_CIFAR10_FILES, each holding ``content``."""
    return {f"{CIFAR10_ARCHIVE_DIR}/{name}": content for name in FEW_CIFAR10_FILES}


def test_cifar10_download_extracts_only_the_expected_members(
    tmp_path: Path, web: FakeWeb, monkeypatch: pytest.MonkeyPatch, synthetic_cifar: bytes
) -> None:
    members = archive_members(synthetic_cifar)
    members[f"{CIFAR10_ARCHIVE_DIR}/../../escaped.bin"] = b"must not be written"
    members[f"{CIFAR10_ARCHIVE_DIR}/batches.meta.txt"] = b"airplane\n"
    serve_archive(web, monkeypatch, tar_gz(members))
    root = tmp_path / "root"
    data = load_dataset("cifar10", "test", root, download=True)
    written = sorted(path.name for path in tmp_path.rglob("*"))
    assert written == sorted(["root", "cifar10", *FEW_CIFAR10_FILES])
    assert data.y.bincount().tolist() == [1000] * 10
    assert data.x[:, :, 0, 0].flatten().equal(data.y.repeat_interleave(3).to(data.x.dtype) * 20)
    web.requests.clear()
    download_cifar10(root)
    assert web.requests == []


def test_corrupt_cifar10_archive_leaves_nothing_behind(
    tmp_path: Path, web: FakeWeb, synthetic_cifar: bytes
) -> None:
    web.pages[CIFAR10_URL] = tar_gz(archive_members(synthetic_cifar))  # md5 differs from the official one
    with pytest.raises(DataError) as caught:
        download_cifar10(tmp_path)
    assert str(caught.value) == f"could not download {CIFAR10_URL}: the archive is corrupt (md5 mismatch)"
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_cifar10_member_failing_its_checksum_is_not_installed(
    tmp_path: Path, web: FakeWeb, monkeypatch: pytest.MonkeyPatch, synthetic_cifar: bytes
) -> None:
    members = archive_members(synthetic_cifar)
    members[f"{CIFAR10_ARCHIVE_DIR}/test_batch.bin"] = synthetic_cifar[:-1] + b"\x01"
    serve_archive(web, monkeypatch, tar_gz(members))
    with pytest.raises(DataError) as caught:
        download_cifar10(tmp_path)
    assert str(caught.value) == (
        f"CIFAR-10 archive member {CIFAR10_ARCHIVE_DIR}/test_batch.bin is corrupt (sha1 mismatch)"
    )
    assert [path.name for path in (tmp_path / "cifar10").iterdir()] == ["data_batch_1.bin"]


def test_cifar10_link_members_are_refused(
    tmp_path: Path, web: FakeWeb, monkeypatch: pytest.MonkeyPatch, synthetic_cifar: bytes
) -> None:
    serve_archive(web, monkeypatch, tar_gz({}, links=(f"{CIFAR10_ARCHIVE_DIR}/data_batch_1.bin",)))
    with pytest.raises(DataError, match="cifar-10-batches-bin/data_batch_1.bin is not a regular file"):
        download_cifar10(tmp_path)
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_cifar10_archive_missing_members_is_reported(
    tmp_path: Path, web: FakeWeb, monkeypatch: pytest.MonkeyPatch, synthetic_cifar: bytes
) -> None:
    serve_archive(web, monkeypatch, tar_gz({f"{CIFAR10_ARCHIVE_DIR}/test_batch.bin": synthetic_cifar}))
    with pytest.raises(DataError) as caught:
        download_cifar10(tmp_path)
    assert str(caught.value) == f"the CIFAR-10 archive from {CIFAR10_URL} lacks data_batch_1.bin"
    assert [path.name for path in (tmp_path / "cifar10").iterdir()] == ["test_batch.bin"]


def test_damaged_archive_with_matching_checksum_is_reported(
    tmp_path: Path, web: FakeWeb, monkeypatch: pytest.MonkeyPatch, synthetic_cifar: bytes
) -> None:
    serve_archive(web, monkeypatch, tar_gz(archive_members(synthetic_cifar))[:-5000])
    with pytest.raises(DataError, match=f"^could not extract the CIFAR-10 archive from {CIFAR10_URL}: "):
        download_cifar10(tmp_path)
    # the first member lies wholly before the damage and passed its own sha1 check
    assert [path.name for path in (tmp_path / "cifar10").iterdir()] == ["data_batch_1.bin"]


def test_unwritable_data_root_is_reported(tmp_path: Path, web: FakeWeb) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(DataError) as caught:
        download_mnist(not_a_folder)
    message = str(caught.value)
    assert message.startswith(f"cannot write dataset files into {not_a_folder / 'mnist'}: ")
    assert message.endswith(": point --data-dir at a writable folder")
    assert web.requests == []
