"""The optimiser of a run: parameter groups, weight decay, per-group learning-rate scales."""
from __future__ import annotations

import torch

from imgflow.training.config import TrainConfig
from imgflow.training.muon import MuonAndSGD


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Conv/dense weights with weight decay; BatchNorm parameters and biases without, unless
    --decay-biases (airbench decays them; `_bias_decay`). Each group's `lr_scale` multiplies the scheduled
    lr: BatchNorm gets `bn_lr_scale` (airbench trains its BatchNorm biases 64x faster: their
    gradients are small, and they set where each activation bends). airbench's BatchNorm has no
    trainable scale, like the fast family here; in a model whose BatchNorm scales train
    (seed-batchnorm), they get the multiplier too. With --whiten-bias-epochs the whitening
    stem's bias has a group of its own (at --whiten-bias-lr-scale), stopped by
    `apply_whitening_bias`; with --optimizer muon
    the conv filters have one at --muon-lr (`MuonAndSGD`).
    """
    if config.finetune or config.freeze_backbone:
        return _optimizer(_finetune_groups(model, config), config)
    params = [p for p in model.parameters() if p.requires_grad]
    special = _whitening_bias_group(model, config) + _norm_group(model, config, params)
    taken = {id(p) for group in special for p in group["params"]}
    params = [p for p in params if id(p) not in taken]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay,
               "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": _bias_decay(config, 1.0),
               "lr_scale": 1.0},
              *special]
    if config.optimizer == "muon":
        return _muon(groups, config)
    return _optimizer(groups, config)


def _norm_group(model: torch.nn.Module, config: TrainConfig, params: list) -> list[dict]:
    if config.bn_lr_scale == 1.0:
        return []
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    return [{"params": [p for p in params if id(p) in norm], "weight_decay": _bias_decay(config, config.bn_lr_scale),
             "lr_scale": config.bn_lr_scale}]


def _bias_decay(config: TrainConfig, lr_scale: float) -> float:
    """A bias group's weight decay: none, or with --decay-biases airbench's form, the weights'
    decay divided by the group's lr scale. SGD shrinks a parameter by lr x scale x decay per step,
    so every group then shrinks as much per step as the weights, however fast it learns."""
    return config.weight_decay / lr_scale if config.decay_biases else 0.0


def _whitening_bias_group(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    own = config.whiten_bias_epochs or config.whiten_bias_lr_scale != 1.0
    bias = model.whitening_bias() if own and hasattr(model, "whitening_bias") else None
    if bias is None:
        return []
    return [{"params": [bias], "weight_decay": _bias_decay(config, config.whiten_bias_lr_scale),
             "lr_scale": config.whiten_bias_lr_scale, "whitening_bias": True}]


def apply_whitening_bias(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> None:
    """airbench's whitening bias trains for the first --whiten-bias-epochs epochs only (0: all of
    them). Stopped by a zero lr rather than by requires_grad, so DistributedDataParallel's set of
    gradients never changes; a function of the epoch, so a resumed run stops it where the
    uninterrupted one did."""
    training = not config.whiten_bias_epochs or epoch < config.whiten_bias_epochs
    for group in optimizer.param_groups:
        if group.get("whitening_bias"):
            group["lr_scale"] = config.whiten_bias_lr_scale if training else 0.0


def _muon(groups: list[dict], config: TrainConfig) -> MuonAndSGD:
    """The 4-D weights (conv filters) to Muon at --muon-lr, undecayed (each filter is rescaled to
    a fixed norm instead); everything else to Nesterov SGD as without Muon."""
    filters = [p for group in groups for p in group["params"] if p.ndim == 4]
    sgd_groups = [{**group, "params": [p for p in group["params"] if p.ndim != 4]} for group in groups]
    muon_groups = [{"params": filters, "weight_decay": 0.0, "lr_scale": config.muon_lr / config.lr}]
    return MuonAndSGD([g for g in sgd_groups if g["params"]], muon_groups, lr=config.lr,
                      momentum=config.momentum)


# Discriminative learning rates when fine-tuning (fastai's fine_tune: lr spread over slice(lr/100,
# lr/10)): the new head trains at lr, the pretrained backbone's last stage at a tenth of it and its
# first (stem) at a hundredth, the stages between spaced geometrically. Early layers hold generic
# features (edges, textures) that transfer as they are; late ones are the most task-specific, and
# the head's first large gradients would overwrite all of them at the head's lr.
EARLIEST_LR_SCALE = 0.01
LATEST_LR_SCALE = 0.1


def stage_lr_scales(stages: int) -> list[float]:
    """The lr scale of each of `stages` backbone stages, earliest first (one stage: LATEST_LR_SCALE)."""
    if stages == 1:
        return [LATEST_LR_SCALE]
    ratio = (LATEST_LR_SCALE / EARLIEST_LR_SCALE) ** (1 / (stages - 1))
    return [EARLIEST_LR_SCALE * ratio ** i for i in range(stages)]


def _finetune_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The head at lr, each backbone stage at its `stage_lr_scales` (none with --freeze-backbone);
    each split into decayed weights and undecayed norms/biases. Frozen parameters are in the groups
    too: while they have no gradient the optimiser skips them, so unfreezing needs no new optimiser."""
    parts = [(model.head_parameters(), 1.0)]
    if not config.freeze_backbone:
        stages = model.backbone_stages()
        parts += list(zip(stages, stage_lr_scales(len(stages))))
    groups = []
    for params, scale in parts:
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay,
                       "lr_scale": scale})
        # A stage's biases shrink as its weights do: both learn at the stage's scale.
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": _bias_decay(config, 1.0),
                       "lr_scale": scale})
    return [g for g in groups if g["params"]]


def backbone_frozen_at(config: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during `epoch` (0-based): a function of the epoch alone, so a
    resumed run freezes exactly where the uninterrupted one did."""
    return config.freeze_backbone or (config.finetune and epoch < config.freeze_epochs)


def apply_freezing(model: torch.nn.Module, config: TrainConfig, epoch: int) -> None:
    """Freeze or unfreeze an hf: model's backbone for `epoch` (a no-op for other runs)."""
    if config.finetune or config.freeze_backbone:
        model.freeze_backbone(backbone_frozen_at(config, epoch))


def _optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        # Nesterov needs a momentum: --momentum 0 is plain SGD.
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps)
    # Keras' Adam has no weight decay; with --weight-decay it is the classic L2 form.
    return torch.optim.Adam(groups, lr=config.lr, eps=config.adam_eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's lr_scale (absent in checkpoints from before it: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
