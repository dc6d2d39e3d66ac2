"""In-memory data as a .npz DATA path: the writer, the reader, and every kind of bad content."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from imgflow.data import dataset_from_arrays, load_dataset, save_arrays
from imgflow.data.card import inspect
from imgflow.errors import UserError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGFLOW_CACHE", str(tmp_path / "cache"))


def _arrays(n=12, size=(6, 5), channels=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *size) if channels is None else (n, *size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), np.arange(n) % classes


def load(path, **kwargs):
    return load_dataset(str(path), progress=False, **kwargs)


def test_round_trip_keeps_images_labels_classes_and_test_split(tmp_path):
    images, labels = _arrays()
    test_images, test_labels = _arrays(n=4, seed=1)
    path = save_arrays(tmp_path / "pets.npz", images, labels, classes=["cat", "dog", "emu"],
                       test_images=test_images, test_labels=test_labels)
    assert path == tmp_path / "pets.npz"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["pets.npz"]  # no temp file left

    ds = load(path)
    assert (ds.name, ds.source, ds.classes) == ("pets", str(path), ["cat", "dog", "emu"])
    np.testing.assert_array_equal(ds.train.images, images)
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(ds.test.images, test_images)
    assert ds.test.labels.tolist() == test_labels.tolist()
    assert len(ds.sha256) == 64 and load(path).sha256 == ds.sha256  # its content hash, stable
    with np.load(path, allow_pickle=False) as npz:  # a plain .npz any NumPy reads
        assert sorted(npz.files) == ["classes", "test_images", "test_labels", "train_images", "train_labels"]


def test_grey_arrays_without_classes_get_one_channel_and_numbered_classes(tmp_path):
    images, labels = _arrays(channels=None, classes=2)
    save_arrays(tmp_path / "g.npz", images, labels)
    ds = load(tmp_path / "g.npz")
    assert ds.classes == ["0", "1"] and ds.image_shape == (6, 5, 1) and ds.test is None
    np.testing.assert_array_equal(ds.train.images[..., 0], images)


def test_a_hand_written_npz_is_read_and_can_be_resized(tmp_path):
    images, labels = _arrays(classes=2)
    np.savez_compressed(tmp_path / "own.npz", train_images=images, train_labels=labels.astype(np.uint8))
    ds = load(tmp_path / "own.npz", image_size=(4, 4))
    assert ds.image_shape == (4, 4, 3) and ds.classes == ["0", "1"] and len(ds.train) == 12
    assert load(tmp_path / "own.npz", image_size=(4, 4)).train.images.tobytes() == ds.train.images.tobytes()


def test_inspect_of_an_npz_gives_its_card(tmp_path):
    images, labels = _arrays(n=9, classes=3)
    test_images, test_labels = _arrays(n=3, seed=2)
    save_arrays(tmp_path / "mine.npz", images, labels, classes=np.array(["a", "b", "c"]),
                test_images=test_images, test_labels=test_labels)
    card = inspect(str(tmp_path / "mine.npz"), out_dir=tmp_path / "out")
    assert card["name"] == "mine" and card["classes"] == ["a", "b", "c"]
    assert card["image_shape"] == [6, 5, 3]
    assert card["splits"] == {"train": {"count": 9, "per_class": {"a": 3, "b": 3, "c": 3}},
                              "test": {"count": 3, "per_class": {"a": 1, "b": 1, "c": 1}}}
    assert card["skipped"] == [] and (tmp_path / "out" / "examples.png").is_file()
    np.testing.assert_allclose(card["channel_mean"], (images / 255).mean(axis=(0, 1, 2)), atol=1e-6)


def _bad(**change):
    images, labels = _arrays()
    arrays = {"train_images": images, "train_labels": labels, **change}
    return {k: v for k, v in arrays.items() if v is not None}


BAD = [
    (_bad(train_images=np.zeros((12, 6, 5, 3), np.float32)),
     "train_images has dtype float32, expected uint8 pixels 0..255: convert with .astype(np.uint8) "
     "(scale floats in [0, 1] by 255 first)"),
    (_bad(train_images=np.zeros((12, 6, 5, 4), np.uint8)),
     "train_images has shape (12, 6, 5, 4), expected (N, H, W, C) with C 1 (grey) or 3 (RGB), "
     "or (N, H, W) for grey"),
    (_bad(train_labels=np.arange(11)), "train_labels has shape (11,), expected (12,): one label per image"),
    (_bad(train_labels=np.full(12, 0.5)), "train_labels has dtype float64, expected integers 0..K-1"),
    (_bad(train_labels=np.full(12, -1)), "train_labels holds -1: labels must be 0..K-1"),
    (_bad(classes=np.array(["a", "b"])),
     "a label is 2 but there are 2 classes: labels must be 0..1, one class name per label"),
    (_bad(classes=np.array(["a", "a", "b"])), "classes must be distinct, non-empty names"),
    (_bad(test_images=np.zeros((2, 6, 5, 3), np.uint8)),
     "test_images and test_labels go together: give both or neither"),
    (_bad(test_images=np.zeros((2, 6, 6, 3), np.uint8), test_labels=np.zeros(2, np.int64)),
     "test_images are 6x6x3, train_images 6x5x3: both splits need one H x W x C"),
    (_bad(test_images=np.zeros((2, 6, 5, 3), np.uint8), test_labels=np.array([0, 7])),
     "test_labels holds 7 but there are 3 classes: labels must be 0..2 (without classes, K is the "
     "largest training label + 1)"),
    (_bad(test_images=np.zeros((2, 6, 5, 3), np.uint8), test_labels=np.array([0, 3]),
          classes=np.array(["a", "b", "c"])),
     "test_labels holds 3 but there are 3 classes: labels must be 0..2 (one class name per label)"),
]
BAD_IDS = ["float images", "4 channels", "labels shorter", "float labels", "negative label",
           "label beyond classes", "repeated class", "test images alone", "test size differs",
           "test label beyond training labels", "test label beyond classes"]


@pytest.mark.parametrize("arrays, message", BAD, ids=BAD_IDS)
def test_bad_content_is_one_line_saying_what_is_wrong(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: {message}"
    with pytest.raises(UserError) as caught:  # the writer refuses the same, and writes nothing
        save_arrays(tmp_path / "out.npz", arrays["train_images"], arrays["train_labels"],
                    arrays.get("classes"), arrays.get("test_images"), arrays.get("test_labels"))
    assert str(caught.value) == message and not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("keys, message", [
    ({"train_images"}, "has no train_labels"),
    ({"images", "labels"}, "has no train_images or train_labels"),
    ({"train_images", "train_labels", "val_images"}, "holds unknown arrays val_images"),
])
def test_missing_or_unknown_arrays_are_named(tmp_path, keys, message):
    images, labels = _arrays()
    pool = {"train_images": images, "train_labels": labels, "images": images, "labels": labels,
            "val_images": images}
    np.savez(tmp_path / "k.npz", **{k: pool[k] for k in keys})
    with pytest.raises(UserError) as caught:
        load(tmp_path / "k.npz")
    assert str(caught.value) == (f"{tmp_path / 'k.npz'} {message}: expected train_images, train_labels and "
                                 "optionally test_images, test_labels, classes")


def test_a_pickle_inside_is_refused_never_unpickled(tmp_path, monkeypatch):
    images, labels = _arrays()
    classes = np.array(["a", "b", "c"], dtype=object)  # an object array is stored as a pickle
    np.savez(tmp_path / "obj.npz", train_images=images, train_labels=labels, classes=classes)
    (tmp_path / "whole.npz").write_bytes(pickle.dumps({"train_images": images}))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(UserError) as caught:
        load(tmp_path / "obj.npz")
    assert str(caught.value) == (f"{tmp_path / 'obj.npz'}: classes is an object array, which only unpickling "
                                 "could read, and imgflow never unpickles: save plain numeric and string "
                                 "arrays (imgflow.data.save_arrays)")
    with pytest.raises(UserError, match="whole.npz as a .npz of arrays: it holds a pickle, and imgflow never "
                                        "unpickles"):
        load(tmp_path / "whole.npz")


def test_files_that_are_not_an_npz_archive_are_one_line(tmp_path):
    images, _ = _arrays()
    np.save(tmp_path / "one.npy", images)
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(UserError, match="one.npz holds a single array, not a .npz archive"):
        load(tmp_path / "one.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="cannot read .*cut.npz as a .npz of arrays"):
        load(tmp_path / "cut.npz")
    whole = save_arrays(tmp_path / "whole.npz", *_arrays()).read_bytes()
    (tmp_path / "damaged.npz").write_bytes(whole[: len(whole) // 2] + whole[len(whole) // 2:][::-1])
    with pytest.raises(UserError, match="damaged.npz"):
        load(tmp_path / "damaged.npz")


def test_save_arrays_wants_the_npz_suffix_and_validates_python_inputs(tmp_path):
    images, labels = _arrays()
    with pytest.raises(UserError, match=r"data.bin: name the file \*.npz"):
        save_arrays(tmp_path / "data.bin", images, labels)
    with pytest.raises(UserError, match="train_images is a list, expected a NumPy uint8 array"):
        save_arrays(tmp_path / "x.npz", images.tolist(), labels)
    ds = dataset_from_arrays(images, labels.tolist(), classes=["a", "b", "c"])  # a list of labels is fine
    assert ds.train.images is images and ds.classes == ["a", "b", "c"]


def test_cli_inspect_reads_an_npz(tmp_path, capsys):
    import json

    from imgflow.cli import main

    save_arrays(tmp_path / "mine.npz", *_arrays(n=6, classes=2), classes=["no", "yes"])
    assert main(["inspect", str(tmp_path / "mine.npz"), "--out", str(tmp_path / "o"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["classes"] == ["no", "yes"] and card["splits"]["train"]["count"] == 6
    assert card["splits"]["test"] is None and card["image_shape"] == [6, 5, 3]


def test_size_sample_of_an_npz_reads_its_header(tmp_path, monkeypatch):
    """The workflow samples image sizes before loading: a .npz answers from its header."""
    from imgflow.data import arrays
    from imgflow.data.folder import sample_image_sizes

    save_arrays(tmp_path / "a.npz", *_arrays(n=7, channels=None))
    monkeypatch.setattr(arrays, "read_arrays_file", lambda path: pytest.fail("read the pixels"))
    sample = sample_image_sizes(tmp_path / "a.npz", limit=5)
    assert sample.train_files == 7 and sample.sizes == [(6, 5)] * 5
    monkeypatch.undo()
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(UserError, match="b.npz has no train_images or train_labels"):
        sample_image_sizes(tmp_path / "b.npz")
