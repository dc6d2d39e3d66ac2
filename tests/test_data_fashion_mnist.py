"""Fashion-MNIST: IDX parsing and validation, where the files come from, the real package."""
from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen import idx_bytes, make_fashion_mnist_dir
from imgflow.data import fashion_mnist, load_dataset
from imgflow.errors import UserError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMGFLOW_FASHION_MNIST", raising=False)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a.gz", ndim=3), array)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a", ndim=3), array)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b"\x00\x00\x0d" + b[3:], "magic number 00000d03, expected 00000803"),  # float type
    (lambda b: b[:3] + b"\x01" + b[4:], "magic number 00000801"),  # labels file as images
    (lambda b: b"\x1f\x8b" + b[2:], "cannot read IDX file"),  # broken gzip
    (lambda b: b[:-1], "promises 24 data bytes for shape \\(2, 3, 4\\), the file holds 23"),
    (lambda b: b + b"\x00", "the file holds 25"),
    (lambda b: b[:9], "header is truncated"),
])
def test_read_idx_refuses_bad_files(tmp_path, mangle, message):
    path = tmp_path / "bad"
    path.write_bytes(mangle(idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))))
    with pytest.raises(UserError, match=message):
        fashion_mnist.read_idx(path, ndim=3)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_read_idx_never_fails_with_anything_but_a_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(data)
    try:
        array = fashion_mnist.read_idx(path, ndim=2)
    except UserError:
        return
    assert array.ndim == 2 and array.dtype == np.uint8


def test_load_from_env_directory(tmp_path, monkeypatch):
    folder = make_fashion_mnist_dir(tmp_path / "fm", n_train=20, n_test=10)
    monkeypatch.setenv("IMGFLOW_FASHION_MNIST", str(folder))
    ds = load_dataset("fashion-mnist", progress=False)
    assert ds.name == "fashion-mnist" and ds.source == str(folder)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot" and len(ds.classes) == 10
    assert ds.train.images.shape == (20, 28, 28, 1) and ds.test.images.shape == (10, 28, 28, 1)
    assert ds.train.labels.tolist() == [i % 10 for i in range(20)]
    assert len(ds.sha256) == 64


def test_uncompressed_files_are_accepted(tmp_path, monkeypatch):
    folder = make_fashion_mnist_dir(tmp_path / "fm", compress=False)
    monkeypatch.setenv("IMGFLOW_FASHION_MNIST", str(folder))
    assert len(load_dataset("fashion-mnist", progress=False).train) == 20


def test_count_mismatch_and_bad_labels(tmp_path, monkeypatch):
    folder = make_fashion_mnist_dir(tmp_path / "fm", n_train=20)
    monkeypatch.setenv("IMGFLOW_FASHION_MNIST", str(folder))
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(19, dtype=np.uint8))))
    with pytest.raises(UserError, match="20 images but .* 19 labels"):
        load_dataset("fashion-mnist", progress=False)
    labels.write_bytes(gzip.compress(idx_bytes(np.full(20, 10, dtype=np.uint8))))
    with pytest.raises(UserError, match="labels outside 0..9"):
        load_dataset("fashion-mnist", progress=False)


def test_env_pointing_nowhere_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGFLOW_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="IMGFLOW_FASHION_MNIST"):
        load_dataset("fashion-mnist", progress=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("IMGFLOW_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="has no train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", progress=False)


def test_download_when_no_local_copy(tmp_path, monkeypatch):
    mirror = make_fashion_mnist_dir(tmp_path / "mirror")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-such-dir")
    monkeypatch.setattr(fashion_mnist, "URL_BASE", mirror.resolve().as_uri() + "/")
    files = {key: (stem, hashlib.md5((mirror / f"{stem}.gz").read_bytes()).hexdigest())
             for key, (stem, _) in fashion_mnist.FILES.items()}
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    ds = load_dataset("fashion-mnist", progress=False)
    assert len(ds.train) == 20
    assert (tmp_path / "cache" / "downloads" / "t10k-labels-idx1-ubyte.gz").is_file()


@pytest.mark.realdata
def test_real_fashion_mnist():
    if not fashion_mnist.SYSTEM_DIR.is_dir():
        pytest.skip("apt-get install -y dataset-fashion-mnist to run this test")
    ds = load_dataset("fashion-mnist", progress=False)
    assert ds.classes == fashion_mnist.CLASSES
    assert ds.image_shape == (28, 28, 1)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
