"""`imgflow export`: ONNX + TorchScript that load without imgflow, model.json, the parity check."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from imgflow.cli import main
from imgflow.exporting import CARD_METADATA_KEY, PARITY_TOLERANCE
from imgflow.prediction import predict_files

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    """Both formats exported from the tiny run through the CLI: (out dir, printed table)."""
    out = tmp_path_factory.mktemp("export") / "export"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", str(tiny_run), "--out", str(out)])
    assert rc == 0, stdout.getvalue()
    return out, stdout.getvalue()


def test_export_writes_both_formats_and_passes_parity(exported, tiny_data):
    out, printed = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json", "model.onnx", "model.torchscript.pt", "parity.json"]  # no temp files left
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True and set(parity["formats"]) == {"onnx", "torchscript"}
    n_test = sum(1 for p in (tiny_data / "test").rglob("*.png"))
    for fmt, r in parity["formats"].items():
        assert r["images"] == n_test and r["image_source"].startswith("test split")
        assert r["max_abs_prob_diff"] <= PARITY_TOLERANCE and r["top1_mismatches"] == 0, (fmt, r)
        assert r["passed"] is True
    assert parity["formats"]["onnx"]["opset"] >= 17
    rows = {line.split()[0]: line.split() for line in printed.splitlines()}
    assert rows["onnx"][-1] == "ok" and rows["torchscript"][-1] == "ok"
    assert rows["onnx"][1] == str(n_test) and rows["onnx"][4] == f"{n_test}/{n_test}"

    card = json.loads((out / "model.json").read_text())
    assert card["classes"] == CLASSES
    assert {k: card["input"][k] for k in ("layout", "dtype", "shape", "image_size", "channels",
                                      "channel_order", "mean", "std")} == {
        "layout": "NCHW", "dtype": "float32", "shape": ["batch", 3, 16, 16], "image_size": [16, 16],
        "channels": 3, "channel_order": "RGB", "mean": [0.0] * 3, "std": [1.0] * 3}
    assert "formula" in card["input"] and card["output"]["name"] == "logits"
    assert "logits" in card["output"]["meaning"]


def test_onnx_file_is_valid_with_dynamic_batch_and_embedded_card(exported):
    import onnx

    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[CARD_METADATA_KEY]) == json.loads((out / "model.json").read_text())


# The README example, run as written in a fresh interpreter (plus the TorchScript twin): only
# onnxruntime / torch, NumPy, Pillow and model.json; it must work without imgflow.
FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    export, images = sys.argv[1], sys.argv[2:]
    card = json.load(open(f"{export}/model.json"))
    inp = card["input"]
    H, W = inp["image_size"]

    def load(path):
        image = Image.open(path).convert(inp["channel_order"]).resize((W, H), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32).reshape(H, W, -1) / 255
        x = (x - np.array(inp["mean"], np.float32)) / np.array(inp["std"], np.float32)
        return x.transpose(2, 0, 1)  # HWC -> CHW

    x = np.stack([load(p) for p in images]).astype(np.float32)
    session = ort.InferenceSession(f"{export}/model.onnx")
    onnx_logits = session.run(None, {inp["name"]: x})[0]

    import torch
    ts = torch.jit.load(f"{export}/model.torchscript.pt")
    ts_logits = ts(torch.from_numpy(x)).detach().numpy()

    assert "imgflow" not in sys.modules, "the export must not need imgflow"
    print(json.dumps({"classes": card["classes"], "onnx": onnx_logits.tolist(),
                      "torchscript": ts_logits.tolist()}))
""")


def _probabilities(results: list[dict]) -> np.ndarray:
    return np.array([[{t["class"]: t["probability"] for t in r["top"]}[c] for c in CLASSES]
                     for r in results])


def test_exports_load_in_a_fresh_process_without_imgflow(exported, tiny_run, tiny_data, tmp_path):
    out, _ = exported
    files = [tiny_data / "test" / c / "000.png" for c in CLASSES]
    script = tmp_path / "consumer.py"
    script.write_text(FRESH_PROCESS)
    # -I: isolated mode, so neither the tests' directory nor the cwd is on sys.path.
    proc = subprocess.run([sys.executable, "-I", str(script), str(out), *map(str, files)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["classes"] == CLASSES
    expected = _probabilities(predict_files(tiny_run, files, top_k=3, progress=False))
    for fmt in ("onnx", "torchscript"):
        logits = np.array(got[fmt])
        assert logits.shape == (3, 3)  # a batch of 3 through the dynamic batch dimension
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5, err_msg=fmt)
        assert [CLASSES[i] for i in probs.argmax(1)] == CLASSES


def test_predict_onnx_equals_predict_run(exported, tiny_run, tiny_data, capsys):
    out, _ = exported
    test = tiny_data / "test"
    from_run = predict_files(tiny_run, [test], top_k=3, progress=False)
    from_onnx = predict_files(None, [test], top_k=3, onnx=out / "model.onnx", progress=False)
    assert [r["image"] for r in from_onnx] == [r["image"] for r in from_run]
    assert [r["top"][0]["class"] for r in from_onnx] == [r["top"][0]["class"] for r in from_run]
    np.testing.assert_allclose(_probabilities(from_onnx), _probabilities(from_run), rtol=0, atol=1e-5)
    # Both spellings on the command line: the .onnx first, or --onnx.
    image = str(test / "b" / "000.png")
    for argv in (["predict", str(out / "model.onnx"), image, "--json"],
                 ["predict", "--onnx", str(out / "model.onnx"), image, "--json"]):
        assert main(argv) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["image"] == image and result["top"][0]["class"] == "b"


def test_predict_onnx_does_not_import_torch(exported, tiny_data, tmp_path):
    out, _ = exported
    code = ("import sys; from imgflow.cli import main; "
            f"rc = main(['predict', '--onnx', {str(out / 'model.onnx')!r}, "
            f"{str(tiny_data / 'test' / 'c' / '000.png')!r}, '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["top"][0]["class"] == "c"


def test_predict_onnx_errors_are_exit_2(exported, tiny_run, tiny_data, tmp_path, capsys):
    out, _ = exported
    image = str(tiny_data / "test" / "a" / "000.png")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    for argv in (["predict", "--onnx", str(tmp_path / "missing.onnx"), image],
                 ["predict", "--onnx", str(bad), image],
                 ["predict", "--onnx", str(out / "model.onnx"), image, "--tta"],
                 ["predict", str(tiny_run), image, "--onnx", str(out / "model.onnx")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("imgflow: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("edit", ["image_size", "channels", "mean", "classes", "more_classes"])
def test_predict_onnx_refuses_a_model_json_of_another_model(exported, tiny_data, tmp_path, capsys, edit):
    """A model.json that does not fit the graph: one line and exit 2, not a traceback or
    wrongly labelled scores."""
    out, _ = exported
    card = json.loads((out / "model.json").read_text())
    changes = {"image_size": ("input", "image_size", [12, 12]), "channels": ("input", "channels", 1),
               "mean": ("input", "mean", [0.0, 0.0]), "classes": (None, "classes", ["a", "b"]),
               "more_classes": (None, "classes", ["a", "b", "c", "d", "e"])}
    section, key, value = changes[edit]
    (card[section] if section else card)[key] = value
    (tmp_path / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    (tmp_path / "model.json").write_text(json.dumps(card))
    assert main(["predict", str(tmp_path / "model.onnx"), str(tiny_data / "test" / "a" / "000.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgflow: error: model.json does not describe") and err.count("\n") == 1, err


def _run_with_other_weights(tiny_run: Path, run_dir: Path) -> Path:
    """A copy of tiny_run whose model is another one (its weights nudged)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_run, run_dir)
    state = {k: v + 0.01 if v.is_floating_point() else v
             for k, v in load_file(str(run_dir / "model.safetensors")).items()}
    save_file(state, str(run_dir / "model.safetensors"))
    return run_dir


def test_an_export_directory_never_mixes_models(tiny_run, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    # The same model may add a format...
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert set(json.loads((out / "parity.json").read_text())["formats"]) == {"onnx", "torchscript"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # ...another model may not: model.json would describe it beside the first one's files.
    other = _run_with_other_weights(tiny_run, tmp_path / "other")
    assert main(["export", str(other), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds the export of another model" in err and "another --out" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Model files nobody describes could be anyone's.
    (out / "model.json").unlink()
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 2
    assert "no model.json" in capsys.readouterr().err


def test_failed_parity_is_exit_1_and_installs_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    import imgflow.exporting as exporting

    good = exporting._RUNNERS["torchscript"]

    def perturbed(path):  # an "export" whose logits are off: the check must catch it
        run = good(path)
        return lambda x: run(x) + exporting.torch.linspace(0, 1, 3)

    monkeypatch.setitem(exporting._RUNNERS, "torchscript", perturbed)
    out = tmp_path / "out"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0  # a good export
    installed = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 1
    printed, err = capsys.readouterr()
    assert "FAILED" in printed and err.startswith("imgflow: error: parity check failed for torchscript")
    assert sorted(p.name for p in out.iterdir()) == sorted([*installed, "parity-failed.json"])
    assert all((out / name).read_bytes() == data for name, data in installed.items())  # parity.json too
    parity = json.loads((out / "parity-failed.json").read_text())
    assert parity["passed"] is False and parity["formats"]["torchscript"]["max_abs_prob_diff"] > 1e-4
    monkeypatch.setitem(exporting._RUNNERS, "torchscript", good)
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert not (out / "parity-failed.json").exists()  # the failure is history once it passes


def test_export_bad_run_dir_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgflow: error: run directory not found") and err.count("\n") == 1


def test_an_onnx_file_with_a_damaged_embedded_card_is_one_line(exported, tmp_path, capsys):
    import onnx

    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == CARD_METADATA_KEY:
            prop.value = prop.value[: len(prop.value) // 2]  # cut mid-way: not JSON any more
    alone = tmp_path / "alone"
    alone.mkdir()
    onnx.save(proto, str(alone / "model.onnx"))  # no model.json beside it: the embedded card is read
    assert main(["predict", str(alone / "model.onnx"), str(alone)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embedded model card is not valid JSON" in err


def test_an_unknown_or_missing_format_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    from imgflow.errors import UserError
    from imgflow.exporting import export_run

    out = tmp_path / "export"
    with pytest.raises(UserError, match=r"^1 unknown export format \(png\): use onnx, torchscript$"):
        export_run(tiny_run, out, formats=["onnx", "png"])
    with pytest.raises(UserError, match=r"^2 unknown export formats \(jpeg, png\): "):
        export_run(tiny_run, out, formats=["png", "jpeg"])
    with pytest.raises(UserError, match=r"^no export format given: use onnx, torchscript$"):
        export_run(tiny_run, out, formats=[])
    assert not out.exists()
