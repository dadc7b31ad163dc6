"""Data loading for the training scripts: IDX reader/writer, MNIST folder, sklearn digits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from experiments.data import (
    MNIST_FILES,
    DatasetError,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
    write_idx,
)

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", IDX_DTYPES)
def test_idx_round_trip(tmp_path: Path, dtype: type, suffix: str) -> None:
    array = _sample(dtype, (3, 4, 5))
    path = tmp_path / f"data.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("shape", [(0, 28, 28), (7,), ()])
def test_idx_round_trip_edge_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = _sample(np.uint8, shape)
    write_idx(tmp_path / "x", array)
    back = read_idx(tmp_path / "x")
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_layout_is_lecuns(tmp_path: Path) -> None:
    """The exact bytes of the MNIST format: magic 00 00 08 NN, big-endian sizes, C order."""
    write_idx(tmp_path / "u8", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8))
    assert (tmp_path / "u8").read_bytes() == bytes(
        [0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]
    )
    write_idx(tmp_path / "i32", np.array([1, -2], dtype=np.int32))
    assert (tmp_path / "i32").read_bytes() == bytes(
        [0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFE]
    )


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _valid_bytes() -> bytes:
    return bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4])


CORRUPTIONS = {
    "empty": (b"", "only 0 bytes"),
    "bad magic": (b"\x12\x34" + _valid_bytes()[2:], "magic number"),
    "unknown type": (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 9]), "unknown element type 0x07"),
    "truncated header": (_valid_bytes()[:9], "truncated IDX header"),
    "truncated data": (_valid_bytes()[:-1], "truncated IDX file"),
    "trailing bytes": (_valid_bytes() + b"\x00", "trailing bytes"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_read_idx_corrupt_names_the_path(tmp_path: Path, name: str) -> None:
    content, expected = CORRUPTIONS[name]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "content", [_valid_bytes(), gzip.compress(_valid_bytes() * 50)[:-12]], ids=["not gzip", "cut"]
)
def test_read_idx_bad_gzip(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="cannot read file") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found") as info:
        read_idx(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"


# --------------------------------------------------------------------------------------------
# MNIST folder
# --------------------------------------------------------------------------------------------


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    """Writes MNIST-shaped IDX files; training files compressed when ``gz``, test files plain."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        suffix = ".gz" if gz and key.startswith("train") else ""
        write_idx(folder / (MNIST_FILES[key] + suffix), array)
    return arrays


def test_load_mnist(tmp_path: Path) -> None:
    arrays = write_fake_mnist(tmp_path)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.num_features == 784
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(
        ds.x_train, arrays["train_images"].reshape(12, 784).astype(np.float32) / 255
    )
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.x_test * 255, arrays["test_images"].reshape(5, 784))
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1


def test_load_mnist_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data directory not found") as info:
        load_dataset("mnist", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)


def test_load_mnist_missing_file_names_it(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=False)
    (tmp_path / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(DatasetError, match="MNIST file not found") as info:
        load_mnist(tmp_path)
    assert info.value.path == tmp_path / MNIST_FILES["test_labels"]


def test_load_mnist_inconsistent_counts(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / MNIST_FILES["train_labels"], np.zeros(11, dtype=np.uint8))
    with pytest.raises(DatasetError, match="11 labels for 12 images") as info:
        load_mnist(tmp_path)
    assert info.value.path == tmp_path / MNIST_FILES["train_labels"]


def test_load_mnist_rejects_non_image_file(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / MNIST_FILES["test_images"], np.zeros((5, 784), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"expected images \[n, rows, cols\]"):
        load_mnist(tmp_path)


def test_load_mnist_rejects_out_of_range_labels(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / MNIST_FILES["test_labels"], np.full(5, 10, dtype=np.uint8))
    with pytest.raises(DatasetError, match="labels must be digits 0-9"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


def test_load_digits_split() -> None:
    pytest.importorskip("sklearn")
    ds = load_digits()
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Stratified: every class holds 1797/10 * 0.2 ~ 36 test images, give or take one.
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The split does not depend on anything but split_seed.
    again = load_digits()
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    np.testing.assert_array_equal(again.y_train, ds.y_train)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_load_mnist_rejects_empty_image_file(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / MNIST_FILES["test_images"], np.zeros((0, 28, 28), dtype=np.uint8))
    with pytest.raises(DatasetError, match="holds no images"):
        load_mnist(tmp_path)
