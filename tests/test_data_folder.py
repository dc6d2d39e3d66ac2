"""Image folders as directories and archives: layouts, modes, sizes, bad files, hostile archives."""
from __future__ import annotations

import errno
import io
import logging
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from datagen import class_colour, make_image, make_image_folder, pack, png_bytes
from imgflow.data import folder as folder_mod
from imgflow.data import Dataset, Split, load_dataset
from imgflow.data.decode import decode_image
from imgflow.data.folder import dataset_name
from imgflow.errors import UserError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGFLOW_CACHE", str(tmp_path / "cache"))


def load(path, **kwargs):
    return load_dataset(str(path), progress=False, **kwargs)


def _reasons(ds) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in ds.skipped}


@pytest.fixture
def tiny(tmp_path):
    return make_image_folder(tmp_path / "tiny", classes=("b", "a", "c"), per_class=6,
                             test_per_class=2)


# ----------------------------------------------------------------------------------------------
# layouts and archive kinds


@pytest.mark.parametrize("suffix", ["dir", ".zip", ".tar", ".tar.gz"])
def test_every_source_kind_gives_the_same_arrays(tiny, tmp_path, suffix):
    reference = load(tiny)
    source = tiny if suffix == "dir" else pack(tiny, tmp_path / f"tiny{suffix}")
    ds = load(source)

    assert ds.name == "tiny"
    assert ds.classes == ["a", "b", "c"]  # sorted, whatever the creation order
    assert ds.train.images.shape == (18, 8, 8, 3) and ds.test.images.shape == (6, 8, 8, 3)
    assert np.bincount(ds.train.labels).tolist() == [6, 6, 6]
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(ds.train.images, reference.train.images)
    np.testing.assert_array_equal(ds.test.labels, reference.test.labels)
    assert ds.skipped == [] and ds.notes == []
    # Labels follow the folder names, not creation order: "b" was written first (colour 0) and
    # is label 1 after sorting.
    mean_b = ds.train.images[ds.train.labels == 1].reshape(-1, 3).mean(axis=0)
    assert np.abs(mean_b - class_colour(0, 3)).max() < 10


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_single_wrapping_directory_is_peeled(tiny, tmp_path, suffix):
    ds = load(pack(tiny, tmp_path / f"wrapped{suffix}", prefix="cifar10/"))
    assert ds.classes == ["a", "b", "c"] and len(ds.train) == 18 and len(ds.test) == 6


def _source(folder, tmp_path, kind):
    """`folder` itself, or packed as .zip, .tar or .tar.gz (members relative to it)."""
    return folder if kind == "dir" else pack(folder, tmp_path / f"{folder.name}{kind}")


KINDS = ["dir", ".zip", ".tar", ".tar.gz"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_chain_of_wrapping_directories_is_peeled(tiny, tmp_path, kind):
    """A zip of `export/dataset/train/cat/*.jpg` read as one class "dataset" before."""
    root = tmp_path / "export-zip"
    make_image_folder(root / "export" / "dataset", classes=("b", "a", "c"), per_class=6, test_per_class=2)
    (root / "export" / "README.txt").write_text("exported by a tool")  # text beside: still a wrapper
    ds = load(_source(root, tmp_path, kind))
    assert ds.classes == ["a", "b", "c"] and len(ds.train) == 18 and len(ds.test) == 6
    np.testing.assert_array_equal(ds.train.images, load(tiny).train.images)
    assert ds.skipped == [] and ds.notes == ["ignored entries outside export/dataset/: export/README.txt"]


@pytest.mark.parametrize("kind", KINDS)
def test_class_folders_inside_a_chain_of_wrappers_without_a_test_split(tmp_path, kind):
    root = tmp_path / "photos"
    make_image_folder(root / "2024" / "animals", classes=("cat", "dog"), per_class=5, flat=True)
    # Folders of other files beside the images (a data set's meta/) do not hide the wrapper.
    (root / "2024" / "meta").mkdir()
    (root / "2024" / "meta" / "classes.txt").write_text("cat\ndog\n")
    ds = load(_source(root, tmp_path, kind))
    assert ds.classes == ["cat", "dog"] and len(ds.train) == 10 and ds.test is None
    assert ds.notes == ["ignored entries outside 2024/animals/: 2024/meta"]


@pytest.mark.parametrize("kind", KINDS)
def test_class_folders_a_level_down_beside_an_image_are_refused_naming_where_they_are(tmp_path, kind):
    root = tmp_path / "photos"
    make_image_folder(root / "animals", classes=("cat", "dog"), per_class=3, flat=True)
    make_image(0, 2).save(root / "cover.png")  # an image at the top: "animals" is not a mere wrapper
    source = _source(root, tmp_path, kind)
    fix = (f"give {root / 'animals'} as DATA" if kind == "dir" else "extract the archive and give its "
           "folder animals/ as DATA, or pack the class folders at the archive's top")
    with pytest.raises(UserError) as caught:
        load(source)
    assert str(caught.value) == (f"{source}: the class folders seem to be one level down, in animals/ "
                                 f"(animals/cat, animals/dog): {fix}")


@pytest.mark.parametrize("kind", KINDS)
def test_ambiguous_class_level_is_refused_naming_the_candidates(tmp_path, kind):
    """animals/cat, animals/dog, plants/rose: the classes are two (animals, plants) or three."""
    root = tmp_path / "nature"
    make_image_folder(root / "animals", classes=("cat", "dog"), per_class=3, flat=True)
    make_image_folder(root / "plants", classes=("rose",), per_class=3, flat=True)
    source = _source(root, tmp_path, kind)
    with pytest.raises(UserError) as caught:
        load(source)
    assert str(caught.value) == (
        f"{source}: cannot tell which folders are the classes: animals, plants hold no images directly, "
        "only sub-folders (animals/cat, animals/dog, plants/rose). If the sub-folders are the classes, "
        "put them side by side in one folder and give that; if not, put each class's images directly "
        "in its folder")
    with pytest.raises(UserError, match="cannot tell which folders are the classes"):
        folder_mod.sample_image_sizes(source)  # the size probe refuses it too, before any decoding


def test_class_folders_a_level_down_inside_train_are_refused(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train" / "images", classes=("cat", "dog"), per_class=3, flat=True)
    with pytest.raises(UserError, match=r"the class folders seem to be one level down, in train/images/ "
                                        r"\(train/images/cat, train/images/dog\): move them up into train/ "
                                        r"\(and test/\)"):
        load(root)


def test_nested_data_read_as_one_class_by_an_older_version_is_not_served_from_its_cache(tmp_path,
                                                                                       monkeypatch):
    from imgflow.data import cache

    make_image_folder(tmp_path / "z" / "export" / "dataset", classes=("a", "b"), per_class=2)
    archive = pack(tmp_path / "z", tmp_path / "z.zip")
    with monkeypatch.context() as old:  # version 2 peeled one wrapping folder at most
        old.setattr(cache, "CACHE_VERSION", 2)
        old.setattr(folder_mod, "_wrapping_dirs", lambda paths, images: paths[0][:1])
        old.setattr(folder_mod, "_check_class_level", lambda *args: None)
        assert load(archive).classes == ["dataset"]
    assert load(archive).classes == ["a", "b"]


def test_sub_folders_of_the_same_name_in_every_class_are_not_classes(tmp_path):
    """cat/2019, dog/2019: names repeat, so the top folders are the classes, files nested."""
    root = tmp_path / "years"
    for year in ("2019", "2020"):
        make_image_folder(root / "cat" / year, classes=("x",), per_class=2, flat=True)
        make_image_folder(root / "dog" / year, classes=("x",), per_class=1, flat=True)
    ds = load(root)
    assert ds.classes == ["cat", "dog"] and np.bincount(ds.train.labels).tolist() == [4, 2]


def test_top_level_class_folders_mean_no_test_split(tmp_path):
    root = make_image_folder(tmp_path / "flat", classes=("cat", "dog"), per_class=5, flat=True)
    for source in (root, pack(root, tmp_path / "flat.zip"), pack(root, tmp_path / "w.zip", prefix="photos/")):
        ds = load(source)
        assert ds.classes == ["cat", "dog"] and len(ds.train) == 10 and ds.test is None


def test_test_classes_map_to_train_indices(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=3, test=False)
    make_image_folder(root / "test", classes=("b",), per_class=2, flat=True)
    ds = load(root)
    assert ds.classes == ["a", "b", "c"]
    assert ds.test.labels.tolist() == [1, 1]


def test_test_class_missing_from_train_is_a_user_error(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, test=False)
    make_image_folder(root / "test", classes=("zebra",), per_class=1, flat=True)
    with pytest.raises(UserError, match=r"1 test class without training images \(zebra\): add their "
                                        r"images under train/<class>/ or remove them from test/"):
        load(root)


def test_test_without_train_is_a_user_error(tmp_path):
    make_image_folder(tmp_path / "d" / "test", classes=("a",), per_class=1, flat=True)
    with pytest.raises(UserError, match="no train/ folder"):
        load(tmp_path / "d")


def test_files_outside_class_folders_are_listed(tiny):
    (tiny / "train" / "stray.png").write_bytes(png_bytes(make_image(0, 3)))
    (tiny / "README.txt").write_text("hello")
    ds = load(tiny)
    assert _reasons(ds) == {"train/stray.png": "not inside a class folder"}
    assert any("README.txt" in n for n in ds.notes)
    assert len(ds.train) == 18


def test_a_test_folder_without_images_means_no_test_split(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, test=False)
    (root / "test" / "a").mkdir(parents=True)
    ds = load(root)
    assert ds.test is None
    assert "the test folder holds no usable images: no test split" in ds.notes


def test_nested_files_count_for_their_class(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, test=False)
    (root / "train" / "a" / "deeper").mkdir()
    make_image(0, 2).save(root / "train" / "a" / "deeper" / "x.png")
    assert np.bincount(load(root).train.labels).tolist() == [3, 2]


def test_dataset_name_strips_archive_suffixes(tmp_path):
    assert dataset_name(tmp_path / "pets.tar.gz") == "pets"
    assert dataset_name(tmp_path / "cifar10-jpeg.zip") == "cifar10-jpeg"
    assert dataset_name(tmp_path / "photos") == "photos"


# ----------------------------------------------------------------------------------------------
# modes and sizes


def test_mixed_modes_become_rgb(tmp_path):
    folder = tmp_path / "m" / "train" / "x"
    folder.mkdir(parents=True)
    make_image(0, 2, mode="L").save(folder / "gray.png")
    make_image(0, 2, mode="P").save(folder / "palette.png")
    make_image(0, 2, mode="CMYK").save(folder / "cmyk.jpg")
    make_image(0, 2, mode="RGB").save(folder / "rgb.bmp")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(folder / "sixteen.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red ...
    rgba[:4, :, 3] = 255  # ... opaque in the top half, fully transparent below
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(folder / "float.tif")

    ds = load(tmp_path / "m")
    assert ds.skipped == []
    assert ds.train.images.shape == (7, 8, 8, 3)
    by_name = dict(zip(sorted(p.name for p in folder.iterdir()), ds.train.images))
    np.testing.assert_array_equal(by_name["alpha.png"][:4], np.broadcast_to([200, 0, 0], (4, 8, 3)))
    assert (by_name["alpha.png"][4:] == 255).all(), "transparent pixels are composited on white"
    assert (by_name["sixteen.png"] == 255).all(), "16-bit 65535 is white, not clipped noise"
    assert (by_name["float.tif"] == 128).all(), "float 0.5 in [0, 1] is mid gray"
    gray = by_name["gray.png"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    root = make_image_folder(tmp_path / "e", classes=("a",), per_class=2, size=(8, 4), test=False)
    tall = np.zeros((8, 4, 3), dtype=np.uint8)  # stored 4 wide, 8 high ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 degrees clockwise to display"
    Image.fromarray(tall).save(root / "train" / "a" / "rotated.jpg", exif=exif.tobytes())
    ds = load(root)
    assert any("resized 1 of 3 images to 8x4" in n for n in ds.notes), "displayed as 4x8"


def test_all_gray_folder_has_one_channel(tmp_path):
    root = make_image_folder(tmp_path / "g", per_class=3, mode="L")
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(root / "train" / "a" / "deep.png")
    make_image(0, 3, mode="LA").save(root / "train" / "a" / "la.png")
    ds = load(root)
    assert ds.image_shape == (8, 8, 1) and ds.skipped == []
    assert len(ds.train) == 11


def test_mixed_sizes_are_resized_to_the_most_common(tmp_path, caplog):
    root = make_image_folder(tmp_path / "s", per_class=4, size=(8, 8), test=False)
    make_image(0, 3, size=(10, 12)).save(root / "train" / "a" / "big.png")
    make_image(1, 3, size=(5, 5)).save(root / "train" / "b" / "small.png")
    with caplog.at_level(logging.WARNING):
        ds = load(root)
    assert ds.image_shape == (8, 8, 3) and len(ds.train) == 14
    assert any("resized 2 of 14 images to 8x8" in n for n in ds.notes)
    assert "resized 2 of 14 images" in caplog.text

    sized = load(root, image_size=(6, 4))
    assert sized.image_shape == (6, 4, 3) and len(sized.train) == 14


# ----------------------------------------------------------------------------------------------
# bad, hidden and hostile files


def test_unusable_files_are_skipped_and_listed(tiny, caplog):
    folder = tiny / "train" / "a"
    good = png_bytes(make_image(0, 3, size=(8, 8)))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (folder / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        ds = load(tiny)
    reasons = _reasons(ds)
    assert set(reasons) == {f"train/a/{n}" for n in ("truncated.png", "notes.txt", "random.jpg", "empty.png")}
    assert reasons["train/a/notes.txt"] == "not an image Pillow can read"
    assert "truncated" in reasons["train/a/truncated.png"] or "cannot decode" in reasons["train/a/truncated.png"]
    assert len(ds.train) == 18  # the good images all still there
    assert "skipped 4 files that could not be used" in caplog.text


def test_skipped_files_are_warned_about_once_per_data_set_and_size_in_a_process(tiny, caplog):
    """A workflow loads its data set six times: one warning, said in words ("1 file")."""
    (tiny / "train" / "a" / "broken.png").write_bytes(b"nope")
    with caplog.at_level(logging.DEBUG, logger="imgflow.data.load"):
        load(tiny)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == [
            "tiny: skipped 1 file that could not be used: train/a/broken.png (not an image Pillow can read)"]
        caplog.clear()
        load(tiny)
        load(tiny)
        assert [r.levelno for r in caplog.records if "skipped 1 file" in r.getMessage()] == [logging.DEBUG] * 2
        caplog.clear()
        load(tiny, image_size=(4, 4))  # another size is another data set for the user
        assert [r.levelno for r in caplog.records if "skipped 1 file" in r.getMessage()] == [logging.WARNING]


def test_entries_that_are_not_readable_files_are_skipped_and_listed(tiny):
    """A symlink loop, a dangling symlink and a named pipe (which would block a reader forever)."""
    assert load(tiny).skipped == []  # cached: the entries below must change the cache key
    folder = tiny / "train" / "a"
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to("no-such-file.png")
    os.mkfifo(folder / "pipe.png")
    ds = load(tiny)
    assert _reasons(ds) == {"train/a/loop.png": "symbolic link loop: not followed",
                            "train/a/dangling.png": "broken symbolic link (its target does not exist)",
                            "train/a/pipe.png": "not a regular file (a named pipe)"}
    assert len(ds.train) == 18
    (folder / "linked.png").symlink_to("000.png")  # a link to a real image still counts
    assert len(load(tiny).train) == 19


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_files_and_folders_without_read_permission_are_skipped_and_listed(tiny):
    (tiny / "train" / "a" / "000.png").chmod(0)
    (tiny / "train" / "b").chmod(0)
    try:
        reasons = _reasons(load(tiny))
    finally:
        (tiny / "train" / "b").chmod(0o755)
    assert reasons == {"train/a/000.png": "cannot read: permission denied",
                       "train/b": "cannot read folder: Permission denied"}


def test_names_that_are_not_utf8_become_escaped_text(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("ok", "other"), per_class=3, flat=True)
    (root / "other").rename(root / os.fsdecode(b"\xffcls"))
    (root / "ok" / "000.png").rename(root / "ok" / os.fsdecode(b"\xfe.png"))
    ds = load(root)
    assert ds.classes == ["\\xffcls", "ok"] and len(ds.train) == 6
    (root / "ok" / os.fsdecode(b"\xfd.png")).write_bytes(b"not an image")
    assert _reasons(load(root)) == {"ok/\\xfd.png": "not an image Pillow can read"}


def test_a_data_file_that_cannot_be_read_is_a_user_error(tmp_path, monkeypatch):
    from imgflow.data import cache

    def failing(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(cache, "sha256_of_file", failing)  # as reading /proc/self/mem fails
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(UserError, match=f"cannot read {archive}: Input/output error"):
        load(archive)


def test_hidden_files_and_macos_metadata_are_ignored(tiny, tmp_path):
    (tiny / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tiny / "train" / "a" / "._000.png").write_bytes(b"AppleDouble")
    (tiny / "train" / ".hidden_class").mkdir()
    make_image(0, 3).save(tiny / "train" / ".hidden_class" / "x.png")
    (tiny / "__MACOSX").mkdir()
    (tiny / "__MACOSX" / "junk.png").write_bytes(b"junk")
    for source in (tiny, pack(tiny, tmp_path / "h.zip")):
        ds = load(source)
        assert ds.classes == ["a", "b", "c"] and len(ds.train) == 18
        assert ds.skipped == [] and ds.notes == []


def test_empty_class_folders_are_reported(tiny, caplog):
    (tiny / "train" / "empty").mkdir()
    (tiny / "train" / "broken").mkdir()
    (tiny / "train" / "broken" / "x.png").write_bytes(b"nope")
    (tiny / "test" / "c").rename(tiny / "c-test-moved")  # test split without class c: fine
    (tiny / "test" / "c").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = load(tiny)
    assert ds.classes == ["a", "b", "c"]
    assert "class folder train/empty is empty: class left out" in ds.notes
    assert "class folder train/broken has no usable images (1 skipped): class left out" in ds.notes
    assert "class folder test/c is empty" in ds.notes
    assert "train/empty is empty" in caplog.text
    assert np.bincount(ds.test.labels, minlength=3).tolist() == [2, 2, 0]


@pytest.mark.parametrize("make", ["empty dir", "only text", "empty zip"])
def test_no_images_is_a_user_error(tmp_path, make):
    root = tmp_path / "nothing"
    (root / "train" / "a").mkdir(parents=True)
    if make == "only text":
        (root / "train" / "a" / "x.txt").write_text("hi")
    source = pack(root, tmp_path / "nothing.zip") if make == "empty zip" else root
    with pytest.raises(UserError, match="no images found in"):
        load(source)


def test_a_plain_tar_cut_between_members_is_refused(tiny, tmp_path):
    """tarfile lists the members before such a cut without a word: a split could vanish."""
    archive = pack(tiny, tmp_path / "tiny.tar")
    whole = archive.read_bytes()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        end = tar.offset  # where the end-of-archive marker starts
    cut = members[len(members) // 2].offset  # at a header: every member before it is whole
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    with pytest.raises(UserError, match=r"cut\.tar is a truncated or corrupt tar archive \(no end-of-archive "
                                        r"marker after its last member\): copy or download it again"):
        load(tmp_path / "cut.tar")
    (tmp_path / "one-zero-block.tar").write_bytes(whole[:end + 512])  # lenient writers: still whole
    assert len(load(tmp_path / "one-zero-block.tar").train) == 18


def test_a_cut_tar_decoded_by_an_older_version_is_not_served_from_its_cache(tiny, tmp_path, monkeypatch):
    from imgflow.data import cache
    from imgflow.data.readers import TarReader

    whole = pack(tiny, tmp_path / "tiny.tar").read_bytes()
    with tarfile.open(tmp_path / "tiny.tar") as tar:
        last = tar.getmembers()[-1]
    (tmp_path / "cut.tar").write_bytes(whole[:last.offset])
    with monkeypatch.context() as old:  # version 1 read the members before the cut and cached them
        old.setattr(cache, "CACHE_VERSION", 1)
        old.setattr(TarReader, "_check_not_truncated", lambda self: None)
        cut = load(tmp_path / "cut.tar")
        whole_set = load(tmp_path / "tiny.tar")
        assert len(cut.train) + len(cut.test) == len(whole_set.train) + len(whole_set.test) - 1
    with pytest.raises(UserError, match="truncated or corrupt tar archive"):
        load(tmp_path / "cut.tar")


def test_not_an_archive_is_a_user_error(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"hello")
    with pytest.raises(UserError, match="not a directory, .zip or .tar"):
        load(tmp_path / "file.bin")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 30)
    with pytest.raises(UserError):
        load(tmp_path / "bad.zip")


def test_zip_members_with_dotdot_or_absolute_paths_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    image = png_bytes(make_image(0, 2))
    archive = work / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/ok.png", image)
        zf.writestr("train/b/ok.png", png_bytes(make_image(1, 2)))
        zf.writestr("train/a/../../../escaped.png", image)
        zf.writestr("/abs/escaped.png", image)
        zf.writestr("C:/windows/escaped.png", image)
    ds = load(archive)
    assert ds.classes == ["a", "b"] and len(ds.train) == 2
    reasons = _reasons(ds)
    assert reasons["train/a/../../../escaped.png"] == "'..' in archive path: refused"
    assert reasons["/abs/escaped.png"] == "absolute path in archive: refused"
    assert reasons["C:/windows/escaped.png"] == "absolute path in archive: refused"
    assert not list(tmp_path.rglob("escaped.png")), "nothing may be written outside"


def test_tar_members_with_dotdot_absolute_or_links_are_refused(tmp_path):
    archive = tmp_path / "work" / "evil.tar.gz"
    archive.parent.mkdir()
    image = png_bytes(make_image(0, 2))

    def add(tf, name, data=b"", **attrs):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for key, value in attrs.items():
            setattr(info, key, value)
        tf.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(archive, "w:gz") as tf:
        add(tf, "train/a/ok.png", image)
        add(tf, "train/b/ok.png", png_bytes(make_image(1, 2)))
        add(tf, "../escaped.png", image)
        add(tf, "/tmp/escaped-abs.png", image)
        add(tf, "train/a/link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "train/a/hard.png", type=tarfile.LNKTYPE, linkname="train/a/ok.png")
    ds = load(archive)
    assert ds.classes == ["a", "b"] and len(ds.train) == 2
    reasons = _reasons(ds)
    assert reasons["../escaped.png"] == "'..' in archive path: refused"
    assert reasons["/tmp/escaped-abs.png"] == "absolute path in archive: refused"
    assert reasons["train/a/link.png"] == "link in archive: not followed"
    assert reasons["train/a/hard.png"] == "link in archive: not followed"
    assert not list(tmp_path.rglob("escaped*.png"))


def test_decompression_bombs_are_refused_per_file(tiny, monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; lower the limit so an
    # ordinary 40x40 (1,600 px) and 50x50 (2,500 px) image count as bombs, 8x8 ones do not.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    make_image(0, 3, size=(40, 40)).save(tiny / "train" / "a" / "warn.png")
    make_image(0, 3, size=(50, 50)).save(tiny / "train" / "a" / "error.png")
    ds = load(tiny)
    reasons = _reasons(ds)
    assert set(reasons) == {"train/a/warn.png", "train/a/error.png"}
    assert all("decompression bomb" in r for r in reasons.values())
    assert len(ds.train) == 18 and ds.image_shape == (8, 8, 3)


# ----------------------------------------------------------------------------------------------
# cache


def test_second_load_reads_the_cache_without_decoding(tiny, tmp_path, monkeypatch):
    archive = pack(tiny, tmp_path / "tiny.zip")
    first = load(archive)
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(args)
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(folder_mod, "decode_image", counting_decode)
    second = load(archive)
    assert calls == [], "decoded again despite the cache"
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert (second.classes, second.sha256, second.source) == (first.classes, first.sha256, first.source)
    assert second.train.images.flags.writeable
    assert len(list((tmp_path / "cache" / "arrays").iterdir())) == 1

    # Another size is another cache entry, so it decodes.
    assert load(archive, image_size=(4, 4)).image_shape == (4, 4, 3)
    assert len(calls) == 24


def test_changed_directory_content_is_decoded_again(tiny, monkeypatch):
    first = load(tiny)
    make_image(2, 3).save(tiny / "train" / "a" / "new.png")
    second = load(tiny)
    assert len(second.train) == len(first.train) + 1
    assert second.sha256 != first.sha256


def test_damaged_cache_entry_is_rebuilt(tiny, tmp_path):
    first = load(tiny)
    (entry,) = (tmp_path / "cache" / "arrays").iterdir()
    (entry / "train_images.npy").write_bytes(b"garbage")
    np.testing.assert_array_equal(load(tiny).train.images, first.train.images)
    np.testing.assert_array_equal(load(tiny).train.images, first.train.images)


def test_cache_dir_argument_wins(tiny, tmp_path):
    load_dataset(str(tiny), cache_dir=tmp_path / "elsewhere", progress=False)
    assert (tmp_path / "elsewhere" / "arrays").is_dir()
    assert not (tmp_path / "cache" / "arrays").exists()


def test_an_image_size_that_cannot_fit_in_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=4, size=(8, 8))
    with pytest.raises(UserError, match="each side must be 1 to 4096"):
        load_dataset(str(root), image_size=(100_000, 100_000), cache_dir=tmp_path / "c")
    import imgflow.data.decode as decode

    monkeypatch.setattr(decode, "available_memory", lambda: 1_000_000)  # 1 MB free
    with pytest.raises(UserError, match="use a smaller --image-size"):
        load_dataset(str(root), image_size=(256, 256), cache_dir=tmp_path / "c")  # 16 x 192 KiB
    assert load_dataset(str(root), image_size=(16, 16), cache_dir=tmp_path / "c").image_shape == (16, 16, 3)


def test_resizing_a_fixed_size_source_checks_memory_first(tmp_path, monkeypatch):
    """CIFAR batches and IDX files are decoded at their size, then resized: checked before that."""
    import imgflow.data.decode as decode
    import imgflow.data.load as load

    base = Dataset(name="fixed", source="fixed", sha256="x", classes=["a", "b"],
                   train=Split(np.zeros((10, 8, 8, 1), np.uint8), np.arange(10) % 2), test=None)
    monkeypatch.setattr(decode, "available_memory", lambda: 100_000)
    with pytest.raises(UserError, match="10 images of 128x128 from fixed need"):
        load._cached(tmp_path / "c", "digest", (128, 128), lambda: base, progress=False)  # 160 KiB
    resized = load._cached(tmp_path / "c", "digest", (16, 16), lambda: base, progress=False)
    assert resized.train.images.shape == (10, 16, 16, 1)


@pytest.mark.parametrize("suffix", ["dir", ".zip", ".tar.gz"])
def test_sample_image_sizes_reads_headers_of_training_images_only(tmp_path, suffix):
    root = make_image_folder(tmp_path / "s", classes=("a", "b"), per_class=6, size=(12, 20), test_per_class=2)
    make_image(0, 2, size=(30, 30)).save(root / "test" / "a" / "big.png")  # test images are not sampled
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide, 12 high, displayed turned: 20 high, 12 wide
    make_image(1, 2, size=(12, 20)).save(root / "train" / "b" / "turned.jpg", exif=exif.tobytes())
    (root / "train" / "b" / "zz-broken.png").write_bytes(b"not an image")
    source = root if suffix == "dir" else pack(root, tmp_path / f"s{suffix}")
    sample = folder_mod.sample_image_sizes(source, limit=100)
    assert sample.train_files == 14
    assert sorted(sample.sizes) == [(12, 20)] * 12 + [(20, 12)], "the broken file drops out"
    few = folder_mod.sample_image_sizes(source, limit=4)
    assert len(few.sizes) == 4 and few.train_files == 14
