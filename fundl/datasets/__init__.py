"""Data sets that work offline: the embedded UCI digits and a reader for MNIST's IDX files.

Nothing here downloads anything. ``digits`` reads a copy of the UCI handwritten digits that
ships inside the package (see ``data/DIGITS_ATTRIBUTION.md``, CC BY 4.0); ``load_mnist``
reads the standard MNIST IDX files from a directory you give.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = ["Split", "digits", "digits_split", "train_test_split", "load_idx", "load_mnist"]


class Split(NamedTuple):
    """A train/test pair of ``(inputs, labels)`` tuples, as Keras's ``load_data``."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def digits(normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 UCI handwritten digits (8x8 pixels), embedded in the package.

    Args:
        normalize: scale pixels from ``0..16`` to ``[0, 1]`` as float32; ``False`` returns the
            raw uint8 values.

    Returns:
        ``(images, labels)``: images of shape ``(1797, 8, 8)`` and int32 labels of shape
        ``(1797,)`` with values ``0..9``.
    """
    path = resources.files(__name__).joinpath("data/digits.npz")
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"].astype(np.int32)
    if normalize:
        images = images.astype(np.float32) / np.float32(16.0)
    return images, labels


def train_test_split(
    inputs: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Shuffles examples with a fixed seed and splits off the last ``test_fraction``.

    Args:
        inputs: shape ``(n, ...)``.
        labels: shape ``(n, ...)``.
        test_fraction: the share of examples held out, in ``(0, 1)``.
        seed: the NumPy seed of the shuffle; the same seed gives the same split.

    Returns:
        A :class:`Split` ``((x_train, y_train), (x_test, y_test))``.
    """
    if len(inputs) != len(labels):
        raise ValueError(
            f"train_test_split: inputs have {len(inputs)} examples but labels {len(labels)}."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split: test_fraction must be in (0, 1), got {test_fraction}.")
    order = np.random.default_rng(seed).permutation(len(inputs))
    n_test = round(len(inputs) * test_fraction)
    train, test = order[:-n_test], order[-n_test:]
    return Split((inputs[train], labels[train]), (inputs[test], labels[test]))


def digits_split(normalize: bool = True) -> Split:
    """The digits with fundl's fixed 80/20 split: 1,438 training and 359 held-out examples.

    Args:
        normalize: as in :func:`digits`.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, images ``(n, 8, 8)``, labels ``(n,)``.
    """
    return train_test_split(*digits(normalize), test_fraction=0.2, seed=0)


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (the format of the MNIST files), gzipped or not.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        The array stored in the file, with its stored shape and dtype (native byte order).

    Raises:
        ValueError: if the file is not a valid IDX file (bad magic number, unknown type,
            size that does not match the header).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"load_idx: {path} is not an IDX file (its first bytes are {raw[:4]!r}; expected "
            f"0x00 0x00, a type code in {sorted(_IDX_DTYPES)} and the number of dimensions)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"load_idx: {path} holds {len(raw)} bytes, but its header (shape {shape}, "
            f"{dtype}) needs {expected}. The file is truncated or corrupted."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def load_mnist(directory: str | os.PathLike[str], normalize: bool = True) -> Split:
    """Reads MNIST (or Fashion-MNIST) from the four standard IDX files in ``directory``.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally ending in
    ``.gz``. Nothing is downloaded: fetch the files once yourself.

    Args:
        directory: the folder holding the files.
        normalize: scale pixels to float32 in ``[0, 1]``; ``False`` keeps uint8.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` with images ``(n, 28, 28)`` and int32
        labels ``(n,)``.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    arrays = {}
    for name, stem in _MNIST_FILES.items():
        candidates = [os.path.join(directory, stem + ext) for ext in ("", ".gz")]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise FileNotFoundError(
                f"load_mnist: no {stem} (or {stem}.gz) in {os.fspath(directory)!r}. Put the four "
                f"MNIST IDX files there: {', '.join(_MNIST_FILES.values())}."
            )
        arrays[name] = load_idx(found)
    images = {k: arrays[k] for k in ("x_train", "x_test")}
    if normalize:
        images = {k: v.astype(np.float32) / np.float32(255.0) for k, v in images.items()}
    return Split(
        (images["x_train"], arrays["y_train"].astype(np.int32)),
        (images["x_test"], arrays["y_test"].astype(np.int32)),
    )
