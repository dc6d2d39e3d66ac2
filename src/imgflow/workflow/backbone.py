"""The pretrained backbone of a folder of photos: where its weights are on this machine, its
input size and training pace, and the two step-7 candidates it is tried as (frozen features,
fine-tuned), planned in step 6 from that pace. Nothing here downloads anything."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgflow.errors import UserError
from imgflow.workflow.budget import BUDGET_SHARE, MAX_EPOCHS, plan_backbone
from imgflow.workflow.context import Context, base_settings, protocol_split, train_part
from imgflow.workflow.image_size import WORKING_SIDES
from imgflow.workflow.record import Plan
from imgflow.workflow.throughput import probe_throughput

# The backbone offered for photos without --backbone: ResNet-18 (11.7M parameters, 1.8 GFLOPs at
# 224x224) is the smallest of the ImageNet ResNets on the hub, the one a CPU budget can fine-tune.
DEFAULT_BACKBONE = "microsoft/resnet-18"
# The part of step 7's share the backbone's two candidates get when there is one; the scratch
# candidates get the rest.
BACKBONE_SHARE_OF_TUNE = 0.5
FROZEN_RUN, FINETUNE_RUN = "7-backbone-frozen", "7-backbone-finetune"  # their plans' names, and runs'
# The head on cached features: an epoch costs a linear layer on a few hundred vectors, so many
# epochs cost next to nothing beside the one pass that computes the features.
FROZEN_EPOCHS = 10
BACKBONE_BATCH = 32  # a few hundred photos: 32 gives ~10 steps an epoch
# AdamW at 1e-3 with a one-cycle schedule: fastai's fine_tune default (its lr 2e-3 is for the
# head; --finetune gives the backbone's stages 1/100 to 1/10 of it).
BACKBONE_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "schedule": "onecycle", "warmup_epochs": 0.0,
                   "batch_size": BACKBONE_BATCH, "weight_decay": 0.0, "label_smoothing": 0.0}
# The frozen one: --augment none, so the features are cached; its head, a linear layer on fixed
# features, is a convex problem that AdamW at 1e-3 moves slowly in the few dozen steps a few hundred
# photos give: on the tests' tiny ResNet (random weights, 120 images of 2 colours, 4 steps an epoch)
# 30 epochs at 1e-3 stayed at chance (loss 0.95), 10 at 1e-2 reached 1.0 (loss 0.48). Not yet
# measured on real pretrained features.
FROZEN = {"freeze_backbone": True, "augment": "none", "lr": 1e-2}
FINETUNED = {"finetune": True, "freeze_epochs": 1, "augment": "photo"}
DESCRIPTIONS = {FROZEN_RUN: "pretrained backbone frozen, head trained on its cached features",
                FINETUNE_RUN: "pretrained backbone fine-tuned (head first, then graded lrs), photo augmentation"}
# Ranks for the one-standard-error rule beside the scratch candidates' 0-3: a frozen backbone
# trains only its head, the most constrained model of all; fine-tuning adds one regulariser
# (augmentation) to a model that starts from pretrained weights.
REGULARISATION = {FROZEN_RUN: 4, FINETUNE_RUN: 1}


def resolve_backbone(option: str | None) -> str | None:
    """The local directory of `--backbone hf:<dir or hub id>` (a hub id: its snapshot in Hugging
    Face's cache); None without the option. Bad values are one UserError."""
    from imgflow.models.hf import INSTALL_HINT, PREFIX, cached_snapshot, extra_installed, weights_file

    if option is None:
        return None
    if not option.startswith(PREFIX) or not option[len(PREFIX):]:
        raise UserError(f"--backbone takes hf:<local directory or hub id>, e.g. hf:{DEFAULT_BACKBONE}, got {option!r}")
    if not extra_installed():
        raise UserError(f"--backbone needs Hugging Face transformers: {INSTALL_HINT}")
    source = option[len(PREFIX):]
    path = Path(source)
    if not path.exists():
        snapshot = cached_snapshot(source)
        if snapshot is None:
            raise UserError(f"--backbone {option}: no such directory, and not in Hugging Face's cache here "
                            f"(the workflow downloads nothing: 'imgflow train DATA --model {option} --pretrained' "
                            "fetches it once)")
        path = snapshot
    if not path.is_dir() or not (path / "config.json").is_file() or weights_file(path) is None:
        raise UserError(f"--backbone {option}: {path} is not a directory saved with save_pretrained "
                        "(config.json and model.safetensors or pytorch_model.bin)")
    return str(path.resolve())


def is_photo_folder(ctx: Context) -> bool:
    """Typical images larger than the largest working size (so resized down before step 1)."""
    typical = ctx.state.resize.typical_size if ctx.state.resize is not None else None
    return typical is not None and max(typical) > WORKING_SIDES[-1]


def input_size(source: str, fallback: list[int] | None) -> list[int] | None:
    """The size the backbone was pretrained at (its preprocessor_config.json), else `fallback`."""
    from imgflow.models.hf import hf_preprocessing

    own = hf_preprocessing(source, None).get("image_size")
    return list(own) if own else fallback


def measure_backbone_throughput(ctx: Context, model: str, size: list[int] | None) -> float:
    """Training images per second of `model` on a batch of the data resized to `size` (H, W):
    the workflow's probe (probe_throughput), at the backbone's own input size."""
    import torch
    import torch.nn.functional as F

    train = train_part(ctx)
    batch = train.images[:BACKBONE_BATCH]
    if size is not None and list(batch.shape[1:3]) != list(size):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        batch = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return probe_throughput(model, batch, train.labels[:BACKBONE_BATCH], int(train.labels.max()) + 1,
                            ctx.threads, ctx.device)


def plan_backbone_runs(ctx: Context, source: str) -> tuple[Plan, Plan]:
    """Step 6: the frozen and fine-tuned candidates' plans, priced by the backbone's measured pace
    within its part of step 7's share. Saved before any run starts, as plan_once saves a plan, so
    a resumed workflow trains them as planned."""
    plans = ctx.state.plans
    if FROZEN_RUN not in plans or FINETUNE_RUN not in plans:
        part, val = protocol_split(ctx)
        model = f"hf:{source}"
        size = input_size(source, ctx.state.image_size)
        ips = measure_backbone_throughput(ctx, model, size)  # one probe prices both: the same network
        seconds = BUDGET_SHARE["tune"] * ctx.budget_seconds * BACKBONE_SHARE_OF_TUNE
        (frozen_epochs, frozen_subset), (epochs, subset) = plan_backbone(
            seconds, ips, len(part), len(val), ctx.state.protocol.runs_per_candidate, FROZEN_EPOCHS,
            MAX_EPOCHS["overfit"])
        common = {**base_settings(ctx), **BACKBONE_RECIPE, "model": model, "image_size": size}
        plans[FROZEN_RUN] = Plan(ips, {**common, **FROZEN, "epochs": frozen_epochs, "train_subset": frozen_subset})
        plans[FINETUNE_RUN] = Plan(ips, {**common, **FINETUNED, "epochs": epochs, "train_subset": subset,
                                         "warmup_epochs": round(0.2 * epochs, 2)})
        ctx.save()
    return plans[FROZEN_RUN], plans[FINETUNE_RUN]


def backbone_settings(plans: dict[str, Plan]) -> list[tuple[str, dict[str, Any]]]:
    """(run name, settings) of the backbone candidates step 6 planned, in training order ([]: none)."""
    return [(name, plans[name].settings) for name in (FROZEN_RUN, FINETUNE_RUN) if name in plans]
