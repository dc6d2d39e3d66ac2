"""The workflow and pretrained backbones (issue 21, part 4, its first piece): for a folder of photos,
step 6 says in one sentence which pretrained backbone it would put beside the scratch models and
what that needs (the extra, or the weights), recorded in workflow.json's metrics. Nothing is
downloaded, and the workflow does not train the backbone yet."""
from __future__ import annotations

import sys
import time

import pytest

from imgflow.workflow import context, steps, wording
from imgflow.workflow.decisions import OverfitOutcome, PretrainedOffer
from imgflow.workflow.record import Resize, WorkflowState


def _context(tmp_path, typical_size):
    resize = Resize(image_size=[96, 128] if typical_size else None, typical_size=typical_size)
    return context.Context(data="/photos", out=tmp_path, seed=0, budget_seconds=60, started=time.perf_counter(),
                           elapsed_before=0.0, progress=False, state=WorkflowState(resize=resize))


def test_photos_get_an_offer_and_small_images_none(tmp_path, monkeypatch):
    import imgflow.models.hf as hf

    monkeypatch.setattr(hf, "in_local_cache", lambda hub_id: False)  # whatever this machine's cache holds
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
                  "--pretrained fetches them once."),
    (True, True, "the workflow does not compare one yet: imgflow train /photos --model hf:microsoft/resnet-18 "
                 "--finetune trains it from the weights cached here."),
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
