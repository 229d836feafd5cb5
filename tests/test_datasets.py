"""The embedded digits and the MNIST IDX reader (on small IDX files written here)."""

import gzip

import numpy as np
import pytest

from fundl import datasets


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def test_digits_embedded():
    images, labels = datasets.digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    assert sorted(np.unique(labels)) == list(range(10))
    raw, _ = datasets.digits(normalize=False)
    assert raw.dtype == np.uint8 and raw.max() == 16


def test_digits_split_is_fixed_80_20():
    (x_train, y_train), (x_test, y_test) = datasets.digits_split()
    assert len(x_train) == 1438 and len(x_test) == 359
    (x2, _), _ = datasets.digits_split()
    np.testing.assert_array_equal(x_train, x2)
    all_x = np.concatenate([x_train, x_test]).reshape(1797, -1)
    assert len(np.unique(all_x, axis=0)) == len(
        np.unique(datasets.digits()[0].reshape(1797, -1), axis=0)
    )


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_from_idx_files(tmp_path, suffix):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, 10, 5, dtype=np.uint8)
    x_test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    y_test = rng.integers(0, 10, 3, dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": x_train,
        "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": x_test,
        "t10k-labels-idx1-ubyte": y_test,
    }
    for stem, arr in files.items():
        write_idx(tmp_path / (stem + suffix), arr)
    (a, b), (c, d) = datasets.load_mnist(tmp_path)
    np.testing.assert_allclose(a, x_train / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(b, y_train)
    np.testing.assert_allclose(c, x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d, y_test)
    (raw, _), _ = datasets.load_mnist(tmp_path, normalize=False)
    np.testing.assert_array_equal(raw, x_train)


def test_load_idx_other_types(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "f.idx", arr, type_code=0x0D)
    out = datasets.load_idx(tmp_path / "f.idx")
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.float32


def test_load_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match=r"is not an IDX file"):
        datasets.load_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"needs 28\. The file is truncated or corrupted"):
        datasets.load_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte"):
        datasets.load_mnist(tmp_path)
