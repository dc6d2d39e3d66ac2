"""Typed training configuration: defaults, presets, validation, and the table of its options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from imgflow.errors import MalformedContent, UserError
from imgflow.fileio import expect, list_of

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("constant", "onecycle", "cosine")
AUGMENTS = ("none", "flip", "flip+translate", "flip+translate+cutout", "photo")
PHOTO = "photo"  # random-resized crop + flip + colour jitter; evaluation on the centre crop
NORMALIZATIONS = ("scale", "standardize")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
VAL_MODES = ("last", "stratified")
FLIPS = ("random", "alternate")
# Upper bounds far above any value that trains, so that a typo (1e39 for 1e-3) is refused up
# front instead of overflowing float32 inside the optimiser or the schedule's step count.
MAX_LR = 100.0  # SGD at lr 100 already diverges in its first steps on the tests' data
LR_FIND = "find"  # `train --lr find`: run the lr range test first and train at its suggestion
MAX_WEIGHT_DECAY = 1.0  # typical values are 1e-4..0.1
MAX_BN_LR_SCALE = 1000.0  # airbench uses 64
MAX_WARMUP_EPOCHS = 1000.0  # the engine caps warmup at half the run anyway


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults are the reference notebook's."""

    data: str  # data set spec: cifar10, fashion-mnist, or a path
    model: str  # registered model name (`imgflow models`)
    image_size: tuple[int, int] | None = None  # (H, W) to resize to; None = the data's own size
    epochs: int = 20  # full passes over the training part
    batch_size: int = 128  # images per optimiser step
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov momentum) | muon (conv filters; SGD for the rest)
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd momentum; adam beta1 stays 0.9
    adam_eps: float = 1e-7  # Keras' Adam epsilon (PyTorch's default is 1e-8)
    weight_decay: float = 0.0  # on conv/dense weights; on BatchNorm and biases only with decay_biases
    schedule: str = "constant"  # constant | onecycle (linear warmup, linear decay) | cosine
    warmup_epochs: float = 0.0  # linear warmup length for onecycle/cosine, in epochs
    lr_floor: float = 0.0  # onecycle/cosine decay to this fraction of --lr (airbench: 0.07)
    bn_lr_scale: float = 1.0  # lr multiplier for BatchNorm parameters (airbench: 64)
    lookahead: int = 0  # every N steps pull the weights toward a slow average (airbench: 5); 0 = off
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0 = off
    augment: str = "none"  # none | flip | flip+translate | flip+translate+cutout
    flip: str = "random"  # random: each image each epoch | alternate: random once, then every other epoch
    translate: int = 2  # max random shift in pixels for 'translate' (reflect padding)
    cutout: int = 8  # side of the zeroed square in pixels for 'cutout'
    normalize: str = "scale"  # scale: x/255 (the notebook) | standardize: (x/255-mean)/std of train part
    val_split: float = 0.2  # fraction held out for validation; 0 = train on everything
    val_mode: str = "last"  # last: Keras validation_split on the seeded shuffle | stratified
    folds: int = 0  # k-fold protocol: validate on fold `fold` of `folds` (stratified) instead of val_split
    fold: int = 0  # which fold validates, in [0, folds)
    test_split: float = 0.0  # data without a test split: hold out this fraction (stratified) as one
    train_subset: int = 0  # train on at most this many images of the training part (stratified); 0 = all
    val_subset: int = 0  # validate on at most this many images of the validation part (stratified); 0 = all
    seed: int = 0  # fixes split, data order, augmentation, initialisation, dropout
    precision: str = "auto"  # auto (bf16 where the hardware has it, fp16 on older GPUs) | fp32 | bf16 | fp16
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    sync_bn: bool = False  # several processes (torchrun) on CUDA: BatchNorm statistics over the global batch
    threads: int | None = None  # torch intra-op threads; None = one per physical core
    early_stopping: int = 0  # patience in epochs on val_loss, best weights restored; 0 = off
    ema: float = 0.0  # exponential moving average of weights, decay per step; 0 = off
    precise_bn: int = 0  # re-estimate BatchNorm statistics on N training images at the end; 0 = Keras' running averages
    eval_batch_size: int = 500  # images per forward pass at evaluation
    preset: str | None = None  # name of the preset the defaults came from, if any
    weights: str | None = None  # hf: a save_pretrained directory or file; fast/resnet: an imgflow run; offline
    pretrained: bool = False  # hf: models: download the hub id's weights (HF's cache); never otherwise
    finetune: bool = False  # head only for freeze_epochs (backbone frozen), then all, backbone at lr/100..lr/10
    freeze_epochs: int = 1  # with finetune: epochs with the backbone frozen
    freeze_backbone: bool = False  # keep the backbone frozen throughout (train the head only)
    whiten_bias_epochs: int = 0  # train the whitening stem's bias in the first N epochs only (airbench: 3); 0 = always
    muon_lr: float = 0.24  # with --optimizer muon: peak lr of the conv filters (airbench94_muon: 0.24)
    decay_biases: bool = False  # weight decay on biases and BatchNorm shifts too, shrinking them per step as the weights (airbench)
    whiten_bias_lr_scale: float = 1.0  # lr multiplier for the whitening stem's bias (airbench94: 1, airbench94_muon: 64)
    crop_scale: float = 0.35  # photo: smallest random crop, as a fraction of the image's area (largest: all)
    crop_pct: float = 0.875  # photo at an image_size: evaluation's centre crop, fraction of each side (hf: the model's)

    def validate(self) -> "TrainConfig":
        """Raise UserError on values that cannot work; return self for chaining."""
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            # `--lr find` is resolved to a number by `train` before its config is built.
            raise UserError(f"--lr must be a number here, got {self.lr!r}"
                            + (" (only 'imgflow train' runs lr-find first)" if self.lr == LR_FIND else ""))
        check_seed_and_threads(self.seed, self.threads)
        from imgflow.device import check_device_spec

        check_device_spec(self.device)
        for ok, message in [*self._range_checks(), *self._choice_checks()]:
            if not ok:
                raise UserError(message)
        self._check_model()
        return self

    def _range_checks(self) -> list[tuple[bool, str]]:
        """(value is in range, what to say otherwise) for each number."""
        return [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (0 < self.lr <= MAX_LR, f"--lr must be > 0 and <= {MAX_LR:g}, got {self.lr}"),
            (0 <= self.weight_decay <= MAX_WEIGHT_DECAY,
             f"--weight-decay must be >= 0 and <= {MAX_WEIGHT_DECAY:g}, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (0 <= self.val_split < 1, f"--val-split must be in [0, 1), got {self.val_split}"),
            (0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.warmup_epochs <= MAX_WARMUP_EPOCHS,
             f"--warmup-epochs must be >= 0 and <= {MAX_WARMUP_EPOCHS:g}, got {self.warmup_epochs}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (0 <= self.lr_floor <= 1, f"--lr-floor must be in [0, 1], got {self.lr_floor}"),
            (0 < self.bn_lr_scale <= MAX_BN_LR_SCALE,
             f"--bn-lr-scale must be > 0 and <= {MAX_BN_LR_SCALE:g}, got {self.bn_lr_scale}"),
            (self.lookahead >= 0, f"--lookahead must be >= 0, got {self.lookahead}"),
            (self.whiten_bias_epochs >= 0, f"--whiten-bias-epochs must be >= 0, got {self.whiten_bias_epochs}"),
            (0 < self.whiten_bias_lr_scale <= MAX_BN_LR_SCALE,
             f"--whiten-bias-lr-scale must be > 0 and <= {MAX_BN_LR_SCALE:g}, got {self.whiten_bias_lr_scale}"),
            (0 < self.muon_lr <= MAX_LR, f"--muon-lr must be > 0 and <= {MAX_LR:g}, got {self.muon_lr}"),
            (0 < self.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {self.crop_scale}"),
            (0.5 <= self.crop_pct <= 1, f"--crop-pct must be in [0.5, 1], got {self.crop_pct}"),
        ]

    def _choice_checks(self) -> list[tuple[bool, str]]:
        """(choice is known and fits the others, what to say otherwise)."""
        return [
            (self.flip in FLIPS, f"unknown flip {self.flip!r}: use one of {', '.join(FLIPS)}"),
            (self.flip == "random" or "flip" in self.augment or self.augment == PHOTO,
             f"--flip {self.flip} needs flipping in --augment (now {self.augment!r}), e.g. --augment flip+translate"),
            (self.lr_floor == 0 or self.schedule != "constant",
             "--lr-floor needs a decaying --schedule (onecycle or cosine)"),
            (not (self.lookahead and self.ema),
             "--lookahead and --ema both average the weights: use one of them"),
            (self.early_stopping >= 0, "--early-stopping must be >= 0"),
            (self.precise_bn >= 0, f"--precise-bn must be >= 0, got {self.precise_bn}"),
            (self.fold == 0 or self.folds, f"--fold {self.fold} needs --folds K (the number of folds)"),
            (self.folds == 0 or (self.folds >= 2 and 0 <= self.fold < self.folds),
             f"--folds must be >= 2 and --fold in [0, folds), got {self.folds} and {self.fold}"),
            (0 <= self.test_split < 1, f"--test-split must be in [0, 1), got {self.test_split}"),
            (self.train_subset >= 0, "--train-subset must be >= 0"),
            (self.val_subset >= 0, "--val-subset must be >= 0"),
            (self.val_subset == 0 or self.val_split > 0 or self.folds,
             "--val-subset needs a validation split (--val-split > 0 or --folds)"),
            (self.early_stopping == 0 or self.val_split > 0 or self.folds,
             "--early-stopping needs a validation split (--val-split > 0)"),
            (self.translate >= 0 and self.cutout >= 0, "--translate/--cutout must be >= 0"),
            (self.crop_scale == default_of("crop_scale") or self.augment == PHOTO,
             f"--crop-scale is for --augment {PHOTO} (now {self.augment!r})"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}"),
            (self.augment in AUGMENTS, f"unknown augment {self.augment!r}: use one of {', '.join(AUGMENTS)}"),
            (self.normalize in NORMALIZATIONS, f"unknown normalize {self.normalize!r}: use one of {', '.join(NORMALIZATIONS)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"),
            (self.val_mode in VAL_MODES, f"unknown val mode {self.val_mode!r}: use one of {', '.join(VAL_MODES)}"),
        ]

    def _check_model(self) -> None:
        from imgflow.models import list_models
        from imgflow.models.hf import is_hf

        if self.pretrained and not is_hf(self.model):
            raise UserError("--pretrained needs an hf: model, e.g. --model hf:microsoft/resnet-50 "
                            f"(got {self.model!r}); an imgflow run's weights are --weights RUN_DIR")
        if (self.weights is not None or self.finetune or self.freeze_backbone) and not is_hf(self.model) \
                and not _has_head(self.model):
            raise UserError("--weights, --finetune and --freeze-backbone need an hf: model or one with a "
                            f"separate head ({', '.join(_models_with_head())}), e.g. --model "
                            f"hf:microsoft/resnet-50 (got {self.model!r})")
        if self.weights is not None and self.pretrained:
            raise UserError("--weights and --pretrained both say where the weights come from: use one")
        if self.finetune and self.freeze_backbone:
            raise UserError("--finetune unfreezes the backbone after --freeze-epochs, --freeze-backbone "
                            "never does: use one")
        if self.optimizer == "muon" and (self.finetune or self.freeze_backbone):
            raise UserError("--optimizer muon is for training from scratch; fine-tune with sgd or adamw")
        if self.freeze_epochs < 0:
            raise UserError(f"--freeze-epochs must be >= 0, got {self.freeze_epochs}")
        if not is_hf(self.model) and self.model not in list_models():
            raise UserError(f"unknown model {self.model!r}: use one of {', '.join(list_models())} "
                            "(see 'imgflow models')")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From config.json's 'train': settings it lacks take their defaults (a run from before
        they existed), unknown ones are ignored; MalformedContent names one of the wrong kind."""
        expect(d, "an object", "'train'")
        values = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = _setting(f, d[f.name])
            elif f.default is dataclasses.MISSING:
                raise MalformedContent(f"'train.{f.name}' is missing")
        return cls(**values)


_KIND_OF_DEFAULT = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
_KIND_WHEN_NOT_NONE = {"threads": "an integer", "preset": "a string", "weights": "a string"}


def _setting(f: dataclasses.Field, value: Any) -> Any:
    """One 'train' value from config.json, checked against the kind of its field."""
    name = f"'train.{f.name}'"
    if f.name == "image_size":
        return None if value in (None, []) else tuple(list_of(value, "an integer", name, 2))
    if f.default is None:
        return None if value is None else expect(value, _KIND_WHEN_NOT_NONE[f.name], name)
    kind = "a string" if f.default is dataclasses.MISSING else _KIND_OF_DEFAULT[type(f.default)]
    return expect(value, kind, name)


def check_seed_and_threads(seed: int, threads: int | None) -> None:
    """`train`'s checks of --seed and --threads, for the commands that pass them on to training runs
    (so that they refuse before anything is written, not at their first training run)."""
    from imgflow.precision import available_cpus

    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")
    if threads is not None and not 1 <= threads <= available_cpus():
        raise UserError(f"--threads must be between 1 and the {available_cpus()} CPUs available, got {threads}")


DEVICE_METAVAR = "auto|cpu|cuda|cuda:N|mps"
DEVICE_HELP = "auto: a CUDA GPU, else Apple's MPS, else the CPU; cuda:N: the N-th GPU"
THREADS_HELP = ("CPU threads (default: $OMP_NUM_THREADS if set, else one per physical core; "
                "at most the CPUs this process may use)")

# Named configurations. Any option given on the command line still wins over the preset.
#
# `airbench94`, `best` and `fast` follow airbench (Jordan, arXiv 2404.00498, and its repository's
# airbench94_muon.py): whitening stem + dirac init + frozen BatchNorm scales (in the model),
# label smoothing 0.2, alternating flip + 2-pixel reflect-translate, the whitening bias trained
# for the first 3 epochs only, airbench94's six-view TTA at evaluation (`imgflow evaluate --tta`).
# airbench sums its loss and quotes lr and weight decay "per 1024 examples"; imgflow averages it,
# so its lrs are airbench's times the batch (and BatchNorm's 64x is a --bn-lr-scale):
# - airbench94 (SGD): lr 11.5 per 1024 with momentum 0.85 is 1.5 per mean-loss step at batch
#   1024; its decay 0.0153 per 1024 is 0.002 per step, i.e. coupled weight_decay 0.002/1.5.
#   Warm-up over 23% of the steps, linear decay to 0.07, lookahead every 5 steps; 9.9 epochs,
#   10 here (epochs are whole).
# - airbench94_muon: Muon (momentum 0.6, 3 Newton-Schulz steps) for the conv filters at 0.24,
#   each filter bank rescaled to a fixed norm; Nesterov SGD 0.85 for the rest: the head at
#   0.67 per summed-loss step of 2,000 on logits / 256 with a unit-std head, which with
#   imgflow's head (default init, logits / 9) is lr 1.66; biases at 64x; decay 0.004 per step
#   (0.0024 coupled). Linear decay from the start, no warm-up, no lookahead, batch 2000, 8 epochs
#   (`best` at batch 1000 and lr 0.83: see there).
# Measured on the Xeon (2 vCPUs, AMX), CIFAR-10 JPEG copy: docs/RESULTS.md.
_AIRBENCH_COMMON = dict(label_smoothing=0.2, augment="flip+translate", translate=2, flip="alternate",
                        whiten_bias_epochs=3, normalize="standardize", precision="auto")
_MUON = dict(_AIRBENCH_COMMON, optimizer="muon", muon_lr=0.24, lr=1.66, momentum=0.85, weight_decay=0.0024,
             bn_lr_scale=64.0, schedule="onecycle", warmup_epochs=0.0, lr_floor=0.0, ema=0.0)
PRESETS: dict[str, dict[str, Any]] = {
    # The reference notebook, as it ran: pixels/255, Adam 1e-3, batch 128, 20 epochs.
    "notebook": dict(model="seed-batchnorm", epochs=20, batch_size=128, optimizer="adam", lr=1e-3,
                     schedule="constant", normalize="scale", augment="none", precision="fp32"),
    # The notebook's 83.18% as quickly as possible: the smallest airbench-layout net (40 MFLOP per
    # image), Muon, 4 epochs on all 50,000 training images (no validation pass per epoch: the
    # test set is touched once), 200 steps of 1,000 as airbench94_muon's run has, at its lr 1.66
    # (untuned here; 3 epochs tested 0.8316, seed 0).
    "fast": dict(_MUON, model="fast-small", epochs=4, batch_size=1000, val_split=0.0),
    # airbench94_muon's recipe on its net, at batch 1000 rather than 2,000: on this CPU a batch of
    # 2,000 trains 18% fewer images per second (410 vs 500, fast-large, bf16, 1 thread), so the
    # head's and biases' lr is halved with the batch (lr per image kept) and Muon's kept.
    "best": dict(_MUON, model="fast-large", epochs=8, batch_size=1000, lr=0.83, val_split=0.0),
    # `best` for twice the epochs: what the machine's quarter hour buys (a wider net, airbench95's
    # widths, trains 2.2x fewer images per second: fewer epochs than this in the same time).
    "best-long": dict(_MUON, model="fast-large", epochs=16, batch_size=1000, lr=0.83, val_split=0.0),
    # airbench94 itself (SGD, lookahead), matched option for option: the reference `best` is
    # measured against.
    "airbench94": dict(_AIRBENCH_COMMON, model="fast-large", epochs=10, batch_size=1024, optimizer="sgd",
                       lr=1.5, momentum=0.85, weight_decay=1.33e-3, bn_lr_scale=64.0, schedule="onecycle",
                       warmup_epochs=2.3, lr_floor=0.07, lookahead=5, val_split=0.0, ema=0.0),
}

# What each preset is for, and how to evaluate it. TrainConfig has no TTA field (evaluation is a
# separate command), so `tta` here is what `imgflow evaluate --tta` and benchmarks/ should use.
# Targets are test accuracies on the CIFAR-10 JPEG copy (../shared/data; about 3.5 points below
# the official files at this level: airbench94 averages 0.9401 there, 0.905 here).
PRESET_INFO: dict[str, dict[str, Any]] = {
    "notebook": {"tta": False, "target": 0.8318,
                 "summary": "the reference notebook's BatchNorm CNN, Adam, 20 epochs, no augmentation"},
    "fast": {"tta": True, "target": 0.832,
             "summary": "fast-small, Muon, 4 epochs: the notebook's 83% in about a minute and a half"},
    "best": {"tta": True, "target": 0.905,
             "summary": "fast-large (airbench94 layout), Muon, 8 epochs: airbench94's accuracy in fewer epochs"},
    "best-long": {"tta": True, "target": 0.920,
                  "summary": "best for 16 epochs: more accuracy in under a quarter of an hour on a 2-core CPU"},
    "airbench94": {"tta": True, "target": 0.905,
                   "summary": "airbench94's own recipe (SGD, lookahead, 10 epochs), the reference for best"},
}


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset: name, summary, target test accuracy, TTA, and the values it sets."""
    return [{"name": name, **PRESET_INFO.get(name, {}), "settings": dict(values)}
            for name, values in PRESETS.items()]


def _has_head(model: str) -> bool:
    """Whether a registered model has a separate head (models.backbone): --weights from another
    run, --finetune and --freeze-backbone apply to it."""
    from imgflow.models import get_model_spec, list_models
    from imgflow.models.backbone import HeadAndBackbone

    return model in list_models() and isinstance(get_model_spec(model).builder, type) \
        and issubclass(get_model_spec(model).builder, HeadAndBackbone)


def _models_with_head() -> list[str]:
    from imgflow.models import list_models

    return [name for name in list_models() if _has_head(name)]


def resolve_config(data: str, overrides: dict[str, Any], preset: str | None = None) -> TrainConfig:
    """Defaults, then the preset, then explicit overrides (None values mean 'not given')."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    data = absolute_if_path(data)
    # Local weights are recorded absolute, like the data, so the run's files find them from anywhere.
    if values.get("weights"):
        values["weights"] = _absolute(values["weights"])
    if str(values.get("model", "")).startswith("hf:"):
        values["model"] = "hf:" + _absolute(values["model"][3:])
        own = _pretrained(values)
        if values.get("image_size") is None:  # the size the model was pretrained at, not the data's
            values["image_size"] = tuple(own["image_size"]) if own.get("image_size") else None
        if values.get("crop_pct") is None and own.get("crop_pct"):  # its evaluation crop, for photo runs
            values["crop_pct"] = own["crop_pct"]
    if "model" not in values:
        raise UserError("no model given: pass --model NAME (see 'imgflow models') or --preset")
    return TrainConfig(data=data, **values).validate()


def config_to_train(data: str | None, overrides: dict[str, Any], preset: str | None = None,
                    started: "TrainConfig | None" = None) -> "TrainConfig":
    """The config a `train` command (CLI or Python) trains with.

    started: the config of the run being resumed; without a preset it is continued with its own
    options (data from it when none is given; given options are checked against it by `train`).
    """
    if started is not None and preset is None:
        values = {**started.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        values["data"] = absolute_if_path(data) if data else started.data
        if values.get("image_size") is not None:
            values["image_size"] = list(values["image_size"])
        return TrainConfig.from_dict(values).validate()
    if data is None:
        raise UserError("no DATA given: name a data set (cifar10, fashion-mnist) or an image folder/archive")
    return resolve_config(data, overrides, preset=preset)


def _pretrained(values: dict[str, Any]) -> dict[str, Any]:
    """An hf: model's input size and centre crop from its preprocessor_config.json ({}: none found)."""
    from imgflow.models.hf import hf_preprocessing, hf_source

    return hf_preprocessing(hf_source(values["model"]), values.get("weights"), bool(values.get("pretrained")))


def eval_crop(train: dict[str, Any]) -> float:
    """The share of each side evaluation keeps (`Preprocessing.crop_pct`) for a run's 'train'
    settings: crop_pct for a photo run at a given image_size; 1 (whole images) otherwise, as
    images at the data's own size have no margin to crop."""
    if train.get("augment") == PHOTO and train.get("image_size"):
        return float(train.get("crop_pct", default_of("crop_pct")))
    return 1.0


def _absolute(place: str) -> str:
    from pathlib import Path

    return str(Path(place).resolve()) if Path(place).exists() else place


def absolute_if_path(data: str) -> str:
    """A path is saved absolute, so a run's config.json finds its data from any directory."""
    from pathlib import Path

    from imgflow.data.load import _ALIASES

    if data.lower() in _ALIASES or not Path(data).exists():
        return data
    return str(Path(data).resolve())


@dataclass(frozen=True)
class Option:
    """One TrainConfig field as a command-line option (the CLI builds its parser from these,
    `tune` prints commands with them)."""

    field: str
    help: str = ""
    kind: str = "float"  # float | lr (a float or 'find') | str | positive_int | non_negative_int | image_size | flag
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


# The TrainConfig fields a user sets. adam_eps (Keras' 1e-7) and eval_batch_size (no effect on
# results) have no option; data, preset and the run directory are positional or separate.
TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("model", "model name (see 'imgflow models')", "str"),
    Option("epochs", "full passes over the training part", "positive_int"),
    Option("batch_size", "images per optimiser step", "positive_int"),
    Option("lr", f"peak learning rate (at most {MAX_LR:g}); '{LR_FIND}': run 'imgflow lr-find' with these "
                 "options first and train at its suggestion", "lr", metavar="F|find"),
    Option("optimizer", "sgd is Nesterov SGD; muon: Muon for the conv filters (at --muon-lr), Nesterov SGD "
                        "for the rest, as airbench94_muon", "str", OPTIMIZERS),
    Option("muon_lr", "with --optimizer muon: the conv filters' peak lr (scheduled like --lr)"),
    Option("momentum", "SGD momentum in [0, 1)"),
    Option("weight_decay", f"on conv/dense weights, 0 to {MAX_WEIGHT_DECAY:g}"),
    Option("schedule", "onecycle: linear warmup then linear decay", "str", SCHEDULES),
    Option("warmup_epochs", f"0 to {MAX_WARMUP_EPOCHS:g}"),
    Option("lr_floor", "decay to this fraction of --lr, e.g. 0.07"),
    Option("bn_lr_scale", f"lr multiplier for BatchNorm parameters (airbench: 64; at most {MAX_BN_LR_SCALE:g})"),
    Option("lookahead", "every N steps average the weights with a slow copy (airbench: 5; 0 = off)",
           "non_negative_int", metavar="N"),
    Option("whiten_bias_epochs", "train the whitening stem's bias in the first N epochs only, then "
                                 "freeze it (airbench: 3; 0 = throughout)", "non_negative_int", metavar="N"),
    Option("whiten_bias_lr_scale", "lr multiplier for the whitening stem's bias (airbench94: 1; airbench94_muon: "
                                   f"64, as its BatchNorm biases; at most {MAX_BN_LR_SCALE:g})"),
    Option("decay_biases", "weight decay on biases and BatchNorm shifts too, each shrunk per step as much as "
                           "the weights whatever its lr scale (airbench decays them; by default they are not)",
           "flag"),
    Option("label_smoothing", "in [0, 1)"),
    Option("augment", "photo: random-resized crop, flip and light colour jitter, for photos", "str", AUGMENTS),
    Option("flip", "random: a fresh coin per image and epoch; alternate: each image flipped every other "
                   "epoch (airbench), so both views are seen equally often", "str", FLIPS),
    Option("translate", "largest random shift in pixels", "non_negative_int"),
    Option("cutout", "side of the zeroed square in pixels", "non_negative_int"),
    Option("normalize", "scale: x/255; standardize: by the training part's channel mean/std", "str",
           NORMALIZATIONS),
    Option("val_split", "validation fraction in [0, 1)"),
    Option("val_mode", "last: Keras' validation_split on a seeded shuffle", "str", VAL_MODES),
    Option("folds", "k-fold validation with K folds (0 = off)", "non_negative_int", metavar="K"),
    Option("fold", "which fold validates (0..K-1)", "non_negative_int"),
    Option("test_split", "data without a test split: hold out this fraction as one"),
    Option("train_subset", "train on at most N images (stratified), e.g. for quick experiments; 0 = all",
           "non_negative_int", metavar="N"),
    Option("val_subset", "validate each epoch on at most N images (stratified): faster epochs; 0 = all",
           "non_negative_int", metavar="N"),
    Option("seed", "fixes split, data order, augmentation and initialisation", "non_negative_int"),
    Option("precision", "auto: bf16 where the CPU or GPU runs it natively, fp16 with loss scaling on "
                        "older GPUs, else fp32", "str", PRECISIONS),
    Option("device", DEVICE_HELP, "str", metavar=DEVICE_METAVAR),
    Option("sync_bn", "under torchrun on CUDA: BatchNorm statistics over the whole global batch "
                      "(SyncBatchNorm) instead of each process's share", "flag"),
    Option("threads", THREADS_HELP, "positive_int"),
    Option("early_stopping", "stop when val_loss has not improved for PATIENCE epochs; keep the best "
                             "(0 = off)", "non_negative_int", metavar="PATIENCE"),
    Option("ema", "weight EMA decay per step, e.g. 0.999 (0 = off)"),
    Option("precise_bn", "after training, re-estimate BatchNorm statistics from the final weights on N "
                         "training images (e.g. 10000): running averages lag weights that were still "
                         "moving (0 = off, as in Keras)", "non_negative_int", metavar="N"),
    Option("image_size", "resize images to SIZE or HxW (default: the data's own size)", "image_size",
           metavar="SIZE|HxW"),
    Option("weights", "start from these local weights, offline: hf: models a save_pretrained directory or a "
                      ".safetensors/.bin file; fast-*/resnet9 another imgflow run of the same model",
           "str", metavar="DIR_OR_FILE"),
    Option("pretrained", "hf: models: download the hub id's weights through Hugging Face's cache", "flag"),
    Option("finetune", "train the new head with the backbone frozen for --freeze-epochs, then everything, "
                       "the backbone's stages from lr/100 (first) to lr/10 (last)", "flag"),
    Option("freeze_epochs", "with --finetune: epochs with the backbone frozen", "non_negative_int"),
    Option("freeze_backbone", "keep the backbone frozen throughout (head only; with --augment none its "
                              "features are computed once)", "flag"),
    Option("crop_scale", "--augment photo: smallest random crop as a fraction of the image's area, in "
                         "(0, 1] (torchvision: 0.08; gentler for small data sets)", metavar="MIN"),
    Option("crop_pct", "--augment photo with --image-size: keep images at image-size/F and evaluate on "
                       "their centre crop (an hf: model's own crop_pct when its config has one)", metavar="F"),
)
OPTION_OF = {option.field: option for option in TRAIN_OPTIONS}


def default_of(name: str) -> Any:
    """TrainConfig's default for field `name` (dataclasses.MISSING for data and model)."""
    return TrainConfig.__dataclass_fields__[name].default


def command_line_options(values: dict[str, Any]) -> list[str]:
    """`values` (TrainConfig fields) as `imgflow train` arguments, those that differ from the
    defaults; a field without an option is refused rather than printed as a flag no parser knows."""
    words: list[str] = []
    for name, value in values.items():
        if name not in OPTION_OF:
            raise ValueError(f"TrainConfig field {name!r} has no command-line option")
        if value is None or value == default_of(name):
            continue
        if OPTION_OF[name].kind == "flag":
            words.append(OPTION_OF[name].flag)
            continue
        if OPTION_OF[name].kind == "image_size":
            value = "x".join(str(side) for side in value)
        elif isinstance(value, float):  # the shortest text that reads back as the same number
            value = int(value) if value.is_integer() else repr(value)
        words += [OPTION_OF[name].flag, str(value)]
    return words

