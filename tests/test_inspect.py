"""`imgflow inspect`: the card's keys and numbers, examples.png, the text card, CLI exit codes."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgflow
from datagen import make_image_folder
from imgflow.cli import main
from imgflow.data import channel_stats, load_dataset, stats
from imgflow.data.card import format_card, inspect
from imgflow.data.examples import MAX_ROWS, save_example_grid

DESIGN_KEYS = {"name", "source", "sha256", "classes", "image_shape", "splits", "skipped",
               "channel_mean", "channel_std"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny(tmp_path):
    return make_image_folder(tmp_path / "tiny", classes=("cat", "dog"), per_class=6,
                             test_per_class=3)


def test_card_has_the_design_keys_and_right_numbers(tiny, tmp_path):
    card = inspect(str(tiny), out_dir=tmp_path / "out")
    assert DESIGN_KEYS <= card.keys()
    assert card["name"] == "tiny" and card["source"] == str(tiny) and len(card["sha256"]) == 64
    assert card["classes"] == ["cat", "dog"] and card["image_shape"] == [8, 8, 3]
    assert card["splits"] == {"train": {"count": 12, "per_class": {"cat": 6, "dog": 6}},
                              "test": {"count": 6, "per_class": {"cat": 3, "dog": 3}}}
    assert card["has_test_split"] is True and card["skipped"] == []

    images = load_dataset(str(tiny), progress=False).train.images.astype(np.float64) / 255
    np.testing.assert_allclose(card["channel_mean"], images.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(card["channel_std"], images.std(axis=(0, 1, 2)), atol=1e-6)
    json.dumps(card)  # JSON-ready as is

    png = tmp_path / "out" / "examples.png"
    assert card["examples"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 100
    assert [p.name for p in png.parent.iterdir()] == ["examples.png"]  # no temp files left


def test_without_out_dir_examples_go_to_a_named_folder_and_are_announced(tiny, tmp_path, monkeypatch,
                                                                         caplog):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with caplog.at_level(logging.INFO, logger="imgflow.data.card"):
        card = inspect(str(tiny))
    png = Path("runs") / "inspect" / "tiny" / "examples.png"
    assert card["examples"] == str(png) and (work / png).is_file()
    assert [p.name for p in work.iterdir()] == ["runs"]  # nothing else in the working directory
    assert f"wrote the example grid to {png}" in caplog.text
    assert DESIGN_KEYS <= card.keys() and card["classes"] == ["cat", "dog"]


def test_no_test_split_is_null_and_said_in_the_text(tmp_path):
    root = make_image_folder(tmp_path / "flat", classes=("x", "y"), per_class=3, flat=True)
    card = inspect(str(root), out_dir=tmp_path / "out")
    assert card["splits"]["test"] is None and card["has_test_split"] is False
    text = format_card(card)
    assert "no test split" in text
    (header,) = [line for line in text.splitlines() if line.split()[:2] == ["#", "class"]]
    assert header.split() == ["#", "class", "train"]  # no test column


def test_text_card_says_counts_in_words(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("x",), per_class=1, test_per_class=1)
    (root / "train" / "x" / "bad.png").write_bytes(b"nope")
    text = format_card(inspect(str(root), out_dir=tmp_path / "out"))
    assert "one: 1 class, images 8x8x3" in text
    assert "  train    1 image" in text.splitlines() and "  test     1 image" in text.splitlines()
    assert "skipped 1 file:" in text and "(s)" not in text


def test_plural():
    from imgflow.text import plural

    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert plural(1200, "image") == "1,200 images" and plural(3, "class") == "3 classes"
    assert plural(1, "class") == "1 class" and plural(2, "batch", "batches") == "2 batches"


def test_text_card_table_and_skipped_list(tiny, tmp_path):
    for i in range(23):
        (tiny / "train" / "cat" / f"bad{i:02d}.png").write_bytes(b"not a png")
    card = inspect(str(tiny), out_dir=tmp_path / "out")
    text = format_card(card)
    assert "tiny: 2 classes, images 8x8x3" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["0", "cat", "6", "3"] in rows and ["1", "dog", "6", "3"] in rows
    assert ["total", "12", "6"] in rows
    assert "skipped 23 files:" in text
    assert "train/cat/bad19.png: not an image Pillow can read" in text
    assert "train/cat/bad20.png" not in text and "... and 3 more" in text


def test_channel_stats_in_chunks_match_numpy(monkeypatch):
    monkeypatch.setattr(stats, "_CHUNK", 3)  # several chunks, the last one partial
    images = np.random.default_rng(0).integers(0, 256, size=(10, 5, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    ref = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), atol=1e-12)
    assert channel_stats(np.full((2, 2, 2, 1), 255, np.uint8)) == ([1.0], [0.0])


def test_example_grid_caps_rows_and_handles_gray(tmp_path):
    classes = [f"class{i:02d}" for i in range(MAX_ROWS + 5)]
    root = make_image_folder(tmp_path / "many", classes=classes, per_class=2, flat=True, mode="L")
    ds = load_dataset(str(root), progress=False)
    assert ds.image_shape == (8, 8, 1)
    path = save_example_grid(ds, tmp_path / "grid" / "g.png", per_class=8)
    with Image.open(path) as im:
        assert im.height > MAX_ROWS * 96 and im.height < (MAX_ROWS + 2) * 110


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_inspect_json(tiny, tmp_path, capsys):
    assert main(["inspect", str(tiny), "--out", str(tmp_path / "o"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert DESIGN_KEYS <= card.keys()
    assert card["splits"]["train"]["count"] == 12
    assert (tmp_path / "o" / "examples.png").is_file()


@pytest.mark.parametrize("spec", ["no-such-folder", "imagenet"])
def test_cli_unknown_data_exits_2_with_one_line(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"imgflow: error: no data set '{spec}': give cifar10, fashion-mnist, or a path "
                   "to an image folder/.zip/.tar(.gz) or a .npz of arrays")


@pytest.mark.parametrize("command", [["inspect", "{long}"], ["train", "{long}", "--model", "fast-small"],
                                     ["workflow", "{long}"]])
def test_cli_a_path_too_long_for_the_file_system_is_one_line(command, tmp_path, capsys):
    long = str(tmp_path / ("x" * 300))  # one component over the 255-byte limit
    assert main([part.format(long=long) for part in command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imgflow: error: ") and "x" * 300 in err


def test_cli_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "nothing" / "train").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "imgflow", "inspect", str(tmp_path / "nothing")],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "IMGFLOW_CACHE": str(tmp_path / "c")})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgflow: error: no images found in")
    assert "Traceback" not in result.stderr


def test_cli_prints_names_that_are_not_utf8_escaped(tmp_path):
    """A data folder and a class folder whose names are not UTF-8: a card, not a traceback."""
    root = make_image_folder(tmp_path / os.fsdecode(b"\xffdata"), classes=("ok", "x"), per_class=3,
                             flat=True)
    (root / "x").rename(root / os.fsdecode(b"\xffcls"))
    src = str(Path(imgflow.__file__).parents[1])  # the code under test, whatever the cwd
    result = subprocess.run([sys.executable, "-m", "imgflow", "inspect", os.fsencode(root)],
                            capture_output=True, cwd=tmp_path,
                            env={**os.environ, "IMGFLOW_CACHE": str(tmp_path / "c"), "PYTHONPATH": src})
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8")  # valid UTF-8 throughout
    assert out.startswith("\\xffdata: 2 classes")
    assert ["0", "\\xffcls", "3"] in [line.split() for line in out.splitlines()]


def test_cli_damaged_archives_and_file_outs_get_one_line(tiny, tmp_path, capsys):
    """A truncated .tar.gz, a corrupt .zip, and an --out that is a file: one line, exit 2."""
    import tarfile

    with tarfile.open(tmp_path / "ok.tar.gz", "w:gz") as tar:
        tar.add(tiny, arcname=".")
    whole = (tmp_path / "ok.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "stub.tar.gz").write_bytes(whole[:10])  # a gzip header and nothing after it
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "a-file").write_text("x")
    cases = [(["inspect", str(tmp_path / "cut.tar.gz")], "cannot read tar archive"),
             (["inspect", str(tmp_path / "stub.tar.gz")], "truncated or corrupt"),
             (["inspect", str(tmp_path / "bad.zip")], "truncated or corrupt"),
             (["inspect", str(tiny), "--out", str(tmp_path / "a-file")], "a file stands where a directory")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "x"
