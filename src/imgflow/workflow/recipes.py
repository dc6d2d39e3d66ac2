"""The training settings of the workflow's runs from step 6 on: the fast family's recipe
(unregularised, step 6) and the regularised candidates step 7 compares with it."""
from __future__ import annotations

from typing import Any, NamedTuple

from imgflow.training.config import PRESETS


# A final run on this many training images or more trains with airbench94_muon's recipe as the
# `best` preset does (Muon, batch 1,000, 50 steps per epoch of CIFAR-10); on fewer, batches of
# 1,000 leave an epoch fewer than 20 steps. Exploration (steps 6-7) keeps the SGD recipe: with
# Muon there, Fashion-MNIST at 5 minutes validated the unregularised run above the regularised
# one at 6 epochs (0.9224 vs 0.9178), and its unregularised 14-epoch final run tested 0.9361,
# where the SGD exploration chose the regularised candidate and tested 0.9450 (Zen 5).
MUON_MIN_IMAGES = 20_000
MUON_KEYS = ("optimizer", "muon_lr", "lr", "momentum", "batch_size", "schedule", "warmup_epochs", "lr_floor",
             "bn_lr_scale", "whiten_bias_epochs", "lookahead")
# Weight decay per training image, as the `airbench94` preset has it (1.33e-3 at lr 1.5 per 1,024
# and momentum 0.85) and `best` (0.0024 at lr 0.83 per 1,000 and 0.85): lr * decay / (1 -
# momentum) / batch. The candidates' decay is this at whatever lr, momentum and batch they train.
DECAY_PER_IMAGE = 1.33e-5
SGD_LR_PER_IMAGE = 0.1 / 128


def muon_recipe() -> dict[str, Any]:
    """The `best` preset's (airbench94_muon's) optimiser settings: a final run's on enough images."""
    return {key: PRESETS["best"].get(key, 0) for key in MUON_KEYS}


def fast_recipe(n_train: int, epochs: int) -> dict[str, Any]:
    """The fast family's exploration settings for `epochs` on `n_train` images (no regularisation).

    SGD-Nesterov, one-cycle with a fifth of the run warming up, batch 128 (32 below 2,048 images).
    Why 128, not 256: step 6 trained ~200 steps at 256 (6 epochs of ~9,000 images), and there
    lr 0.2 blew up in epoch 2 (CIFAR-10, seed 0: validation loss 1.91 -> 4.99, ending at 0.602;
    a twice longer warm-up or lr 0.1 at 256 still spiked). At 128 with lr 0.1, twice the steps
    each half as large, the same run did not and validated 0.656; its epochs took as long.
    Batch 32 only below 2,048 images (16 steps of 128 per epoch): at 32 a CPU trains a third
    slower (Fashion-MNIST at 5 minutes explores on ~3,000 images; with the limit at 4,096 its
    final run got batch 32 and 2 epochs on 85% of the data). With airbench's BatchNorm lr x64
    and lookahead every 5 steps: fast-large for 8 epochs with the first candidate's
    regularisation (CIFAR-10, 45k images, seed 0) validated 0.8908 with them and alternating
    flips, 0.8848 without, for 2% more time.
    """
    batch = 128 if n_train >= 2048 else 32
    return {"optimizer": "sgd", "momentum": 0.9, "lr": SGD_LR_PER_IMAGE * batch, "batch_size": batch,
            "schedule": "onecycle", "warmup_epochs": round(0.2 * epochs, 2), "bn_lr_scale": 64.0, "lookahead": 5}


def weight_decay_for(settings: dict[str, Any]) -> float:
    """The coupled weight decay that decays DECAY_PER_IMAGE per image at these settings' lr,
    momentum and batch."""
    return DECAY_PER_IMAGE * settings["batch_size"] * (1 - settings["momentum"]) / settings["lr"]


def final_recipe(settings: dict[str, Any], n_train: int) -> dict[str, Any]:
    """A fast model's explored `settings` with the optimiser recipe for its final run on `n_train`.

    Steps 6-7 explore with SGD; a final run on MUON_MIN_IMAGES or more takes Muon's recipe and
    keeps the chosen regularisation (augmentation, smoothing, decay per image; a halved lr stays
    halved).
    """
    if settings.get("optimizer") != "sgd" or n_train < MUON_MIN_IMAGES:
        return settings
    recipe = muon_recipe()
    lr_scale = settings["lr"] / (SGD_LR_PER_IMAGE * settings["batch_size"])
    changed = {**settings, **recipe, "lr": recipe["lr"] * lr_scale}
    if settings.get("weight_decay"):
        changed["weight_decay"] = weight_decay_for(recipe)
    return changed


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
# "weight_decay": "per-image" is DECAY_PER_IMAGE at the run's lr, momentum and batch (1.7e-3 for
# the SGD recipe at any batch, 0.0024 for Muon's), taken at the step-6 lr (a halved lr halves it).
# Flips alternate (airbench): each image is mirrored in every other epoch, from a random start,
# so a short run sees both views of every image equally often.
AUGMENTATION = {"augment": "flip+translate", "flip": "alternate"}
SMOOTHING_AND_DECAY = {"label_smoothing": 0.2, "weight_decay": "per-image"}
RECIPE_REGULARISATION = {**AUGMENTATION, **SMOOTHING_AND_DECAY}
CANDIDATES = [
    CandidateRecipe("augment+smooth+decay", "flip + 2-pixel translations, label smoothing 0.2, weight decay as airbench94",
                    RECIPE_REGULARISATION, 3),
    CandidateRecipe("augment", "flip + 2-pixel translations", AUGMENTATION, 1),
    CandidateRecipe("smooth+decay", "label smoothing 0.2, weight decay as airbench94, no augmentation",
                    {**SMOOTHING_AND_DECAY, "augment": "none"}, 2),
    CandidateRecipe("augment+smooth+decay+half-lr", "the first candidate at half the learning rate",
                    {**RECIPE_REGULARISATION, "lr_scale": 0.5}, 3),
]


def candidate_settings(reference: dict[str, Any], recipe: CandidateRecipe) -> dict[str, Any]:
    """The step-6 settings with the candidate's changes."""
    changes = dict(recipe.changes)
    lr_scale = changes.pop("lr_scale", 1.0)
    if changes.get("weight_decay") == "per-image":
        changes["weight_decay"] = weight_decay_for(reference)
    return {**reference, **changes, "lr": reference["lr"] * lr_scale}
