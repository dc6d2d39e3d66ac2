"""The training settings of the workflow's runs from step 6 on: the fast family's recipe
(unregularised, step 6) and the regularised candidates step 7 compares with it."""
from __future__ import annotations

from typing import Any, NamedTuple


def fast_recipe(n_train: int) -> dict[str, Any]:
    """SGD-Nesterov with a one-cycle schedule, as the fast family is tuned for (no regularisation).

    Batch 128, not 256: step 6 trains ~200 steps at 256 (6 epochs of ~9,000 images), and there
    lr 0.2 blew up in epoch 2 (CIFAR-10, seed 0: validation loss 1.91 -> 4.99, ending at 0.602;
    a twice longer warm-up or lr 0.1 at 256 still spiked). At 128 with lr 0.1, twice the steps
    each half as large, the same run did not and validated 0.656; its epochs took as long.
    Batch 32 only below 2,048 images (16 steps of 128 per epoch): the final run inherits the
    batch, and at 32 a CPU trains a third slower (Fashion-MNIST at 5 minutes explores on ~3,000
    images; with the limit at 4,096 its final run got batch 32 and 2 epochs on 85% of the data).
    With airbench's BatchNorm lr x64 and lookahead every 5 steps: fast-large for 8 epochs with
    the first candidate's regularisation (CIFAR-10, 45k images, seed 0) validated 0.8908 with
    them and alternating flips, 0.8848 without, for 2% more time.
    """
    batch = 128 if n_train >= 2048 else 32
    return {"optimizer": "sgd", "momentum": 0.9, "lr": 0.2 * batch / 256, "batch_size": batch,
            "schedule": "onecycle", "warmup_epochs": 0.0, "bn_lr_scale": 64.0, "lookahead": 5}


class CandidateRecipe(NamedTuple):
    name: str
    description: str
    changes: dict[str, Any]  # to the step-6 settings; lr_scale multiplies its learning rate
    regularisation: int  # how much it regularises: the one-standard-error rule's rank


# The last field ranks candidates for the one-standard-error rule (selection.choose_candidate):
# "none", the step-6 run, is 0; each regulariser added counts, a learning-rate change does not
# (with weight decay coupled to the learning rate, halving it even halves the decay per step).
# The order matters: a small budget trains only the first one or two. First comes the whole
# recipe the fast models are tuned with (the `airbench94` preset's augmentation, label smoothing and
# weight decay), then augmentation alone, then smoothing and decay alone for data that flips and
# shifts do not suit (Fashion-MNIST's garments are centred and upright), then a lower learning rate.
# Weight decay 1.7e-3 at step 6's lr 0.1 per 128 images and momentum 0.9 decays each weight per
# image as much as the `airbench94` preset's 1.33e-3 at lr 1.5 per 1024 and momentum 0.85
# (lr * decay / (1 - momentum) / batch); step 6 scales lr with the batch, so it holds at any batch.
# Flips alternate (airbench): each image is mirrored in every other epoch, from a random start,
# so a short run sees both views of every image equally often.
AUGMENTATION = {"augment": "flip+translate", "flip": "alternate"}
SMOOTHING_AND_DECAY = {"label_smoothing": 0.2, "weight_decay": 1.7e-3}
RECIPE_REGULARISATION = {**AUGMENTATION, **SMOOTHING_AND_DECAY}
CANDIDATES = [
    CandidateRecipe("augment+smooth+decay", "flip + 2-pixel translations, label smoothing 0.2, weight decay 1.7e-3",
                    RECIPE_REGULARISATION, 3),
    CandidateRecipe("augment", "flip + 2-pixel translations", AUGMENTATION, 1),
    CandidateRecipe("smooth+decay", "label smoothing 0.2, weight decay 1.7e-3, no augmentation",
                    {**SMOOTHING_AND_DECAY, "augment": "none"}, 2),
    CandidateRecipe("augment+smooth+decay+half-lr", "the first candidate at half the learning rate",
                    {**RECIPE_REGULARISATION, "lr_scale": 0.5}, 3),
]


def candidate_settings(reference: dict[str, Any], recipe: CandidateRecipe) -> dict[str, Any]:
    """The step-6 settings with the candidate's changes."""
    changes = dict(recipe.changes)
    lr_scale = changes.pop("lr_scale", 1.0)
    return {**reference, **changes, "lr": reference["lr"] * lr_scale}
