"""The optimiser of a run: parameter groups, weight decay, per-group learning-rate scales."""
from __future__ import annotations

import torch

from imgflow.training.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Conv/dense weights with weight decay; BatchNorm parameters and biases without.

    Decaying BatchNorm and biases only hurts. Each group's `lr_scale` multiplies the scheduled
    lr: BatchNorm gets `bn_lr_scale` (airbench trains its BatchNorm biases 64x faster: their
    gradients are small, and they set where each activation bends). airbench's BatchNorm has no
    trainable scale, like the fast family here; in a model whose BatchNorm scales train
    (seed-batchnorm), they get the multiplier too.
    """
    if config.finetune or config.freeze_backbone:
        return _optimizer(_finetune_groups(model, config), config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay,
               "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if config.bn_lr_scale != 1.0:
        norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
        norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
        groups[1]["params"] = [p for p in groups[1]["params"] if id(p) not in norm]
        groups.append({"params": [p for p in params if id(p) in norm], "weight_decay": 0.0,
                       "lr_scale": config.bn_lr_scale})
    return _optimizer(groups, config)


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
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale})
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
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps)
    # Keras' Adam has no weight decay; with --weight-decay it is the classic L2 form.
    return torch.optim.Adam(groups, lr=config.lr, eps=config.adam_eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's lr_scale (absent in checkpoints from before it: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
