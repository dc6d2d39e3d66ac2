"""The Python API (imgflow.train/evaluate/predict/...): README example, in-memory data, errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgflow
from datagen import make_image, make_image_folder
from imgflow.api import python_names
from imgflow.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = dict(model="seed-baseline", epochs=2, batch_size=16, precision="fp32")  # seconds on 2 cores


def readme_python_example() -> str:
    """The first ```python block under README.md's '## Python' heading."""
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's '## Python' section has no ```python block"
    return match.group(1)


def image_arrays(num_classes: int = 3, per_class: int = 16, size=(8, 8), seed: int = 0):
    """uint8 (N, H, W, 3) images of learnable classes (datagen's colours) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = np.stack([np.asarray(make_image(int(k), num_classes, size, rng=rng)) for k in labels])
    return images, labels


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "my_photos", per_class=12, size=(8, 8))
    make_image(0, 3, (8, 8)).save(tmp_path / "new_photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^test accuracy \d\.\d{3}$", out, re.M), out
    assert re.search(r"^new_photo\.jpg [abc] [01]\.\d\d$", out, re.M), out
    assert (tmp_path / "runs" / "first" / "model.safetensors").is_file()


def test_train_from_arrays_saves_them_in_the_run_and_resumes_from_them(tmp_path):
    images, labels = image_arrays()
    out = tmp_path / "run"
    run = imgflow.train((images, labels), classes=["red", "green", "blue"], out=out, **FAST)
    assert run.run_dir == out and len(run.history) == 2 and "val_acc" in run.history[-1]
    (data_file,) = out.glob("data-*.npz")
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["data"] == str(data_file.resolve())
    assert config["data"]["classes"] == ["red", "green", "blue"]

    again = imgflow.train((images, labels), classes=["red", "green", "blue"], out=out, resume=True, **FAST)
    assert again.history == run.history and list(out.glob("data-*.npz")) == [data_file]
    # Without data or options: the run's own, as `imgflow train --resume --out RUN`.
    assert imgflow.train(out=out, resume=True).history == run.history

    with pytest.raises(UserError, match=r"was started with data=.*resume with the same options"):
        imgflow.train((images[::-1].copy(), labels[::-1].copy()), classes=["red", "green", "blue"],
                      out=out, resume=True, **FAST)
    assert list(out.glob("data-*.npz")) == [data_file], "a refused run leaves no data file behind"


def test_evaluate_on_another_data_set_with_the_same_classes(tiny_run, tmp_path):
    own = imgflow.evaluate(tiny_run)
    assert set(own) >= {"accuracy", "loss", "per_class", "confusion_matrix"}
    metrics_file = (tiny_run / "metrics.json").read_text()

    other = make_image_folder(tmp_path / "other", per_class=6, size=(16, 16), seed=7)
    metrics = imgflow.evaluate(tiny_run, data=other)
    assert metrics["num_images"] == 3 * 2 and metrics["split"] == "test"  # its test split
    assert metrics["accuracy"] >= 0.8 and metrics["loss"] > 0
    assert (tiny_run / "metrics.json").read_text() == metrics_file, "the run's own metrics stay"

    # Arrays: labels index the run's classes; another size is resized as predict resizes files.
    images, labels = image_arrays(per_class=5, size=(12, 12), seed=3)
    on_arrays = imgflow.evaluate(tiny_run, data=(images, labels))
    assert on_arrays["split"] == "all" and on_arrays["num_images"] == 15 and on_arrays["accuracy"] >= 0.8


def test_evaluate_on_data_with_other_classes_says_so(tiny_run, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("a", "b", "zebra"), per_class=3, size=(16, 16))
    with pytest.raises(UserError, match=r"classes of other differ .*not in the run: zebra; missing: c"):
        imgflow.evaluate(tiny_run, data=other)


def test_predict_arrays_equals_predict_files(tiny_run, tmp_path):
    images, _ = image_arrays(per_class=2, size=(16, 16))
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    from_files = imgflow.predict(tiny_run, paths, top_k=2)
    from_arrays = imgflow.predict(tiny_run, images, top_k=2)
    assert [r["image"] for r in from_arrays] == list(range(len(images)))
    for a, f in zip(from_arrays, from_files):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in f["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in f["top"]])
    assert imgflow.predict(tiny_run, images[0])[0]["top"][0]["class"] == "a"  # one (H, W, C) image


def test_unknown_option_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as info:
        imgflow.train("cifar10", model="fast-small", learning_rate=0.1, out=tmp_path / "r")
    message = str(info.value)
    assert "no option learning_rate=" in message and "lr" in message and "batch_size" in message
    with pytest.raises(UserError, match=r"did you mean batch_size=\?"):
        imgflow.train("cifar10", model="fast-small", batchsize=4, out=tmp_path / "r")
    with pytest.raises(UserError, match=r"^epochs= must be an integer, got '3'$"):
        imgflow.train("cifar10", model="fast-small", epochs="3", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("message, expected", [
    ("pass --resume to continue it, --overwrite to replace it, or choose another --out",
     "pass resume=True to continue it, overwrite=True to replace it, or choose another out"),
    ("--lr must be > 0 and <= 100, got 1000.0", "lr must be > 0 and <= 100, got 1000.0"),
    ("train with --lr 0.1 and --val-split 0.2.", "train with lr=0.1 and val_split=0.2."),
    ("--val-split must be in [0, 1)", "val_split must be in [0, 1)"),
    ("pass --model NAME or --preset", "pass model=NAME or preset"),
    ("--out runs/a is a file", "out='runs/a' is a file"),
    ("--image-size 32x48 is too large", "image_size=(32, 48) is too large"),
    ("continue it with 'imgflow train --resume --out runs/a'",
     "continue it with imgflow.train(resume=True, out='runs/a')"),
    ("re-run 'imgflow evaluate runs/a'", "re-run imgflow.evaluate('runs/a')"),
    ("see 'imgflow models'", "see 'imgflow models'"),  # no function: the command stays
])
def test_python_names_turns_flags_into_arguments(message, expected):
    assert python_names(message) == expected


def test_python_names_knows_the_values_the_caller_gave(tmp_path):
    assert python_names("--out myrun is a file", {"out": "myrun"}) == "out='myrun' is a file"
    assert python_names("--out myrun is a file") == "out myrun is a file"  # a word, not a value
    with pytest.raises(UserError) as info:  # refused by the config's checks, before any data loads
        imgflow.train("cifar10", model="fast-small", flip="alternate", out=tmp_path / "r")
    assert str(info.value).startswith("flip='alternate' needs flipping in augment (now 'none'), e.g. "
                                      "augment='flip+translate'")


def test_errors_name_python_arguments_without_the_library_traceback(tiny_data, tmp_path):
    out = tmp_path / "run"
    imgflow.train(tiny_data, out=out, **{**FAST, "epochs": 1})
    with pytest.raises(UserError) as info:
        imgflow.train(tiny_data, out=out, **{**FAST, "epochs": 1})
    message = str(info.value)
    assert "resume=True" in message and "overwrite=True" in message and "--" not in message
    frames = traceback.extract_tb(info.value.__traceback__)
    assert not any("/imgflow/training/" in f.filename for f in frames), frames
    assert info.value.__suppress_context__


def test_a_wrong_path_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"no data set '.*no-such-folder'"):
        imgflow.train(tmp_path / "no-such-folder", model="fast-small", out=tmp_path / "r")
    with pytest.raises(UserError, match=r"run directory not found: .*nowhere"):
        imgflow.evaluate(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"an array alone has no labels"):
        imgflow.train(np.zeros((2, 8, 8, 3), np.uint8), model="fast-small")


def test_import_imgflow_does_not_import_torch():
    code = ("import sys, imgflow; imgflow.train; imgflow.evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(imgflow.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == imgflow.__version__


def test_importing_any_module_never_hides_an_api_function():
    """Importing a submodule sets the package attribute of its name: none may be named like a function."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(imgflow.__path__, "imgflow."):
        if module.name.count(".") == 1 and module.name != "imgflow.__main__":
            importlib.import_module(module.name)
    for name in imgflow._API:
        assert callable(getattr(imgflow, name)) and getattr(imgflow, name).__module__ == "imgflow.api", name
    with pytest.raises(UserError, match="run directory not found"):
        imgflow.predict("no-such-run", ["x.png"])


def test_lr_find_and_train_at_the_found_lr(tiny_data, tmp_path):
    found = imgflow.lr_find(str(tiny_data), model="seed-baseline", out=tmp_path / "find", steps=30,
                            optimizer="sgd", batch_size=16)
    assert found.suggestion > 0 and (tmp_path / "find" / "lr_find.png").is_file()
    assert (tmp_path / "find" / "lr_find.csv").is_file()
    run = imgflow.train(str(tiny_data), model="seed-baseline", epochs=1, out=tmp_path / "run", lr="find",
                        optimizer="sgd", batch_size=16)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["train"]["lr"] == config["lr_find"]["suggestion"]


def test_inspect_in_memory_and_report(tiny_run, tmp_path):
    images, labels = image_arrays()
    card = imgflow.inspect((images, labels), tmp_path / "card", classes=["r", "g", "b"])
    assert card["classes"] == ["r", "g", "b"] and card["splits"]["train"]["count"] == 48
    assert Path(card["examples"]).is_file()
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert imgflow.report(run) == run / "report.html" and (run / "report.html").is_file()


def test_a_piped_script_shows_one_line_per_epoch_and_no_bars(tiny_data, tmp_path):
    """keras#8414: a progress bar piped into a log writes a line per step; here: a line per epoch."""
    script = (f"import imgflow; imgflow.train({str(tiny_data)!r}, model='seed-baseline', epochs=3, "
              f"batch_size=16, out={str(tmp_path / 'run')!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epochs = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert "\r" not in done.stderr and "step/s" not in done.stderr and "it/s" not in done.stderr
