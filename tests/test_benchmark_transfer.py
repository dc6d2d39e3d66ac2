"""benchmarks/transfer.py's bookkeeping on tiny fake data: the task folder it builds (stratified,
32x32 RGB PNGs that imgflow loads as a labelled folder) and the results it writes and tabulates.
No training here: the script's runs are `imgflow train`, tested elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.data import Dataset, Split, load_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = ["T-shirt/top", "Trouser", "Pullover"]


@pytest.fixture
def transfer(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import make_tables
    import transfer

    return transfer, make_tables


def _fake_gray_dataset() -> Dataset:
    rng = np.random.default_rng(0)

    def split(n_per_class: int) -> Split:
        labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
        images = (labels[:, None, None, None] * 80 + rng.integers(0, 30, (len(labels), 28, 28, 1))).astype(np.uint8)
        return Split(images, labels.astype(np.int64))

    return Dataset(name="fake-fashion", source="-", sha256="", classes=list(CLASSES), train=split(20), test=split(10))


def test_the_task_folder_is_a_stratified_sample_as_32x32_rgb_pngs(transfer, tmp_path):
    script, _ = transfer
    dataset = _fake_gray_dataset()
    task = script.build_task_folder(dataset, tmp_path / "task", per_class=4, test_images=9)
    assert task["num_train"] == 12 and task["num_test"] == 9
    folders = sorted(p.name for p in (tmp_path / "task" / "train").iterdir())
    assert folders == sorted(["T-shirt-top", "Trouser", "Pullover"])  # '/' cannot name a folder
    assert all(len(list((tmp_path / "task" / part / f).glob("*.png"))) == n
               for part, n in (("train", 4), ("test", 3)) for f in folders)
    image = Image.open(next((tmp_path / "task" / "train" / "Trouser").glob("*.png")))
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()  # gray x 3
    # Each image is under its own class: the train indices' labels name the folders they went to.
    assert [CLASSES[i] for i in dataset.train.labels[task["train_indices"]]].count("Trouser") == 4
    loaded = load_dataset(str(tmp_path / "task"), progress=False, remarks=False)
    assert loaded.image_shape == (32, 32, 3) and len(loaded.train.labels) == 12 and len(loaded.test.labels) == 9

    again = script.build_task_folder(dataset, tmp_path / "task", per_class=4, test_images=9)
    assert again == task  # the same numbers: reused, not redrawn
    with pytest.raises(SystemExit, match="another task"):
        script.build_task_folder(dataset, tmp_path / "task", per_class=5, test_images=9)


def _run(arm: str, seed: int, acc: float) -> dict:
    return {"arm": arm, "seed": seed, "model": "fast-small", "epochs": 20, "test_accuracy": acc,
            "test_images": 2000, "train_seconds": 10.0 + seed, "run_dir": f"runs/{arm}-seed{seed}", "date": "-"}


def test_results_hold_mean_and_std_per_arm_and_make_a_table(transfer, tmp_path):
    script, make_tables = transfer
    runs = [_run("scratch", s, a) for s, a in enumerate((0.70, 0.72, 0.74))] + \
           [_run("finetune", s, a) for s, a in enumerate((0.80, 0.81, 0.82))]
    backbone = {"run": "/runs/cifar10", "model": "fast-small", "data": "cifar10", "preset": "fast", "epochs": 5,
                "test_accuracy": 0.9, "sha256": "0" * 64}
    task = {"data": "fashion-mnist", "per_class": 50, "test_images": 2000, "sample_seed": 1, "size": [32, 32, 3],
            "num_train": 500, "num_test": 2000, "train_indices": [1, 2], "test_indices": [3]}
    out = tmp_path / "results" / "transfer-test-machine.json"
    out.parent.mkdir()
    script.write_results(out, backbone, task, ["--epochs", "20"], {"cpu": "test cpu"}, runs)
    saved = json.loads(out.read_text())
    summary = {row["arm"]: row for row in saved["summary"]}
    assert summary["scratch"]["test_accuracy_mean"] == pytest.approx(0.72)
    assert summary["scratch"]["test_accuracy_std"] == pytest.approx(0.02)  # sample std of 0.70, 0.72, 0.74
    assert summary["finetune"]["n"] == 3 and summary["finetune"]["seeds"] == [0, 1, 2]
    assert "train_indices" not in saved["task"] and saved["backbone"]["sha256"] == "0" * 64
    assert saved["arms"]["finetune"] == ["--weights", "BACKBONE_RUN", "--finetune"]
    table = make_tables.build(out.parent)
    assert "## Transfer from CIFAR-10 (transfer-test-machine.json)" in table
    assert "| finetune | `--weights BACKBONE_RUN --finetune` | 0.8100 ± 0.0100 | 0, 1, 2 | 11 |" in table
