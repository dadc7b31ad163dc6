"""Datasets for the training scripts: scikit-learn's 8x8 digits (offline) and MNIST IDX files.

Every loader returns a :class:`Dataset` of flat ``float32`` images scaled to ``[0, 1]`` and
``int32`` class labels, so the model code never cares where the numbers came from.

Anything wrong with the data on disk (a missing directory or file, a truncated or corrupt
IDX file, a bad gzip stream, inconsistent image and label counts) raises
:class:`DatasetError`, whose one-line message starts with the offending path; the scripts
print that line and exit non-zero instead of showing a traceback.

The IDX format (LeCun's MNIST distribution) is a 4-byte magic number ``00 00 TT NN`` (``TT``
the element type, ``NN`` the number of dimensions), ``NN`` big-endian ``uint32`` sizes, then
the elements in big-endian C order. Files may be gzip-compressed; the reader and the writer
decide by the ``.gz`` suffix.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Dataset",
    "DatasetError",
    "MNIST_FILES",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
    "write_idx",
]

PathLike = str | os.PathLike[str]


class DatasetError(Exception):
    """The data on disk is missing or unreadable. The message is one line naming the path."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Dataset:
    """A train/test split of flat images and integer labels.

    Attributes:
      name: a short name for logs and metrics (``"digits"``, ``"mnist"``).
      x_train, x_test: ``float32`` arrays ``[n, features]`` with values in ``[0, 1]``.
      y_train, y_test: ``int32`` arrays ``[n]`` of class indices in ``[0, num_classes)``.
      num_classes: the number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def __post_init__(self) -> None:
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(
                    f"{self.name} {split} split: expected x [n, features] and y [n] with n > 0,"
                    f" got x {x.shape} and y {y.shape}"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"{self.name}: train and test images have different sizes")


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (no download).

    The split is stratified by class and fixed by ``split_seed`` alone, independently of the
    training seed, so runs with different seeds are scored on the same test images. Pixel
    values (0 to 16) are divided by 16.

    Args:
      test_fraction: share of the examples held out for testing (default 20%: 360 images).
      split_seed: seed of the train/test split.
    """
    # Imported here: scikit-learn is an optional extra (``softmax_jax[scripts]``).
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {dt.newbyteorder("="): code for code, dt in _IDX_TYPES.items()}


def _is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DatasetError(path, "file not found")
    if not path.is_file():
        raise DatasetError(path, "not a regular file")
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated stream is an EOFError.
        detail = str(exc).replace("\n", " ") or type(exc).__name__
        raise DatasetError(path, f"cannot read file ({detail})") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file (plain, or gzip-compressed when the name ends in ``.gz``).

    Returns:
      The array, in the file's shape and native byte order (``uint8`` for MNIST).

    Raises:
      DatasetError: the file is missing, not gzip when named ``.gz``, has a bad magic number,
        an unknown type code, or a byte count that does not match its header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(path, f"not an IDX file (only {len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise DatasetError(
            path, f"not an IDX file (magic number starts with {raw[:2].hex()}, expected 0000)"
        )
    if type_code not in _IDX_TYPES:
        raise DatasetError(path, f"not an IDX file (unknown element type 0x{type_code:02x})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(path, f"truncated IDX header ({len(raw)} of {header_len} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = header_len + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "trailing bytes in"
        raise DatasetError(
            path, f"{kind} IDX file: header says shape {shape}, so {expected} bytes, got {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Supported dtypes: ``uint8``, ``int8``, ``int16``, ``int32``, ``float32``, ``float64``.
    The file is written to a temporary name and renamed, so a reader never sees half of it.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        supported = ", ".join(str(dt.newbyteorder("=")) for dt in _IDX_TYPES.values())
        raise TypeError(f"IDX cannot store dtype {array.dtype}; supported: {supported}")
    if array.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    if _is_gzip(path):
        # mtime=0 keeps the bytes reproducible for identical arrays.
        payload = gzip.compress(payload, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------

#: The four standard MNIST file names (each may also end in ``.gz``).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_mnist_file(data_dir: Path, name: str) -> Path:
    # Accept the plain and gzip names, and the "train-images.idx3-ubyte" spelling some mirrors
    # use, so that a directory unpacked from any common source just works.
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        path = data_dir / candidate
        if path.is_file():
            return path
    raise DatasetError(data_dir / name, "MNIST file not found (looked for it with and without .gz)")


def _images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim != 3:
        raise DatasetError(path, f"expected images [n, rows, cols], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DatasetError(path, f"expected uint8 pixels, got {images.dtype}")
    if images.shape[0] == 0:
        raise DatasetError(path, "holds no images")
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def _labels(path: Path, count: int, images_path: Path) -> np.ndarray:
    labels = read_idx(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(path, f"expected integer labels [n], got {labels.dtype} {labels.shape}")
    if labels.shape[0] != count:
        raise DatasetError(
            path, f"{labels.shape[0]} labels for {count} images in {images_path.name}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(path, f"labels must be digits 0-9, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int32)


def load_mnist(data_dir: PathLike) -> Dataset:
    """MNIST from the four standard IDX files in ``data_dir`` (plain or ``.gz``).

    Images become flat ``float32`` rows of 784 values in ``[0, 1]``.

    Raises:
      DatasetError: the directory or a file is missing, or a file is corrupt or inconsistent.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(data_dir, "data directory not found")
    paths = {key: _find_mnist_file(data_dir, name) for key, name in MNIST_FILES.items()}
    x_train = _images(paths["train_images"])
    y_train = _labels(paths["train_labels"], x_train.shape[0], paths["train_images"])
    x_test = _images(paths["test_images"])
    y_test = _labels(paths["test_labels"], x_test.shape[0], paths["test_images"])
    if x_train.shape[1] != x_test.shape[1]:
        raise DatasetError(
            paths["test_images"],
            f"test images have {x_test.shape[1]} pixels, training images {x_train.shape[1]}",
        )
    return Dataset("mnist", x_train, y_train, x_test, y_test, num_classes=10)


def load_dataset(name: str, data_dir: PathLike | None = None) -> Dataset:
    """Loads a dataset by name: ``"digits"`` or ``"mnist"`` (which needs ``data_dir``)."""
    if name == "digits":
        return load_digits()
    if name == "mnist":
        if data_dir is None:
            raise ValueError("the mnist dataset needs a data directory (--data-dir)")
        return load_mnist(data_dir)
    raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'mnist'")
