"""imgflow's own models as backbones: `--weights RUN_DIR` starts a fast-*/resnet9 run from another
run's model.safetensors (a new head for other classes), with --finetune and --freeze-backbone;
another architecture is refused in one line; config.json records the source and its sha256."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny
from datagen import make_image_folder
from imgflow.cli import main
from imgflow.models import create_model
from imgflow.models.backbone import load_run_weights


@pytest.fixture(scope="module")
def source_run(tiny_data, tmp_path_factory) -> Path:
    """A fast-small run on tiny_data's 3 classes: the backbone the tests start from."""
    run = tmp_path_factory.mktemp("source") / "run"
    train_tiny(tiny_data, run, model="fast-small", epochs=2, lr=0.01)
    return run


@pytest.fixture(scope="module")
def other_task(tmp_path_factory) -> Path:
    """Another task: 2 classes (so the head's shape differs), 16x16 like tiny_data."""
    return make_image_folder(tmp_path_factory.mktemp("other") / "data", classes=("x", "y"), per_class=20,
                             size=(16, 16), seed=5)


def _without_head(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_tensor_but_a_head_of_another_shape_comes_from_the_run(source_run):
    source = load_file(str(source_run / "model.safetensors"))
    torch.manual_seed(0)
    model = create_model("fast-small", num_classes=2, image_size=(16, 16))
    fresh_head = model.head.weight.detach().clone()
    load_run_weights(model, "fast-small", str(source_run))
    state = model.state_dict()
    assert _same(_without_head(state), _without_head(source))  # whitening stem and BatchNorm statistics too
    assert state["head.weight"].shape == (2, source["head.weight"].shape[1])
    assert torch.equal(state["head.weight"], fresh_head)  # new classes: the fresh head is kept

    same_classes = create_model("fast-small", num_classes=3, image_size=(16, 16))
    load_run_weights(same_classes, "fast-small", str(source_run / "model.safetensors"))  # the file works too
    assert _same(same_classes.state_dict(), source)  # the same classes: the head as well


def test_finetune_from_a_run_records_its_source_and_trains_every_stage(source_run, other_task, tmp_path):
    run = tmp_path / "run"
    train_tiny(other_task, run, model="fast-small", epochs=2, lr=0.01, weights=str(source_run), finetune=True)
    config = json.loads((run / "config.json").read_text())
    source_file = source_run / "model.safetensors"
    assert config["model"]["weights_source"] == {
        "kind": "local", "path": str(source_run.resolve()), "file": str(source_file.resolve()),
        "sha256": hashlib.sha256(source_file.read_bytes()).hexdigest()}
    assert config["train"]["weights"] == str(source_run.resolve())
    final, source = load_file(str(run / "model.safetensors")), load_file(str(source_file))
    assert final["head.weight"].shape[0] == 2
    assert not torch.equal(final["groups.0.conv.weight"], source["groups.0.conv.weight"])  # unfrozen in epoch 2
    assert torch.equal(final["stem.conv.weight"], source["stem.conv.weight"])  # the whitening filters stay fixed


def test_freeze_backbone_on_a_runs_weights_trains_the_head_only(source_run, other_task, tmp_path):
    run = tmp_path / "run"
    train_tiny(other_task, run, model="fast-small", epochs=2, lr=0.01, weights=str(source_run),
               freeze_backbone=True)
    final, source = load_file(str(run / "model.safetensors")), load_file(str(source_run / "model.safetensors"))
    assert _same(_without_head(final), _without_head(source))  # BatchNorm statistics kept too


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_fastnet_trains_its_head_on_cached_features_in_any_precision(source_run, other_task, tmp_path,
                                                                             caplog, precision):
    """The caching check compares the head on cached features with the whole model in the run's
    precision: in bf16 too (it used to compute the head in fp32 there and refuse to cache)."""
    caplog.set_level("INFO")
    train_tiny(other_task, tmp_path / "run", model="fast-small", epochs=1, lr=0.01, weights=str(source_run),
               freeze_backbone=True, augment="none", precision=precision)
    assert "computed once" in caplog.text and "not cached" not in caplog.text


@pytest.mark.parametrize("model, weights, words", [
    ("fast-medium", "RUN", "is a fast-small run: this run's model is fast-medium"),
    ("fast-small", "NOWHERE", "no imgflow run there"),
    ("seed-baseline", "RUN", "need an hf: model or one with a separate head"),
])
def test_weights_that_do_not_fit_are_refused_in_one_line(source_run, other_task, tmp_path, capsys,
                                                         model, weights, words):
    where = str(source_run) if weights == "RUN" else str(tmp_path / "nowhere")
    rc = main(["train", str(other_task), "--model", model, "--weights", where, "--epochs", "1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def test_pretrained_stays_for_hf_models(other_task, tmp_path, capsys):
    rc = main(["train", str(other_task), "--model", "fast-small", "--pretrained", "--out", str(tmp_path / "run")])
    assert rc == 2 and "--weights RUN_DIR" in capsys.readouterr().err


def test_fastnets_stages_are_its_stem_then_each_group_and_unfreezing_keeps_the_fixed_filters():
    model = create_model("fast-small", num_classes=2, image_size=(16, 16))
    names = {id(p): n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("groups") else "")
             for n, p in model.named_parameters()}
    assert [{names[id(p)] for p in stage} for stage in model.backbone_stages()] == \
        [{"stem"}, {"groups.0"}, {"groups.1"}, {"groups.2"}]
    trainable = [p.requires_grad for p in model.parameters()]
    model.freeze_backbone(True)
    assert [p.requires_grad for p in model.parameters()] == [False] * (len(trainable) - 1) + [True]
    model.freeze_backbone(False)
    assert [p.requires_grad for p in model.parameters()] == trainable  # the whitening weight stays fixed


def test_finetuning_a_fastnet_grades_its_groups_learning_rates(tiny_data):
    from imgflow.training.config import resolve_config
    from imgflow.training.optim import build_optimizer, stage_lr_scales

    config = resolve_config(str(tiny_data), dict(model="fast-small", finetune=True))
    model = create_model("fast-small", num_classes=3, image_size=(16, 16))
    groups = build_optimizer(model, config).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert {id(p) for p in model.parameters() if p.requires_grad} <= set(ids)  # every trainable one in a group
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    by_stage = [{scale_of[id(p)] for p in stage} for stage in model.backbone_stages()]
    assert by_stage == [{s} for s in stage_lr_scales(4)]  # stem lowest, each group higher, the last at 1/10
    assert {scale_of[id(p)] for p in model.head_parameters()} == {1.0}
