"""Photo-scale augmentation (`--augment photo`) and the centre-crop evaluation that goes with it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_tiny
from datagen import make_image, make_image_folder
from imgflow.augment import (CROP_RATIO, augment_batch, colour_jitter, crop_boxes, photo_augment,
                             resample_boxes, step_generator)
from imgflow.cli import main
from imgflow.data.decode import RESAMPLE, center_crop
from imgflow.inference import predict_logits, tta_views
from imgflow.preprocess import Preprocessing, to_model_input
from imgflow.training.batches import EpochBatches
from imgflow.training.config import resolve_config


def _images(B=5, H=37, W=45, C=3, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (B, H, W, C), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# the augmentation


def test_photo_augment_is_a_function_of_seed_epoch_and_step():
    x = _images()

    def batch(seed, epoch, step):
        return augment_batch(x, "photo", step_generator(seed, epoch, step), size=(32, 32), crop_scale=(0.35, 1.0))

    first = batch(0, 1, 2)
    assert first.shape == (5, 32, 32, 3) and first.dtype == torch.uint8 and first.is_contiguous()
    assert torch.equal(first, batch(0, 1, 2))
    assert not torch.equal(first, batch(0, 1, 3))
    assert not torch.equal(first, batch(0, 2, 2))
    assert not torch.equal(first, batch(1, 1, 2))
    gray = augment_batch(x[..., :1], "photo", step_generator(0, 1, 2), size=(20, 24))
    assert gray.shape == (5, 20, 24, 1) and gray.dtype == torch.uint8


def test_crop_boxes_lie_inside_the_image_with_area_and_ratio_in_range():
    H, W, scale = 180, 240, (0.35, 1.0)
    top, left, h, w = crop_boxes(4000, H, W, step_generator(0, 0, 0), scale).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    area, ratio = (h * w).float() / (H * W), w.float() / h.float()
    # Rounding the sides to whole pixels moves area and ratio by about a pixel in ~100.
    assert area.min() >= scale[0] * 0.98 and area.max() <= 1.0
    assert ratio.min() >= CROP_RATIO[0] * 0.98 and ratio.max() <= CROP_RATIO[1] * 1.02
    assert area.min() < 0.4 and area.max() > 0.9  # the whole range is drawn
    assert len(set(top.tolist())) > 50 and len(set(left.tolist())) > 50  # and placed all over


def test_a_box_that_cannot_fit_falls_back_to_the_centred_largest_box_in_the_ratio_range():
    # A 20x200 strip: no box of ratio <= 4/3 covers 90% of it, so every draw falls back.
    top, left, h, w = crop_boxes(8, 20, 200, step_generator(0, 0, 0), (0.9, 1.0)).unbind(1)
    assert (h == 20).all() and (w == round(20 * 4 / 3)).all()
    assert (top == 0).all() and (left == (200 - 27) // 2).all()


def test_a_box_resampled_at_its_own_size_is_exactly_the_crop_and_mirrors_where_asked():
    x = _images(B=3)
    boxes = torch.tensor([[0, 0, 37, 45], [5, 7, 20, 30], [17, 15, 20, 30]])
    for (top, left, h, w), flip in zip(boxes.tolist(), (False, True, False)):
        out = resample_boxes(x[:1], torch.tensor([[top, left, h, w]]), (h, w), torch.tensor([flip]))
        crop = x[:1, top:top + h, left:left + w]
        expected = crop.flip(2) if flip else crop
        assert torch.equal(out.round().to(torch.uint8).permute(0, 2, 3, 1), expected)


def test_colour_jitter_keeps_pixels_in_range_and_grays_gray():
    extremes = torch.zeros(4, 3, 8, 8)
    extremes[:2] = 255.0
    extremes[::2, :, :4] = 0.0
    out = colour_jitter(extremes, step_generator(0, 0, 0), strength=0.9)
    assert out.min() >= 0 and out.max() <= 255
    gray = torch.full((6, 3, 5, 5), 100.0)
    assert torch.allclose(colour_jitter(gray, step_generator(0, 0, 1))[:, 0], colour_jitter(gray, step_generator(0, 0, 1))[:, 2])
    x = _images(B=4).permute(0, 3, 1, 2).float()
    assert torch.allclose(colour_jitter(x, step_generator(0, 0, 2), strength=0.0), x)  # no strength, no change
    changed = colour_jitter(x, step_generator(0, 0, 2))
    assert not torch.allclose(changed, x)
    # Light: brightness, contrast and saturation each within 20%: the mean moves by far less than that.
    assert ((changed.mean((1, 2, 3)) / x.mean((1, 2, 3))) - 1).abs().max() < 0.5


def test_photo_augment_output_is_uint8_over_the_full_range():
    x = torch.zeros(6, 30, 30, 3, dtype=torch.uint8)
    x[:3] = 255
    out = photo_augment(x, step_generator(0, 0, 0), (24, 24), (0.35, 1.0))
    assert out.dtype == torch.uint8 and out.shape == (6, 24, 24, 3)
    assert (out[3:] == 0).all()  # black stays black whatever the jitter


# ---------------------------------------------------------------------------------------------
# evaluation: the centre crop


def test_model_input_is_the_centre_crop_of_images_at_the_resize_size():
    prep = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (4, 6), 3, crop_pct=0.5)
    assert prep.resize_size == (8, 12)
    x = _images(B=2, H=8, W=12)
    by_hand = (x[:, 2:6, 3:9].float() / 255 - 0.5) / 0.25
    assert torch.allclose(to_model_input(x, prep), by_hand.permute(0, 3, 1, 2))
    small = _images(B=2, H=4, W=6)  # already at the model's size: taken as it is
    assert torch.allclose(to_model_input(small, prep), ((small.float() / 255 - 0.5) / 0.25).permute(0, 3, 1, 2))
    assert np.array_equal(center_crop(x.numpy(), (4, 6)), x[:, 2:6, 3:9].numpy())  # the ONNX path's NumPy crop
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    old = {k: v for k, v in prep.to_dict().items() if k not in ("crop_pct", "resize_size")}
    assert Preprocessing.from_dict(old).crop_pct == 1.0  # a run from before: no crop


def test_tta_views_of_a_photo_run_are_the_centre_and_corner_crops_and_their_mirrors():
    prep = Preprocessing((0.0,) * 3, (1.0,) * 3, (32, 32), 3, crop_pct=0.875)
    x = _images(B=2, H=37, W=37)
    views, weights = zip(*tta_views(x, prep))
    assert [tuple(v.shape) for v in views] == [(2, 32, 32, 3)] * 4 and weights == (0.25,) * 4
    assert torch.equal(views[0], x[:, 2:34, 2:34]) and torch.equal(views[1], x[:, 2:34, 2:34].flip(2))
    assert torch.equal(views[2], x[:, :32, :32].flip(2)) and torch.equal(views[3], x[:, 5:, 5:].flip(2))
    assert len(tta_views(_images(B=2, H=32, W=32), prep)) == 6  # other sizes: airbench94's flips and shifts


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 classes of RGB 'photos' of mixed sizes and aspect ratios (24x40, 40x28, 33x33)."""
    root = make_image_folder(tmp_path_factory.mktemp("photos") / "data", per_class=16, size=(24, 40))
    rng = np.random.default_rng(1)
    for k, name in enumerate("abc"):
        for split, count in (("train", 16), ("test", 5)):
            for i in range(0, count, 2):
                size = (40, 28) if i % 4 else (33, 33)
                make_image(k, 3, size, rng=rng).save(root / split / name / f"{i:03d}.png")
    return root


PHOTO = dict(model="fast-small", augment="photo", image_size=(32, 32), epochs=2, batch_size=8, threads=1,
             precision="fp32")


def test_a_mixed_size_photo_folder_trains_at_32_pixels_and_evaluates_on_the_centre_crop(photos, tmp_path):
    from imgflow.evaluation import evaluate_run
    from imgflow.prediction import RunModel, predict_images
    from imgflow.runs import load_run_data, load_trained_model

    run = tmp_path / "run"
    train_tiny(photos, run, **PHOTO)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["crop_pct"] == 0.875 and config["train"]["crop_scale"] == 0.35
    assert config["preprocessing"]["crop_pct"] == 0.875 and config["preprocessing"]["resize_size"] == [37, 37]
    assert config["data"]["image_shape"] == [37, 37, 3] and config["model"]["image_size"] == [32, 32]
    metrics = evaluate_run(run, progress=False)
    assert metrics["num_images"] == 15

    # predict reads a file as the data set's images were decoded (stretched to 37x37) and the model
    # sees its centre 32x32, as evaluate does: the same probabilities as evaluate's path.
    model, _ = load_trained_model(run)
    test = load_run_data(config["train"]).test
    prep = Preprocessing.from_dict(config["preprocessing"])
    expected = predict_logits(model, test.images, prep).softmax(1)
    files = sorted((photos / "test").rglob("*.png"))
    found = predict_images(RunModel(run), [photos / "test"], top_k=1, progress=False)
    assert [r["image"] for r in found] == [str(f) for f in files]
    top = np.array([r["top"][0]["probability"] for r in found])
    assert np.allclose(top, expected.max(1).values.numpy(), atol=1e-6)

    # One image by hand: Pillow's bilinear stretch to 37x37, the centre 32x32 (top 2, left 2), /255.
    by_hand = np.asarray(Image.open(files[0]).convert("RGB").resize((37, 37), RESAMPLE))[2:34, 2:34]
    x = to_model_input(torch.from_numpy(test.images[:1]), prep)
    assert torch.allclose(x[0], torch.from_numpy(by_hand / 255.0).float().permute(2, 0, 1))


def test_photo_batches_are_the_same_whatever_came_before(photos):
    """What --resume relies on: batch (epoch, step) depends on nothing else."""
    from imgflow.runs import load_run_data
    from imgflow.training.batches import split_for_training

    config = resolve_config(str(photos), PHOTO)
    part, _ = split_for_training(load_run_data(config.to_dict()).train, config)
    one, two = EpochBatches(part, config), EpochBatches(part, config)
    for epoch, step in ((0, 0), (0, 1), (1, 0)):
        one.batch(epoch, step)
    xb, yb = one.batch(1, 2)
    again, labels = two.batch(1, 2)
    assert xb.shape == (8, 32, 32, 3) and torch.equal(xb, again) and torch.equal(yb, labels)
    assert not torch.equal(xb, two.batch(1, 1)[0])


class _Killed(Exception):
    pass


def test_an_interrupted_photo_run_resumes_to_the_uninterrupted_weights(photos, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    monkeypatch.setenv("IMGFLOW_CHECKPOINT_SECONDS", "0")  # a checkpoint after every step, as kill -9 needs
    train_tiny(photos, tmp_path / "reference", **PHOTO)
    real = EpochBatches.batch

    def killed_mid_epoch(self, epoch, step):
        if (epoch, step) == (1, 2):
            raise _Killed
        return real(self, epoch, step)

    monkeypatch.setattr(EpochBatches, "batch", killed_mid_epoch)
    with pytest.raises(_Killed):
        train_tiny(photos, tmp_path / "run", **PHOTO)
    monkeypatch.setattr(EpochBatches, "batch", real)
    with caplog.at_level("INFO", logger="imgflow.training.loop"):
        train_tiny(photos, tmp_path / "run", resume=True, **PHOTO)
    assert "at epoch 2, step 2/" in caplog.text  # continued mid-epoch, not started again
    a, b = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_onnx_export_of_a_photo_run_passes_parity_and_predicts_as_the_run(photos, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgflow.exporting import export_run
    from imgflow.prediction import OnnxModel, RunModel, predict_images

    run = tmp_path / "run"
    train_tiny(photos, run, **{**PHOTO, "epochs": 1})
    report = export_run(run, formats=["onnx"])
    assert report["passed"]
    card = json.loads((run / "export" / "model.json").read_text())
    assert card["input"]["image_size"] == [32, 32] and card["input"]["resize_size"] == [37, 37]
    onnx = predict_images(OnnxModel(run / "export" / "model.onnx"), [photos / "test"], progress=False)
    torch_ = predict_images(RunModel(run), [photos / "test"], progress=False)
    for a, b in zip(onnx, torch_):
        assert [t["class"] for t in a["top"]][:1] == [t["class"] for t in b["top"]][:1]
        assert math.isclose(a["top"][0]["probability"], b["top"][0]["probability"], abs_tol=1e-4)


@pytest.mark.parametrize("options, words", [
    (["--crop-scale", "0.5"], "--crop-scale is for --augment photo"),
    (["--augment", "photo", "--crop-scale", "0"], "--crop-scale must be in (0, 1]"),
    (["--augment", "photo", "--crop-pct", "1.5"], "--crop-pct must be in [0.5, 1]"),
])
def test_bad_photo_options_are_one_line(tiny_data, tmp_path, capsys, options, words):
    rc = main(["train", str(tiny_data), "--model", "seed-baseline", *options, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("processor, expected", [
    # ConvNeXt / ResNet: resize to shortest_edge / crop_pct, crop shortest_edge
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, {"image_size": (224, 224), "crop_pct": 0.875}),
    ({"size": {"shortest_edge": 384}, "crop_pct": 0.875}, {"image_size": (384, 384)}),  # warped, not cropped
    # MobileViT, BEiT, CLIP...: resize to size, crop crop_size: the model sees crop_size
    ({"size": {"shortest_edge": 288}, "do_center_crop": True, "crop_size": {"height": 256, "width": 256}},
     {"image_size": (256, 256), "crop_pct": 0.8889}),
    ({"size": {"height": 224, "width": 224}}, {"image_size": (224, 224)}),  # ViT: no crop said
])
def test_an_hf_models_centre_crop_comes_from_its_preprocessor_config(tmp_path, processor, expected):
    from imgflow.models.hf import hf_preprocessing

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    assert hf_preprocessing(str(tmp_path), None) == expected


def test_an_hf_runs_crop_pct_defaults_to_the_models_own(tiny_data, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 224}, "crop_pct": 0.9}))
    settings = dict(model=f"hf:{tmp_path}", augment="photo")
    assert resolve_config(str(tiny_data), settings).crop_pct == 0.9
    assert resolve_config(str(tiny_data), {**settings, "crop_pct": 0.8}).crop_pct == 0.8  # given: kept
