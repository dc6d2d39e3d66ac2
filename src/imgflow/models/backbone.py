"""A classifier split into a backbone and a head: freezing the backbone, its ordered stages (for
graded learning rates) and the features the head reads (for training the head on cached ones).

Shared by `hf:` models (models.hf) and imgflow's own families with a separate head (models.fast),
so `--finetune`, `--freeze-backbone` and `--weights RUN_DIR` treat them alike.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imgflow.errors import UserError


class HeadAndBackbone:
    """Mixin for an nn.Module whose head (`head_modules`) reads the backbone's pooled features.

    While frozen the backbone's parameters take no gradient and its BatchNorm layers stay in
    eval mode (their running statistics are the pretrained ones), whatever `train()` is called.
    Parameters that were not trainable to begin with (a fixed whitening stem) stay so when the
    backbone is unfrozen."""

    backbone_frozen = False

    def head_modules(self) -> list[nn.Module]:
        """The head, in the order it runs; the first reads the backbone's features."""
        raise NotImplementedError

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The logits of the backbone's `features` (what the first head module reads)."""
        for module in self.head_modules():
            features = module(features)
        return features

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.head_modules() for p in m.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def backbone_stages(self) -> list[list[nn.Parameter]]:
        """The backbone's parameters in groups from the input to the head: its stem, then each
        block of its largest sequence of blocks (ResNet's stages, ViT's layers, FastNet's groups),
        whatever follows the last block (a final norm) joined to it. One group when the
        backbone has no such sequence."""
        backbone = self.backbone_parameters()
        blocks = _largest_block_sequence(self, {id(p) for p in backbone})
        if blocks is None:
            return [backbone]
        owner = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
        stages: list[list[nn.Parameter]] = [[] for _ in range(len(blocks) + 1)]
        stage = 0  # the stem until the first block
        for p in backbone:  # parameters() runs in definition order: stem, blocks, final norm
            stage = owner.get(id(p), stage)
            stages[stage].append(p)
        return [stage for stage in stages if stage]

    def freeze_backbone(self, frozen: bool) -> None:
        if not hasattr(self, "_backbone_trainable"):  # as built: what unfreezing gives back
            self._backbone_trainable = {id(p) for p in self.backbone_parameters() if p.requires_grad}
        self.backbone_frozen = frozen
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen and id(p) in self._backbone_trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if mode and self.backbone_frozen:
            head = {id(m) for h in self.head_modules() for m in h.modules()}
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head:
                    m.eval()
        return self


def _largest_block_sequence(model: nn.Module, backbone: set[int]) -> list[nn.Module] | None:
    """The ModuleList or Sequential of the backbone with the most parameters in two or more of
    its children (the outermost of equals): the sequence of stages or layers the image runs through."""
    best, best_count = None, 0
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        params = [p for p in module.parameters()]
        if not params or any(id(p) not in backbone for p in params):
            continue
        children = [c for c in module.children() if any(True for _ in c.parameters())]
        count = sum(p.numel() for p in params)
        if len(children) >= 2 and count > best_count:
            best, best_count = children, count
    return best


def run_weights_file(place: str) -> Path:
    """The model.safetensors of an imgflow run directory (or that file itself)."""
    path = Path(place)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        raise UserError(f"--weights {place}: no imgflow run there (a run directory holds model.safetensors; "
                        "train one first, or finish it)")
    return file


def load_run_weights(model: nn.Module, model_name: str, place: str) -> None:
    """Start `model` (registered as `model_name`) from another imgflow run's weights: every tensor
    but a head of another shape (another number of classes), which keeps its fresh initialisation.
    A run of another model, or of other tensor shapes (image channels), is refused in one line."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = run_weights_file(place)
    try:
        with safe_open(str(file), "pt") as f:
            trained_as = (f.metadata() or {}).get("model")
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"--weights {place}: cannot read {file.name}: {exc}") from None
    if trained_as is not None and trained_as != model_name:
        raise UserError(f"--weights {place} is a {trained_as} run: this run's model is {model_name}; "
                        f"train with --model {trained_as} to start from it")
    own = model.state_dict()
    head = {name for name, _ in _named_head_tensors(model)}
    mismatched = sorted(k for k in own.keys() ^ state.keys() if k not in head)
    mismatched += sorted(k for k in own.keys() & state.keys()
                         if own[k].shape != state[k].shape and k not in head)
    if mismatched:
        raise UserError(f"--weights {place}: its tensors do not fit {model_name} here (e.g. {mismatched[0]}: "
                        "another number of image channels?)")
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)


def _named_head_tensors(model: nn.Module):
    head = {id(m) for h in model.head_modules() for m in h.modules()}
    for name, module in model.named_modules():
        if id(module) in head:
            for tensor_name, tensor in module.named_parameters(recurse=False):
                yield f"{name}.{tensor_name}", tensor
            for tensor_name, tensor in module.named_buffers(recurse=False):
                yield f"{name}.{tensor_name}", tensor
