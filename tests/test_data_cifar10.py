"""CIFAR-10: the official python format, its restricted unpickler, the download, the real copy."""
from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from datagen import CIFAR_LABEL_NAMES, cifar_batch, make_cifar_archive
from imgflow.data import cifar10, load_dataset
from imgflow.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMGFLOW_CIFAR10", raising=False)


def test_official_archive_parses_to_hwc_images_in_label_order(tmp_path):
    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz", per_batch=4, test_size=5)
    ds = load_dataset(str(archive), progress=False)

    assert ds.classes == CIFAR_LABEL_NAMES
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.test.images.shape == (5, 32, 32, 3)
    # Batches 1..5 in order, each (N, 3072) of R, G, B planes -> (N, 32, 32, 3).
    expected = [cifar_batch(4, seed=i) for i in range(1, 6)]
    want = np.concatenate([b[b"data"] for b in expected]).reshape(20, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.train.images, want)
    assert ds.train.labels.tolist() == sum((b[b"labels"] for b in expected), [])
    assert ds.train.labels.dtype == np.int64
    assert ds.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert ds.name == "cifar-10-python"


def test_image_size_resizes_fixed_size_sources(tmp_path):
    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    ds = load_dataset(str(archive), image_size=(16, 24), progress=False)
    assert ds.train.images.shape == (20, 16, 24, 3) and ds.test.images.shape == (5, 16, 24, 3)
    assert load_dataset(str(archive), progress=False).image_shape == (32, 32, 3)  # own entry


def test_cifar10_spec_uses_the_env_stand_in(tmp_path, monkeypatch):
    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setenv("IMGFLOW_CIFAR10", str(archive))
    ds = load_dataset("cifar10", progress=False)
    assert ds.name == "cifar10" and ds.source == str(archive)
    assert len(ds.train) == 20


def test_extracted_batches_directory(tmp_path):
    import tarfile

    archive = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    ds = load_dataset(str(tmp_path / "x"), progress=False)
    assert ds.classes == CIFAR_LABEL_NAMES and len(ds.train) == 20 and len(ds.test) == 5


def test_missing_batch_is_a_user_error(tmp_path):
    import io
    import tarfile

    path = tmp_path / "partial.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in ("data_batch_1", "batches.meta"):
            data = pickle.dumps({b"label_names": []} if name == "batches.meta" else cifar_batch(2, 0), protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="missing data_batch_2"):
        load_dataset(str(path), progress=False)


# ----------------------------------------------------------------------------------------------
# hostile pickles


class _Payload:
    """Unpickling this calls `func(*args)`: what a hostile 'CIFAR batch' would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _hostile_payloads(marker)[kind], b"labels": []}, protocol=2)

    # The payload is real: plain pickle would run it (checked on a second marker).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_hostile_payloads(probe)[kind], protocol=2))
    assert probe.exists(), "the test payload should be effective under plain pickle"

    archive = make_cifar_archive(tmp_path / "evil.tar.gz", overrides={"data_batch_1": payload})
    with pytest.raises(UserError, match="is not allowed"):
        load_dataset(str(archive), progress=False)
    assert not marker.exists(), "the hostile pickle ran code"


def test_restricted_unpickler_admits_only_array_reconstruction():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    obj = cifar10.restricted_loads(pickle.dumps({b"data": array, b"labels": [1, 2]}, protocol=2))
    np.testing.assert_array_equal(obj[b"data"], array)
    with pytest.raises(UserError, match="getattr' is not allowed"):
        cifar10.restricted_loads(pickle.dumps(_Payload(getattr, "text", "upper"), protocol=2))
    with pytest.raises(UserError, match="cannot read"):
        cifar10.restricted_loads(b"\x80\x02}q\x00(")  # truncated stream


# ----------------------------------------------------------------------------------------------
# download


def _file_url(path: Path) -> str:
    return path.resolve().as_uri()


def test_download_verifies_md5_and_writes_atomically(tmp_path):
    archive = make_cifar_archive(tmp_path / "src.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest_dir = tmp_path / "downloads"

    path = cifar10.download_cifar10(dest_dir, progress=False, url=_file_url(archive), md5=md5)
    assert path == dest_dir / cifar10.ARCHIVE_NAME
    assert path.read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in dest_dir.iterdir()) == [cifar10.ARCHIVE_NAME]  # no temp left


def test_download_with_wrong_md5_leaves_nothing(tmp_path):
    archive = make_cifar_archive(tmp_path / "src.tar.gz")
    dest_dir = tmp_path / "downloads"
    with pytest.raises(UserError, match="checksum mismatch"):
        cifar10.download_cifar10(dest_dir, progress=False, url=_file_url(archive), md5="0" * 32)
    assert list(dest_dir.iterdir()) == []


def test_download_failure_is_a_user_error_with_a_hint(tmp_path):
    with pytest.raises(UserError, match="could not download .*IMGFLOW_CIFAR10"):
        cifar10.download_cifar10(tmp_path, progress=False, url=_file_url(tmp_path / "absent"),
                                 md5="0" * 32)


def test_cifar10_without_env_downloads_into_the_cache(tmp_path, monkeypatch):
    archive = make_cifar_archive(tmp_path / "src.tar.gz")
    monkeypatch.setattr(cifar10, "URL", _file_url(archive))
    monkeypatch.setattr(cifar10, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = load_dataset("cifar10", progress=False)
    assert ds.name == "cifar10" and ds.classes == CIFAR_LABEL_NAMES
    assert (tmp_path / "cache" / "downloads" / cifar10.ARCHIVE_NAME).is_file()


# ----------------------------------------------------------------------------------------------
# the real copy


def _real_cifar_zip() -> Path | None:
    for candidate in (os.environ.get("IMGFLOW_CIFAR10"), REPO.parent / "shared/data/cifar10-jpeg.zip"):
        if candidate and Path(candidate).is_file() and str(candidate).endswith(".zip"):
            return Path(candidate)
    return None


@pytest.mark.realdata
def test_real_cifar10_zip(monkeypatch, request):
    path = _real_cifar_zip()
    if path is None:
        pytest.skip("../shared/data/cifar10-jpeg.zip not found")
    # A cache kept between test runs (pytest's own cache dir, not the user's): the first run
    # decodes the 60,000 JPEGs (~15 s), later runs read the arrays back in well under a second.
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        monkeypatch.setenv("IMGFLOW_CACHE", str(cache.mkdir("imgflow-realdata")))
    monkeypatch.setenv("IMGFLOW_CIFAR10", str(path))
    ds = load_dataset("cifar10", progress=False)
    assert ds.classes == cifar10.CLASSES
    assert ds.image_shape == (32, 32, 3)
    assert np.bincount(ds.train.labels).tolist() == [5000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.skipped == [] and ds.notes == []
