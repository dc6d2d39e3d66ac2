"""hf: models (models.hf): local weights, the model's own normalisation, --finetune's frozen phase
and discriminative learning rates, exact resume, the weights' source in config.json, predict and
ONNX export; and one line when transformers is missing. No downloads: tiny models are built from
transformers' own config classes and saved with save_pretrained."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import train_tiny as _train_tiny  # noqa: E402
from imgflow.cli import main  # noqa: E402
from imgflow.models import create_model  # noqa: E402
from imgflow.training.config import resolve_config  # noqa: E402
from imgflow.training.optim import (EARLIEST_LR_SCALE, LATEST_LR_SCALE, build_optimizer, set_lr,  # noqa: E402
                                   stage_lr_scales)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as a real checkpoint has


def _save_tiny_resnet(where: Path, seed: int, preprocessor: bool = True) -> Path:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=5)  # 5 classes: the head must be replaced for the data's 3
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config)
    with torch.no_grad():  # running statistics a frozen backbone must keep (fresh ones are 0 and 1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(where)
    if preprocessor:
        (where / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": MEAN, "image_std": STD, "size": {"shortest_edge": 224}}))
    return where


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> Path:
    return _save_tiny_resnet(tmp_path_factory.mktemp("hf") / "resnet", seed=0)


@pytest.fixture(scope="module")
def other_resnet(tmp_path_factory) -> Path:
    """The same architecture with other weights (and no preprocessor_config.json)."""
    return _save_tiny_resnet(tmp_path_factory.mktemp("hf") / "other", seed=1, preprocessor=False)


def _backbone(state: dict, prefix: str = "") -> dict:
    """The backbone's tensors (the head, `classifier`, left out), keys without `prefix`."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("classifier")}


def _saved_state(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_model_loads_the_saved_backbone_with_a_new_head(tiny_resnet):
    from transformers import ResNetForImageClassification

    model = create_model(f"hf:{tiny_resnet}", num_classes=3, image_size=(16, 16)).eval()
    saved = ResNetForImageClassification.from_pretrained(tiny_resnet).eval()
    assert _same(_backbone(model.state_dict(), "net."), _backbone(saved.state_dict()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.net.resnet(x).pooler_output, saved.resnet(x).pooler_output)
        assert model(x).shape == (2, 3)  # plain logits, of the data's classes


@pytest.mark.parametrize("as_file", [False, True])
def test_weights_option_loads_a_directory_or_a_file(tiny_resnet, other_resnet, as_file):
    weights = other_resnet / "model.safetensors" if as_file else other_resnet
    model = create_model(f"hf:{tiny_resnet}", num_classes=3, image_size=(16, 16), weights=str(weights))
    assert _same(_backbone(model.state_dict(), "net."), _backbone(_saved_state(other_resnet)))


def test_freeze_backbone_trains_the_head_only_and_keeps_batchnorm_statistics(tiny_data, tiny_resnet, tmp_path):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, model=f"hf:{tiny_resnet}", epochs=2, freeze_backbone=True, lr=0.01)
    trained = _saved_state(run)
    assert _same(_backbone(trained, "net."), _backbone(_saved_state(tiny_resnet)))  # running stats too
    torch.manual_seed(0)  # the run's seed: the same fresh head it started from
    initial = create_model(f"hf:{tiny_resnet}", 3, image_size=(16, 16)).state_dict()
    assert not torch.equal(trained["net.classifier.1.weight"], initial["net.classifier.1.weight"])


def test_finetune_freezes_the_backbone_for_its_epochs_then_trains_it(tiny_data, tiny_resnet, tmp_path):
    stopped_after = []

    def stop_after_first(row):
        stopped_after.append(row["epoch"])
        raise _Stop

    from imgflow.training.loop import train

    run = tmp_path / "run"
    settings = dict(model=f"hf:{tiny_resnet}", epochs=3, batch_size=16, precision="fp32", finetune=True,
                    freeze_epochs=1, lr=0.01, image_size=(16, 16))
    with pytest.raises(_Stop):
        train(resolve_config(str(tiny_data), settings), run, progress=False, on_epoch=stop_after_first)
    assert stopped_after == [1]
    after_frozen = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    initial = create_model(f"hf:{tiny_resnet}", 3, image_size=(16, 16)).state_dict()
    assert _same(_backbone(after_frozen, "net."), _backbone(initial, "net."))
    assert not torch.equal(after_frozen["net.classifier.1.weight"], initial["net.classifier.1.weight"])

    train_tiny(tiny_data, run, resume=True, **settings)
    final = _saved_state(run)
    changed = [k for k, v in _backbone(final, "net.").items() if not torch.equal(v, initial[f"net.{k}"])]
    assert any(k.endswith("convolution.weight") for k in changed)  # unfrozen after epoch 1

    # Exact resume: the same run without the stop gives the same weights.
    reference = tmp_path / "reference"
    train_tiny(tiny_data, reference, **settings)
    assert _same(_saved_state(reference), final)
    assert _history(reference) == _history(run)


def train_tiny(data: Path, run_dir: Path, **overrides):
    """conftest's train_tiny at the data's own 16x16: tiny_resnet's preprocessor_config.json
    says 224, which an hf: run takes by default (tested on its own)."""
    return _train_tiny(data, run_dir, **{"image_size": (16, 16), **overrides})


class _Stop(Exception):
    pass


def _history(run: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    return [row[:-1] for row in rows]  # without the seconds


def _lr_of(model, config, lr: float = 0.02) -> dict[int, float]:
    optimizer = build_optimizer(model, config)
    set_lr(optimizer, lr)
    groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(groups) == len(set(groups)), "a parameter in two groups"
    assert all(g["lr"] == pytest.approx(lr * g["lr_scale"]) for g in optimizer.param_groups)
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_finetune_grades_the_backbones_learning_rates_from_its_stem_to_its_last_stage(
        tiny_data, tiny_resnet, freeze_backbone):
    config = resolve_config(str(tiny_data), dict(model=f"hf:{tiny_resnet}", finetune=not freeze_backbone,
                                                 freeze_backbone=freeze_backbone, weight_decay=1e-4))
    model = create_model(config.model, 3, image_size=(16, 16))
    lr_of = _lr_of(model, config)
    assert model.head_parameters() and all(lr_of[id(p)] == pytest.approx(0.02) for p in model.head_parameters())
    if freeze_backbone:
        assert not any(id(p) in lr_of for p in model.backbone_parameters())
        return
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)  # every one in a group
    # tiny_resnet: the embedder (stem) and its 2 stages, in the order the image runs through them.
    stem, first, last = (f"net.resnet.{part}" for part in ("embedder", "encoder.stages.0", "encoder.stages.1"))
    lr_by_name = {name: lr_of[id(p)] for name, p in model.named_parameters()}
    lrs = [{lr for name, lr in lr_by_name.items() if name.startswith(part)} for part in (stem, first, last)]
    assert all(len(lr) == 1 for lr in lrs), lrs  # one lr per stage
    (stem_lr,), (first_lr,), (last_lr,) = lrs
    assert stem_lr == pytest.approx(0.02 * EARLIEST_LR_SCALE) and last_lr == pytest.approx(0.02 * LATEST_LR_SCALE)
    assert stem_lr < first_lr < last_lr and first_lr == pytest.approx((stem_lr * last_lr) ** 0.5)  # geometric
    decays = {id(p): g["weight_decay"] for g in build_optimizer(model, config).param_groups for p in g["params"]}
    assert all(decays[id(p)] == 0 for p in model.parameters() if p.ndim < 2)


def test_stage_lr_scales_run_geometrically_from_a_hundredth_to_a_tenth():
    assert stage_lr_scales(1) == [LATEST_LR_SCALE]
    scales = stage_lr_scales(5)
    assert scales[0] == pytest.approx(0.01) and scales[-1] == pytest.approx(0.1)
    assert all(b / a == pytest.approx(10 ** 0.25) for a, b in zip(scales, scales[1:]))


def test_a_vision_transformers_stages_are_its_embeddings_then_each_layer(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=2, intermediate_size=32, num_labels=5))
    vit.save_pretrained(tmp_path / "vit")
    model = create_model(f"hf:{tmp_path / 'vit'}", 3, image_size=(16, 16))
    def part(name: str) -> str:  # net.vit.embeddings.x -> embeddings; net.vit.layer(s).1.x -> 1
        parts = name.split(".")[2:]
        return parts[1] if parts[0].startswith("layer") and parts[0] != "layernorm" else parts[0]

    names = {id(p): n for n, p in model.named_parameters()}
    stages = [{part(names[id(p)]) for p in stage} for stage in model.backbone_stages()]
    assert stages == [{"embeddings"}, {"0"}, {"1"}, {"2", "layernorm"}]  # the final norm joins the last layer
    assert sum(len(s) for s in model.backbone_stages()) == len(model.backbone_parameters())


def test_config_json_records_the_weights_source_and_the_models_normalisation(tiny_data, tiny_resnet,
                                                                              other_resnet, tmp_path):
    run = tmp_path / "run"
    train_tiny(tiny_data, run, model=f"hf:{tiny_resnet}", epochs=1, weights=str(other_resnet / "model.safetensors"))
    config = json.loads((run / "config.json").read_text())
    import hashlib

    source = config["model"]["weights_source"]
    assert source["kind"] == "local" and source["path"] == str((other_resnet / "model.safetensors").resolve())
    assert source["sha256"] == hashlib.sha256((other_resnet / "model.safetensors").read_bytes()).hexdigest()
    assert config["train"]["weights"] == str((other_resnet / "model.safetensors").resolve())
    # The model's own mean/std (from tiny_resnet's preprocessor_config.json), not /255 scaling.
    assert config["preprocessing"]["mean"] == pytest.approx(MEAN)
    assert config["preprocessing"]["std"] == pytest.approx(STD)


@pytest.fixture(scope="module")
def hf_run(tiny_data, tiny_resnet, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hfrun") / "run"
    train_tiny(tiny_data, run, model=f"hf:{tiny_resnet}", epochs=2, finetune=True, lr=0.01)
    return run


def test_predict_and_onnx_export_of_an_hf_run(hf_run, tiny_data, tiny_resnet, tmp_path, capsys):
    """Without the hf: directory: the run rebuilds the architecture from its config.json."""
    from imgflow.prediction import predict_files

    moved = tiny_resnet.with_name("moved")
    tiny_resnet.rename(moved)
    try:
        _predict_and_export(hf_run, tiny_data, tmp_path, capsys, predict_files)
    finally:
        moved.rename(tiny_resnet)


def _predict_and_export(hf_run, tiny_data, tmp_path, capsys, predict_files):
    image = next((tiny_data / "test").rglob("*.png"))
    results = predict_files(hf_run, [image], progress=False)
    assert len(results) == 1 and results[0]["top"][0]["class"] in ("a", "b", "c")
    out = tmp_path / "export"
    assert main(["export", str(hf_run), "--out", str(out)]) == 0, capsys.readouterr()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True and parity["formats"]["onnx"]["top1_mismatches"] == 0
    card = json.loads((out / "model.json").read_text())
    assert card["input"]["mean"] == pytest.approx(MEAN)


def test_without_transformers_train_says_how_to_install_it_in_one_line(tiny_data, tiny_resnet, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    rc = main(["train", str(tiny_data), "--model", f"hf:{tiny_resnet}", "--epochs", "1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "pip install 'imgflow[pretrained]'" in err


def test_the_input_size_defaults_to_the_models_own(tiny_data, tiny_resnet, other_resnet):
    config = resolve_config(str(tiny_data), dict(model=f"hf:{tiny_resnet}"))
    assert config.image_size == (224, 224)  # tiny_resnet's preprocessor_config.json: shortest_edge 224
    assert resolve_config(str(tiny_data), dict(model=f"hf:{tiny_resnet}", image_size=(16, 16))).image_size == (16, 16)
    assert resolve_config(str(tiny_data), dict(model=f"hf:{other_resnet}")).image_size is None  # none said


def test_a_vision_transformer_trains_from_local_weights(tiny_data, tmp_path):
    """Not only ResNet: a tiny ViT (LayerNorm, no BatchNorm, a fixed input size) fine-tunes too."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32, num_labels=5))
    vit.save_pretrained(tmp_path / "vit")
    run = tmp_path / "run"
    result = train_tiny(tiny_data, run, model=f"hf:{tmp_path / 'vit'}", epochs=2, finetune=True, lr=0.01)
    assert len(result.history) == 2
    torch.manual_seed(0)
    initial = create_model(f"hf:{tmp_path / 'vit'}", 3, image_size=(16, 16)).state_dict()
    final = _saved_state(run)
    assert not torch.equal(final["net.classifier.weight"], initial["net.classifier.weight"])
    assert not torch.equal(final["net.vit.embeddings.patch_embeddings.projection.weight"],
                           initial["net.vit.embeddings.patch_embeddings.projection.weight"])


@pytest.mark.parametrize("options, words", [
    (["--model", "seed-baseline", "--finetune"], "need an hf: model"),
    (["--model", "seed-baseline", "--weights", "x"], "need an hf: model"),
])
def test_hf_options_without_an_hf_model_are_refused(tiny_data, tmp_path, capsys, options, words):
    rc = main(["train", str(tiny_data), *options, "--out", str(tmp_path / "run")])
    assert rc == 2 and words in capsys.readouterr().err


def _trained_with_and_without_the_cache(tiny_data, tiny_resnet, tmp_path, monkeypatch, caplog):
    import logging

    import imgflow.training.loop as loop

    settings = dict(model=f"hf:{tiny_resnet}", epochs=2, freeze_backbone=True, lr=0.05)
    with caplog.at_level(logging.INFO, logger="imgflow.training.features"):
        train_tiny(tiny_data, tmp_path / "cached", **settings)
    assert "computed once" in caplog.text
    with monkeypatch.context() as patch:
        patch.setattr(loop, "caches_features", lambda config, ranks: False)
        train_tiny(tiny_data, tmp_path / "through", **settings)
    return tmp_path / "cached", tmp_path / "through", settings


def test_the_head_trained_on_cached_features_is_the_head_trained_through_the_frozen_backbone(
        tiny_data, tiny_resnet, tmp_path, monkeypatch, caplog):
    from imgflow.prediction import predict_files

    cached, through, settings = _trained_with_and_without_the_cache(tiny_data, tiny_resnet, tmp_path,
                                                                    monkeypatch, caplog)
    a, b = _saved_state(cached), _saved_state(through)
    assert a.keys() == b.keys()  # model.safetensors holds the backbone and the head either way
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), \
        [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=1e-5)]
    assert _same(_backbone(a, "net."), _backbone(_saved_state(tiny_resnet)))
    torch.manual_seed(0)
    initial = create_model(f"hf:{tiny_resnet}", 3, image_size=(16, 16)).state_dict()
    assert not torch.equal(a["net.classifier.1.weight"], initial["net.classifier.1.weight"])  # it trained
    val_loss = [[float(row[3]) for row in _history(run)[1:]] for run in (cached, through)]
    assert val_loss[0] == pytest.approx(val_loss[1], abs=1e-4)  # validated on cached features alike
    images = sorted((tiny_data / "test").rglob("*.png"))[:6]
    p, q = (predict_files(run, images, progress=False) for run in (cached, through))
    assert [r["top"][0]["class"] for r in p] == [r["top"][0]["class"] for r in q]
    assert [r["top"][0]["probability"] for r in p] == pytest.approx([r["top"][0]["probability"] for r in q],
                                                                   abs=1e-4)

    # Exact resume: stopped after epoch 1, continued, it ends where the uninterrupted run did.
    from imgflow.training.loop import train

    def stop(row):
        raise _Stop

    resumed = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train(resolve_config(str(tiny_data), {**settings, "batch_size": 16, "precision": "fp32",
                                              "image_size": (16, 16)}), resumed, progress=False, on_epoch=stop)
    train_tiny(tiny_data, resumed, resume=True, **settings)
    assert _same(_saved_state(resumed), a) and _history(resumed) == _history(cached)


def test_features_are_not_cached_when_augmentation_changes_the_images(tiny_data, tiny_resnet, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="imgflow.training.features"):
        train_tiny(tiny_data, tmp_path / "run", model=f"hf:{tiny_resnet}", epochs=1, freeze_backbone=True,
                   augment="flip")
    said = [r.getMessage() for r in caplog.records if r.name == "imgflow.training.features"]
    assert len(said) == 1 and "not cached, as --augment flip changes the images" in said[0]
