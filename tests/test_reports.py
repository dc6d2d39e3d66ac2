"""`imgflow report`: figures are valid PNGs, the HTML holds every section and is self-contained,
its numbers are metrics.json's, comparisons name every run, broken run directories exit 2."""
from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen import make_image_folder
from imgflow.cli import main
from imgflow.errors import UserError
from imgflow.evaluation import classification_metrics, save_predictions
from imgflow.fileio import read_json, write_json
from imgflow.reports import compare_runs, figures, html, report_run
from imgflow.reports.run_report import SECTIONS, TOP_PAIRS, most_confused
from imgflow.runs import RunPaths

EXTERNAL = ('src="http', "src='http", 'href="http', "<script", "<link", "<iframe", "url(", "@import")


def _inject_mistakes(run_dir: Path, every: int = 4) -> dict:
    """Make every `every`-th test prediction confidently wrong; rewrite the saved evaluation.

    A tiny model is often perfect on tiny data: this gives top losses and confusions to show,
    with metrics.json and test_predictions.npz still telling the same story.
    """
    paths = RunPaths(run_dir)
    with np.load(paths.predictions) as f:
        probs, labels = f["probs"].copy(), f["labels"].copy()
    K = probs.shape[1]
    for i in range(0, len(labels), every):
        probs[i] = 0.03 / (K - 1)
        probs[i, (labels[i] + 1) % K] = 0.97
    metrics = read_json(paths.metrics)
    fresh = classification_metrics(labels, probs, list(metrics["per_class"]))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"):
        metrics[key] = fresh[key]
    metrics["loss"] = float(-np.log(probs[np.arange(len(labels)), labels]).mean())
    save_predictions(paths.predictions, probs, labels)
    write_json(paths.metrics, metrics)
    return metrics


@pytest.fixture(scope="module")
def reported(tiny_run, tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy of tiny_run with a few wrong predictions, reported into --out: (out, metrics, html)."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run)
    metrics = _inject_mistakes(run)
    out = run.parent / "out"
    path = report_run(run, out)
    assert path == out / "report.html"
    return out, metrics, path.read_text(encoding="utf-8")


def _check_png(path: Path, min_side: int = 300) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt file raises
    with Image.open(path) as im:
        assert im.format == "PNG", path
        W, H = im.size
    assert min_side <= max(W, H) <= 2500 and min(W, H) >= 150, f"{path.name} is {W}x{H}"
    return W, H


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


# ----------------------------------------------------------------------------------------------
# one run


def test_report_writes_the_figures_as_valid_pngs(reported):
    out, _, _ = reported
    plots = out / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted([
        "curves.png", "examples.png", "per_class_accuracy.png", "confusion_counts.png",
        "confusion_normalized.png", "predictions.png", "top_losses.png"])  # no temp files left
    for png in plots.iterdir():
        _check_png(png)


def test_report_html_has_every_section_and_nothing_external(reported):
    out, _, page = reported
    for sid in SECTIONS:
        assert f'<section id="{sid}"><h2>{SECTIONS[sid]}</h2>' in page
        assert f'<a href="#{sid}">' in page  # in the table of contents
    assert 'id="skipped"' in page and "Skipped files (0)" in page
    for bad in EXTERNAL:
        assert bad not in page, bad
    # Every figure is embedded, byte for byte the PNG written beside it.
    embedded = _embedded_pngs(page)
    files = {p.read_bytes() for p in (out / "plots").iterdir()}
    assert len(embedded) == len(files) == 7 and set(embedded) == files
    assert page.count("<img ") == 7


def test_report_numbers_are_the_metrics_json_numbers(reported):
    _, metrics, page = reported
    acc = metrics["accuracy"]
    assert 0 < acc < 1  # the injected mistakes are there
    shown = re.search(r'<span id="test-accuracy" class="value" data-value="([^"]+)">([^<]+)</span>', page)
    assert float(shown.group(1)) == acc and shown.group(2) == f"{acc:.2%}"
    assert f"{acc:.4f} ({acc:.2%})" in page and f"{metrics['loss']:.4f}" in page
    assert f"{metrics['majority_baseline_accuracy']:.4f}" in page
    assert f"{metrics['random_baseline_accuracy']:.4f}" in page
    for name, m in metrics["per_class"].items():
        row = (f"<td>{name}</td><td class=\"num\">{m['precision']:.3f}</td><td class=\"num\">"
               f"{m['recall']:.3f}</td><td class=\"num\">{m['f1']:.3f}</td>"
               f"<td class=\"num\">{m['support']:,}</td>")
        assert row in page, name
    # The confused pairs come from metrics.json's confusion matrix.
    pairs = most_confused(np.array(metrics["confusion_matrix"]), list(metrics["per_class"]))
    table = page[page.index('id="confused-pairs-table"'):]
    for p in pairs:
        assert f"<td>{p['true']}</td><td>{p['predicted']}</td><td class=\"num\">{p['count']}</td>" in table


def test_report_cli_evaluates_first_when_metrics_are_missing(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    paths = RunPaths(run)
    paths.metrics.unlink()
    paths.predictions.unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(paths.report)  # the path, and nothing else
    assert paths.metrics.is_file() and paths.predictions.is_file()
    acc = read_json(paths.metrics)["accuracy"]
    page = paths.report.read_text(encoding="utf-8")
    assert f'id="test-accuracy" class="value" data-value="{acc!r}"' in page
    assert (paths.plots / "curves.png").is_file()


@pytest.mark.parametrize("missing", ["config.json", "history.csv", "model.safetensors", "<dir>"])
def test_a_run_dir_missing_a_file_exits_2_with_one_line(tiny_run, tmp_path, capsys, missing):
    run = tmp_path / "run"
    if missing == "<dir>":
        run = tmp_path / "no-such-run"
    else:
        shutil.copytree(tiny_run, run)
        (run / missing).unlink()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imgflow: error: ") and "Traceback" not in err
    assert (missing if missing != "<dir>" else "not found") in err
    assert not (run / "report.html").exists()


def test_a_run_whose_data_set_is_gone_still_gets_a_report(tiny_run, tmp_path):
    """A run copied to another machine: every section, no image figures, the reason said."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "predictions.png").write_bytes(b"stale figure of an earlier report")
    config = read_json(RunPaths(run).config)
    config["train"]["data"] = str(tmp_path / "moved-away")
    write_json(RunPaths(run).config, config)
    page = report_run(run).read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "could not be loaded" in page
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "confusion_counts.png", "confusion_normalized.png", "curves.png", "per_class_accuracy.png"]


def test_a_run_without_a_test_split_gets_a_report_of_what_it_has(tmp_path, capsys):
    """No test/ part, so no metrics.json: the curves, validation numbers and config, and a plain
    note on how to get test numbers, instead of a refusal."""
    data = make_image_folder(tmp_path / "data", per_class=12, size=(8, 8), test=False)
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), "--model", "seed-baseline", "--epochs", "1", "--batch-size", "8",
                 "--out", str(run)]) == 0
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "confusion_counts.png").write_bytes(b"stale figure of a tested run")
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    page = (run / "report.html").read_text(encoding="utf-8")
    for sid in ("summary", "data", "curves", "test-metrics", "run"):
        assert f'<section id="{sid}">' in page
    for sid in ("per-class", "confusion", "confused-pairs", "predictions", "top-losses"):
        assert f'<section id="{sid}">' not in page
    val = read_json(RunPaths(run).config)["result"]["final_val_accuracy"]
    assert re.search(rf'id="val-accuracy" class="value" data-value="{re.escape(repr(val))}"', page)
    assert 'id="test-accuracy"' not in page and "for 1 epoch in" in page
    assert page.count("has no test split") == 2  # the summary and the test section
    assert f"imgflow evaluate {run}" in page and "--test-split 0.2" in page
    assert not RunPaths(run).metrics.exists()
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["curves.png", "examples.png"]


def test_predictions_that_disagree_with_metrics_are_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    metrics = read_json(RunPaths(run).metrics)
    metrics["accuracy"] = 0.123
    write_json(RunPaths(run).metrics, metrics)
    with pytest.raises(UserError, match="re-run 'imgflow evaluate"):
        report_run(run)


# ----------------------------------------------------------------------------------------------
# many classes


def test_120_classes_switch_to_the_top_confusions_view(tiny_run, tmp_path):
    """A fake evaluated run over a real 120-class folder: the report stays readable."""
    from imgflow.data import load_dataset

    K = 120
    classes = [f"class-{i:03d}" for i in range(K)]
    data = make_image_folder(tmp_path / "many", classes=classes, per_class=1, test_per_class=2)
    labels = load_dataset(str(data), progress=False).test.labels
    run = tmp_path / "run"
    run.mkdir()
    config = read_json(RunPaths(tiny_run).config)
    config["train"]["data"] = str(data)
    config["data"].update(name="many", classes=classes)
    config["model"]["num_classes"] = K
    write_json(run / "config.json", config)
    shutil.copy(RunPaths(tiny_run).history, run / "history.csv")
    (run / "model.safetensors").write_bytes(b"not read: the run is already evaluated")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(labels), K))
    logits[np.arange(len(labels)), labels] += 3.0
    logits[np.arange(len(labels)), (labels + 1) % K] += 2.5  # neighbours confused
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    metrics = classification_metrics(labels, probs, classes)
    metrics.update(loss=1.0, tta=False, precision="fp32", model="seed-baseline", data="many")
    save_predictions(run / "test_predictions.npz", probs, labels)
    write_json(run / "metrics.json", metrics)

    page = report_run(run).read_text(encoding="utf-8")
    plots = run / "plots"
    assert not (plots / "confusion_counts.png").exists()
    assert _check_png(plots / "confusion_top.png")[1] < 1000
    assert _check_png(plots / "confusion_normalized.png")[0] < 1000
    W, H = _check_png(plots / "per_class_accuracy.png")
    assert H < 1600  # 20 worst + 20 best, not 120 bars
    assert "With 120 classes" in page
    pairs = page[page.index('id="confused-pairs-table"'):].split("</table>")[0]
    assert pairs.count("<tr>") == TOP_PAIRS + 1  # header + the top pairs
    assert page.count("<td>class-") >= K  # every class in the per-class table
    assert f'data-value="{metrics["accuracy"]!r}"' in page


# ----------------------------------------------------------------------------------------------
# several runs


def test_comparison_names_every_run_and_overlays_the_curves(tiny_run, tmp_path, capsys):
    runs = []
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_run, tmp_path / name)
        runs.append(tmp_path / name)
    _inject_mistakes(runs[1])
    out = tmp_path / "cmp"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "comparison.html")
    page = (out / "comparison.html").read_text(encoding="utf-8")
    table = page[page.index('id="comparison-table"'):].split("</table>")[0]
    for i, run in enumerate(runs):
        assert f"<td>{run.name}</td>" in table
        acc = read_json(RunPaths(run).metrics)["accuracy"]
        assert f'id="test-accuracy-{i}" class="value" data-value="{acc!r}"' in table
    assert table.count('<tr class="best">') == 1 and "<tr class=\"best\"><td>alpha</td>" in table
    for bad in EXTERNAL:
        assert bad not in page, bad
    assert _embedded_pngs(page) == [(out / "plots" / "comparison_curves.png").read_bytes()]
    _check_png(out / "plots" / "comparison_curves.png")


def test_comparison_refuses_one_run_or_the_same_run_twice(tiny_run, tmp_path):
    with pytest.raises(UserError, match="at least two"):
        compare_runs([tiny_run], tmp_path / "cmp")
    with pytest.raises(UserError, match="twice"):
        compare_runs([tiny_run, tiny_run], tmp_path / "cmp")


# ----------------------------------------------------------------------------------------------
# pieces


def test_most_confused_orders_pairs_by_count():
    cm = np.array([[5, 3, 0], [1, 6, 0], [4, 0, 2]])
    pairs = most_confused(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("c", "a", 4), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[0]["fraction"] == pytest.approx(4 / 6)
    assert most_confused(np.eye(3, dtype=int) * 5, ["a", "b", "c"]) == []


def test_html_escapes_text_but_not_markup():
    cell = html.table(["<b>", "x"], [["a<script>&", html.Markup("<i>ok</i>")]])
    assert "&lt;script&gt;&amp;" in cell and "<script>" not in cell and "<i>ok</i>" in cell
    assert "&lt;b&gt;" in cell
    assert html.tag("span", 'say "hi"', title='a"b') == '<span title="a&quot;b">say &quot;hi&quot;</span>'


def test_curves_without_validation(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5 + e / 10, "val_loss": None,
                "val_acc": None} for e in range(1, 4)]
    _check_png(figures.training_curves(history, tmp_path / "c.png", "no validation"))


def test_report_on_damaged_metrics_says_to_evaluate_again(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    paths = RunPaths(run)
    damaged = {k: v for k, v in read_json(paths.metrics).items() if k != "per_class"}
    write_json(paths.metrics, damaged)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks per_class" in err and "imgflow evaluate" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# run files of the wrong shape: one line naming the file and the field, for every command


def _edit_json(path: Path, change) -> None:
    """change(content) edits the content in place, or returns a replacement for all of it."""
    content = read_json(path)
    replacement = change(content)
    write_json(path, content if replacement is None else replacement)


def _set(*keys_and_value):
    *keys, last, value = keys_and_value

    def change(content):
        for key in keys:
            content = content[key]
        content[last] = value
    return change


CONFIG_DAMAGE = {
    "a list": (lambda c: [], "the file is a list, expected an object"),
    "empty": (lambda c: {}, "'train' is missing"),
    "no train": (lambda c: {k: v for k, v in c.items() if k != "train"}, "'train' is missing"),
    "model a string": (_set("model", "x"), "'model' is a string (\"x\"), expected an object"),
    "preprocessing null": (_set("preprocessing", None), "'preprocessing' is null, expected an object"),
    "epochs a string": (_set("train", "epochs", "x"), "'train.epochs' is a string (\"x\"), expected an integer"),
    "mean too short": (_set("preprocessing", "mean", [0.5]), "'preprocessing.mean' has 1 items, expected 3"),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_damaged_config_json_is_one_line_for_every_command(tiny_run, tiny_data, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    change, detail = CONFIG_DAMAGE[damage]
    _edit_json(run / "config.json", change)
    image = next((tiny_data / "test" / "a").iterdir())
    for argv in (["evaluate", str(run)], ["report", str(run)], ["predict", str(run), str(image)],
                 ["export", str(run), "--out", str(tmp_path / "export")],
                 ["report", str(tiny_run), str(run), "--out", str(tmp_path / "compare")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err == (f"imgflow: error: {run / 'config.json'} is not a valid imgflow run config: {detail}; "
                       "restore it, or train the run again (imgflow train ... --overwrite)"), argv
    assert not (tmp_path / "export").exists() and not (tmp_path / "compare").exists()


METRICS_DAMAGE = {
    "accuracy a word": (_set("accuracy", "high"), "'accuracy' is a string (\"high\"), expected a number"),
    "confusion a word": (_set("confusion_matrix", "x"), "'confusion_matrix' is a string"),
    "confusion not square": (_set("confusion_matrix", [[13, 0, 0]]), "'confusion_matrix' has 1 items, expected 3"),
    "support a fraction": (_set("per_class", "a", "support", 1.5),
                           "'per_class.a.support' is a number (1.5), expected an integer"),
    "a list": (lambda m: [], "the file is a list, expected an object"),
}


@pytest.mark.parametrize("damage", METRICS_DAMAGE)
def test_a_damaged_metrics_json_says_to_evaluate_again(tiny_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    change, detail = METRICS_DAMAGE[damage]
    _edit_json(RunPaths(run).metrics, change)
    for argv in (["report", str(run)], ["report", str(tiny_run), str(run), "--out", str(tmp_path / "cmp")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"imgflow: error: {RunPaths(run).metrics} is not a valid imgflow metrics file: {detail}")
        assert err.endswith(f"; re-run 'imgflow evaluate {run}'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, detail", [
    (b"epoch,train_loss\n\xff\xfe\n", "byte 0xff at offset 17 is not UTF-8 text"),
    (b"epoch,train_loss\n1,0.5\n", "its header lacks train_acc, val_loss, val_acc, lr, seconds"),
    (b"epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\nx,y,z,,,,\n", "line 2 holds a cell that is not a number"),
    (b"epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n1,0.5\n", "line 2 does not have one cell per column"),
])
def test_a_damaged_history_csv_is_one_line(tiny_run, tmp_path, capsys, content, detail):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    RunPaths(run).history.write_bytes(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"imgflow: error: {RunPaths(run).history} is not a valid imgflow history: {detail}; "
                   "restore it, or train the run again (imgflow train ... --overwrite)")


@pytest.mark.parametrize("cut", [100, -10])
def test_a_truncated_predictions_file_says_to_evaluate_again(tiny_run, tmp_path, capsys, cut):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    predictions = RunPaths(run).predictions
    predictions.write_bytes(predictions.read_bytes()[:cut])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"imgflow: error: cannot read {predictions}: ") and len(err.splitlines()) == 1
    assert err.endswith(f"re-run 'imgflow evaluate {run}'")
