"""`imgflow predict`: any file format/size/mode, directories, broken files, and equality with evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen import make_image
from imgflow.cli import main
from imgflow.data.decode import decode_image, resize_array
from imgflow.prediction import InputSpec, predict_files, read_image
from imgflow.runs import RunPaths

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Files of many formats, sizes and modes; one broken, plus files a directory scan must skip.

    Colour images carry their class's colour (datagen), so the tiny run should classify them.
    """
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    make_image(0, 3, (16, 16), rng=rng).save(root / "a_plain.png")
    make_image(1, 3, (30, 41), rng=rng).save(root / "b_odd_size.jpg", quality=95)
    make_image(2, 3, (16, 16), mode="RGBA", rng=rng).save(root / "c_rgba.png")
    make_image(1, 3, (9, 13), mode="L", rng=rng).save(root / "gray.png")
    (root / "nested" / "deeper").mkdir(parents=True)
    make_image(2, 3, (64, 48), mode="P", rng=rng).save(root / "nested" / "deeper" / "c_palette.gif")
    (root / "broken.png").write_bytes(b"this is not a PNG file")
    make_image(0, 3, (16, 16), rng=rng).save(root / ".hidden.png")  # skipped: hidden
    (root / "notes.txt").write_text("not an image, and not reported: not an image extension")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_directory_json(tiny_run, photos, capsys, caplog):
    rc, out, err = run_cli(capsys, "predict", str(tiny_run), str(photos), "--json", "--top-k", "2")
    assert rc == 0, err
    results = json.loads(out)
    names = [Path(r["image"]).relative_to(photos).as_posix() for r in results]
    assert names == ["a_plain.png", "b_odd_size.jpg", "broken.png", "c_rgba.png", "gray.png",
                     "nested/deeper/c_palette.gif"]  # sorted, recursive, no hidden / .txt files
    by_name = dict(zip(names, results))
    broken = by_name.pop("broken.png")
    assert set(broken) == {"image", "top", "error"}
    assert broken["top"] == [] and broken["error"] == "not an image Pillow can read"
    for r in by_name.values():
        assert set(r) == {"image", "top"}
        assert [set(t) for t in r["top"]] == [{"class", "probability"}] * 2
        p = [t["probability"] for t in r["top"]]
        assert p == sorted(p, reverse=True) and 0 < sum(p) <= 1 + 1e-6
        assert all(t["class"] in CLASSES for t in r["top"])
    # Colour files of every format, size and mode are brought to the training form.
    for name in ("a_plain.png", "b_odd_size.jpg", "c_rgba.png", "nested/deeper/c_palette.gif"):
        assert by_name[name]["top"][0]["class"] == name.split("/")[-1][0], by_name[name]
    assert "1 of 6 files could not be read" in caplog.text


def test_predict_table_lists_files_and_errors(tiny_run, photos, capsys):
    rc, out, err = run_cli(capsys, "predict", str(tiny_run), str(photos / "a_plain.png"),
                           str(photos / "broken.png"), str(photos / "missing.png"))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "1st", "2nd", "3rd"]  # top-k 5 clipped to 3 classes
    assert lines[1].startswith(str(photos / "a_plain.png")) and lines[1].split()[1] == "a"
    assert lines[2].split(None, 1) == [str(photos / "broken.png"), "error: not an image Pillow can read"]
    assert lines[3].split(None, 1) == [str(photos / "missing.png"), "error: no such file"]
    assert lines[-1] == "1 image classified, 2 could not be read"


def test_a_named_pipe_is_an_unreadable_file_not_a_hang(tiny_run, photos, tmp_path, capsys):
    import os

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # reading it would block until a writer came
    rc, out, err = run_cli(capsys, "predict", str(tiny_run), str(photos / "a_plain.png"), str(pipe), "--json")
    assert rc == 0, err
    assert json.loads(out)[1] == {"image": str(pipe), "top": [],
                                  "error": "not a regular file (a pipe, socket or device)"}


def test_predict_exit_2_when_nothing_readable(tiny_run, photos, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "predict", str(tiny_run), str(photos / "broken.png"))
    assert rc == 2 and out == ""
    assert err.startswith("imgflow: error: no image could be read from 1 file (") and err.count("\n") == 1
    rc, _, err = run_cli(capsys, "predict", str(tiny_run), str(tmp_path))  # an empty directory
    assert rc == 2 and "no image files found" in err


@pytest.mark.parametrize("make_bad", ["missing", "no_config", "no_weights"])
def test_predict_exit_2_on_unusable_run_dir(make_bad, tiny_run, photos, tmp_path, capsys):
    run = tmp_path / "run"
    if make_bad != "missing":
        run.mkdir()
    if make_bad == "no_weights":
        (run / "config.json").write_text(RunPaths(tiny_run).config.read_text())
    rc, out, err = run_cli(capsys, "predict", str(run), str(photos / "a_plain.png"))
    assert rc == 2 and out == "" and err.startswith("imgflow: error: ") and err.count("\n") == 1


def test_predict_equals_evaluate(tiny_run, tiny_data):
    # The data layer orders the test split by class name, then by path inside the class folder.
    test = tiny_data / "test"
    files = sorted((p for p in test.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(test).as_posix())
    results = predict_files(tiny_run, files, top_k=3, progress=False)
    saved = np.load(RunPaths(tiny_run).predictions)
    probs = np.array([[{t["class"]: t["probability"] for t in r["top"]}[c] for c in CLASSES]
                      for r in results])
    assert probs.shape == saved["probs"].shape
    np.testing.assert_allclose(probs, saved["probs"], rtol=0, atol=1e-6)
    assert (probs.argmax(1) == saved["probs"].argmax(1)).all()
    # A directory gives the same files in the same order.
    assert [r["image"] for r in predict_files(tiny_run, [test], progress=False)] == [str(f) for f in files]


def test_predict_tta_keeps_clear_decisions(tiny_run, photos):
    files = [photos / "a_plain.png", photos / "c_rgba.png"]
    plain = predict_files(tiny_run, files, top_k=1, progress=False)
    tta = predict_files(tiny_run, files, top_k=1, tta=True, progress=False)
    assert [r["top"][0]["class"] for r in tta] == [r["top"][0]["class"] for r in plain] == ["a", "c"]


def _spec(channels: int, jpeg_draft: bool = False, size=(16, 16)) -> InputSpec:
    return InputSpec.make(CLASSES, size, channels, [0.0] * channels, [1.0] * channels, jpeg_draft)


def test_read_image_channels(photos):
    gray3 = read_image(photos / "gray.png", _spec(3))
    assert gray3.shape == (16, 16, 3) and gray3.dtype == np.uint8
    assert (gray3[..., 0] == gray3[..., 1]).all() and (gray3[..., 0] == gray3[..., 2]).all()
    colour1 = read_image(photos / "a_plain.png", _spec(1))
    expected = np.asarray(Image.open(photos / "a_plain.png").convert("L"))
    assert colour1.shape == (16, 16, 1) and (colour1[..., 0] == expected).all()


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_read_image_resizes_as_the_data_layer(tmp_path, jpeg_draft):
    """Without --image-size the folder loader decodes, then resizes; with it, decodes resized."""
    path = tmp_path / "big.jpg"
    make_image(0, 3, (200, 300)).save(path, quality=90)
    data = path.read_bytes()
    expected = (decode_image(data, (20, 24)) if jpeg_draft
                else resize_array(decode_image(data), (20, 24)))
    got = read_image(path, _spec(3, jpeg_draft, size=(20, 24)))
    assert got.shape == (20, 24, 3) and (got == expected).all()
