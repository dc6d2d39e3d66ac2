"""The workflow and pretrained backbones (issue 21, part 4): with --backbone (or, for a folder of
photos, the default backbone in Hugging Face's cache) step 6 prices the backbone by its probed pace
and step 7 compares it frozen and fine-tuned, recording which won; without the extra or the
weights, step 6 says in one sentence what it would have tried and what that needs. Nothing is
downloaded: the backbone is a tiny ResNet built from its config class and saved with save_pretrained."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from datagen import make_image_folder
from imgflow.cli import main
from imgflow.workflow import context, steps, wording
from imgflow.workflow.decisions import OverfitOutcome, PretrainedOffer
from imgflow.workflow.record import Resize, WorkflowState


def _context(tmp_path, typical_size):
    resize = Resize(image_size=[96, 128] if typical_size else None, typical_size=typical_size)
    return context.Context(data="/photos", out=tmp_path, seed=0, budget_seconds=60, started=time.perf_counter(),
                           elapsed_before=0.0, progress=False, state=WorkflowState(resize=resize))


def test_photos_get_an_offer_and_small_images_none(tmp_path, monkeypatch):
    import imgflow.models.hf as hf

    monkeypatch.setattr(hf, "cached_snapshot", lambda hub_id: None)  # whatever this machine's cache holds
    offer = steps.pretrained_offer(_context(tmp_path, [300, 400]))
    assert offer == PretrainedOffer("microsoft/resnet-18", "/photos", hf.extra_installed(), False)
    assert steps.pretrained_offer(_context(tmp_path, [32, 32])) is None  # thumbnails: scratch models suit them
    assert steps.pretrained_offer(_context(tmp_path, None)) is None  # a named data set, or --image-size


def test_without_the_extra_the_offer_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    offer = steps.pretrained_offer(_context(tmp_path, [300, 400]))
    assert offer is not None and offer.extra_installed is False and offer.weights_cached is False


@pytest.mark.parametrize("installed, cached, words", [
    (False, False, "it needs the pretrained extra: pip install 'imgflow[pretrained]'."),
    (True, False, "the workflow downloads nothing: imgflow train /photos --model hf:microsoft/resnet-18 --finetune "
                  "--pretrained fetches them once (the workflow then finds them), or imgflow workflow --backbone "
                  "hf:DIR trains one saved in DIR."),
])
def test_step_6_words_what_it_would_have_tried_in_one_sentence(installed, cached, words):
    offer = PretrainedOffer("microsoft/resnet-18", "/photos", installed, cached)
    outcome = OverfitOutcome(model="fast-small", model_rule=None, epochs=6, train_subset=0, images_per_second=1.0,
                             best_epoch=4, verdict="overfits", patience=2, best_val_acc=0.7, final_train_acc=0.9,
                             final_val_acc=0.7, pretrained=offer)
    decision, why = wording.overfit_words(outcome)
    sentence = why[why.index("Not tried"):]
    assert sentence.endswith(words) and sentence.count(". ") == 0 and "\n" not in sentence
    assert "hf:microsoft/resnet-18" in sentence
    assert outcome.metrics()["pretrained_extra_installed"] is installed
    assert outcome.metrics()["pretrained_weights_cached"] is cached
    without = OverfitOutcome(**{**outcome.__dict__, "pretrained": None})
    assert "Not tried" not in wording.overfit_words(without)[1]
    assert "pretrained_backbone" not in without.metrics()


# ----------------------------------------------------------------------------------------------
# --backbone: the workflow prices a pretrained backbone and compares it frozen and fine-tuned


def _tiny_backbone(where: Path) -> Path:
    """A tiny ResNet saved with save_pretrained, pretrained at 32x32 (its preprocessor_config.json)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    ResNetForImageClassification(config).save_pretrained(where)
    (where / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": {"height": 32, "width": 32}}))
    return where


@pytest.fixture(scope="module")
def photos_and_backbone(tmp_path_factory) -> tuple[Path, Path]:
    """2 classes of 160x160 photos (60 each to train, 10 to test), and a tiny pretrained backbone."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("wf-photos")
    data = make_image_folder(root / "photos", classes=("a", "b"), per_class=60, size=(160, 160),
                             test_per_class=10)
    return data, _tiny_backbone(root / "tiny-resnet")


@pytest.fixture(scope="module")
def backbone_workflow(photos_and_backbone, tmp_path_factory):
    """The workflow with --backbone on those photos, in a 30-second budget (~30 s on 1 thread)."""
    data, backbone = photos_and_backbone
    out = tmp_path_factory.mktemp("wf-photos-out") / "out"
    assert main(["workflow", str(data), "--out", str(out), "--budget-minutes", "0.5", "--threads", "1",
                 "--backbone", f"hf:{backbone}"]) == 0
    return data, backbone, out, json.loads((out / "workflow.json").read_text())


@pytest.mark.slow
def test_step_6_prices_the_backbone_at_its_input_size(backbone_workflow):
    _, backbone, _, record = backbone_workflow
    assert record["backbone"] == f"hf:{backbone}"
    metrics = record["steps"][5]["metrics"]
    assert metrics["pretrained_source"] == str(backbone.resolve())
    assert metrics["pretrained_image_size"] == [32, 32]  # the model's own, not the workflow's working size
    assert metrics["pretrained_images_per_second"] > 0 and metrics["pretrained_finetune_epochs"] >= 2
    plans = record["state"]["plans"]
    frozen, finetuned = plans["7-backbone-frozen"]["settings"], plans["7-backbone-finetune"]["settings"]
    assert frozen["freeze_backbone"] is True and frozen["augment"] == "none"
    assert finetuned["finetune"] is True and finetuned["augment"] == "photo"
    assert frozen["model"] == finetuned["model"] == f"hf:{backbone.resolve()}"
    assert "Beside them, the pretrained backbone" in record["steps"][5]["why"]


@pytest.mark.slow
def test_step_7_trains_both_and_records_which_won(backbone_workflow):
    _, _, out, record = backbone_workflow
    step = record["steps"][6]
    names = [c["name"] for c in step["candidates"]]
    assert names[0] == "none" and names[-2:] == ["backbone-frozen", "backbone-finetune"]
    for name in ("backbone-frozen", "backbone-finetune"):
        candidate = next(c for c in step["candidates"] if c["name"] == name)
        assert (out / candidate["run"] / "model.safetensors").is_file()
    comparison = step["metrics"]["pretrained_comparison"]
    frozen, finetuned, se = comparison["frozen"], comparison["finetuned"], comparison["standard_error"]
    assert comparison["clear"] is (abs(finetuned - frozen) > se)
    expected = "backbone-finetune" if comparison["clear"] and finetuned > frozen else "backbone-frozen"
    assert comparison["winner"] == expected
    won = "fine-tuning won" if expected == "backbone-finetune" else "frozen features won"
    assert won in step["why"]
    assert won in (out / "report.html").read_text()  # the report says which won and why


def test_a_bad_backbone_is_one_line_and_exit_2(photos_and_backbone, tmp_path, capsys):
    data, _ = photos_and_backbone
    for value, message in [("resnet", "--backbone takes hf:"), (f"hf:{tmp_path / 'nowhere'}", "no such directory"),
                           (f"hf:{tmp_path}", "not a directory saved with save_pretrained")]:
        assert main(["workflow", str(data), "--out", str(tmp_path / "o"), "--backbone", value]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_without_the_extra_backbone_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    data = make_image_folder(tmp_path / "d", per_class=4, size=(8, 8))
    assert main(["workflow", str(data), "--out", str(tmp_path / "o"), "--backbone", "hf:microsoft/resnet-18"]) == 2
    assert "pip install 'imgflow[pretrained]'" in capsys.readouterr().err


def test_the_backbone_plan_prices_frozen_features_as_one_pass_and_gives_fine_tuning_the_rest():
    from imgflow.workflow import budget

    # 100 s at 10 images/s, 300 training and 60 validation images: features cost 3 + 360 / 30 = 15 s,
    # fine-tuning gets 85 s, of which a run's overhead 3 s and 32 s an epoch (300 + 60/3 images).
    frozen, finetuned = budget.plan_backbone(100, 10, 300, 60, folds=1, frozen_epochs=10, max_epochs=30)
    assert frozen == (10, 0) and finetuned == (2, 0)
    # Under 5-fold cross-validation each fold has a fifth: fine-tuning trains on a subset.
    _, (epochs, subset) = budget.plan_backbone(100, 10, 300, 60, folds=5, frozen_epochs=10, max_epochs=30)
    assert epochs == 2 and 64 <= subset < 300


def test_the_winner_is_the_fine_tuned_one_only_when_it_is_clearly_ahead():
    from imgflow.workflow.decisions import BackboneComparison
    from imgflow.workflow.record import Candidate

    def candidate(name: str, score: float) -> Candidate:
        return Candidate(name=name, description=name, settings={}, val_acc=score, val_acc_std=0.0, val_loss=0.5,
                         runs=[name], val_score=score, run=name)

    def compare(frozen: float, finetuned: float) -> BackboneComparison:
        return BackboneComparison("b", candidate("backbone-frozen", frozen), candidate("backbone-finetune", finetuned),
                                  1.0, 9.0, standard_error=0.05)

    assert compare(0.80, 0.90).winner.name == "backbone-finetune" and compare(0.80, 0.90).clear
    assert compare(0.80, 0.84).winner.name == "backbone-frozen"  # within one standard error: noise
    assert compare(0.90, 0.80).winner.name == "backbone-frozen" and compare(0.90, 0.80).clear
    words = wording.backbone_words(compare(0.80, 0.90), "accuracy")
    assert "fine-tuning won, more than one standard error (0.0500) ahead" in words
    assert "within one standard error" in wording.backbone_words(compare(0.80, 0.84), "accuracy")


@pytest.mark.slow
def test_the_report_counts_the_backbone_apart_from_the_regularised_candidates(backbone_workflow):
    _, _, out, record = backbone_workflow
    html = (out / "report.html").read_text()
    regularised = sum(1 for c in record["steps"][6]["candidates"]
                      if c["name"] != "none" and not c["name"].startswith("backbone-"))
    assert f"{regularised} regularised candidate" in html
    assert "was tried as two more candidates" in html


def test_for_photos_the_default_backbone_is_tried_when_the_cache_holds_it(photos_and_backbone, tmp_path,
                                                                           monkeypatch):
    import imgflow.models.hf as hf
    from imgflow.workflow import backbone as wf_backbone
    from imgflow.workflow.record import Protocol

    data, backbone = photos_and_backbone
    asked = []
    monkeypatch.setattr(hf, "cached_snapshot", lambda hub_id: asked.append(hub_id) or backbone)
    state = WorkflowState(image_size=[48, 48], resize=Resize(image_size=[48, 48], typical_size=[160, 160]),
                          test_split=0.0, protocol=Protocol("hold-out", val_split=0.2))
    ctx = context.Context(data=str(data), out=tmp_path, seed=0, budget_seconds=120, started=time.perf_counter(),
                          elapsed_before=0.0, progress=False, state=state, threads=1)
    offer = steps.pretrained_offer(ctx)
    assert asked == ["microsoft/resnet-18"] and offer.tried and offer.source == str(backbone)
    assert offer.image_size == [32, 32] and offer.images_per_second > 0  # probed at its own size, not 48
    assert set(ctx.state.plans) == {"7-backbone-frozen", "7-backbone-finetune"}
    words = wording.pretrained_words(offer)
    assert words.startswith(" Beside them, the pretrained backbone hf:microsoft/resnet-18 (weights from ")
    # Planned once: a resumed step 6 reuses the saved plans instead of probing again.
    monkeypatch.setattr(wf_backbone, "measure_backbone_throughput", lambda *a: pytest.fail("probed again"))
    assert steps.pretrained_offer(ctx) == offer


def test_a_workflow_continues_only_with_the_backbone_it_started_with(tmp_path):
    from imgflow.errors import UserError
    from imgflow.workflow.record import WorkflowRecord
    from imgflow.workflow.run import _check_same_workflow

    saved = WorkflowRecord.from_dict(WorkflowRecord(data="d", seed=0, budget_minutes=1, backbone="hf:/m",
                                                    elapsed_minutes=0.0).to_dict())
    assert saved.backbone == "hf:/m"  # written and read back
    _check_same_workflow(saved, tmp_path, "d", 0, 1, None, "hf:/m")
    with pytest.raises(UserError, match="run with --backbone hf:/m: continue it with that"):
        _check_same_workflow(saved, tmp_path, "d", 0, 1, None, None)
    saved.backbone = None  # also a record from before --backbone
    with pytest.raises(UserError, match="run without --backbone: continue it without one"):
        _check_same_workflow(saved, tmp_path, "d", 0, 1, None, "hf:/m")
