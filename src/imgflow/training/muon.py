"""airbench94_muon's optimiser split: PyTorch's Muon for convolution filters, Nesterov SGD for the rest.

`torch.optim.Muon` takes 2-D parameters only. A conv filter bank (out, in, kh, kw) is a matrix
(out, in*kh*kw) to Muon, so each filter is handed to it as a 2-D view of the same storage: Muon's
in-place update is then the filter's update. Orthogonalisation does not care in which order a
row's entries come (NS(G P) = NS(G) P for a permutation P), so the view follows the filter's
memory layout (channels_last is (out, kh, kw, in)) and needs no copy.
"""
from __future__ import annotations

import math

import torch

# airbench94_muon's settings for its filters (Jordan, KellerJordan/cifar10-airbench): momentum
# 0.6 and 3 Newton-Schulz steps (the quintic's coefficients make 3 enough for a training signal).
MUON_MOMENTUM = 0.6
MUON_NS_STEPS = 3


def matrix_view(filters: torch.Tensor) -> torch.Tensor:
    """`filters` (out, in, kh, kw) as a matrix (out, in*kh*kw) sharing its storage when the layout
    allows (contiguous or channels_last), else a copy in the same column order."""
    order = (0, 2, 3, 1) if filters.is_contiguous(memory_format=torch.channels_last) \
        and not filters.is_contiguous() else (0, 1, 2, 3)
    return filters.permute(order).reshape(filters.shape[0], -1)


class MuonAndSGD:
    """Muon on the 4-D parameters of `muon_groups`, Nesterov SGD on `sgd_groups`, as one optimiser.

    What the training step needs of an optimiser: `param_groups` (the same dicts the two hold, so
    the schedule's lr reaches them), `zero_grad`, `step`, `state_dict`/`load_state_dict`. Each
    filter is rescaled to a fixed norm before its step (airbench: BatchNorm follows every conv, so
    the norm carries no information, and a fixed norm keeps Muon's fixed-size steps meaningful).
    """

    def __init__(self, sgd_groups: list[dict], muon_groups: list[dict], *, lr: float, momentum: float):
        self.filters = [p for group in muon_groups for p in group["params"]]
        self.views = {id(p): torch.nn.Parameter(matrix_view(p.detach())) for p in self.filters}
        for p in self.filters:
            p.register_post_accumulate_grad_hook(self._pass_grad)
        groups = [{**group, "params": [self.views[id(p)] for p in group["params"]]} for group in muon_groups]
        self.sgd = torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.muon = torch.optim.Muon(groups, lr=lr, momentum=MUON_MOMENTUM, nesterov=True,
                                     weight_decay=0.0, ns_steps=MUON_NS_STEPS)
        # A view that is not a view (an unusual layout) would train a copy: refuse that.
        assert all(self.views[id(p)].data_ptr() == p.data_ptr() for p in self.filters), "filter view copied"

    def _pass_grad(self, filters: torch.Tensor) -> None:
        # Seen through param_groups as soon as backward made it, so fp16's GradScaler unscales
        # (and checks for inf) the filters' gradients in place through these views too.
        self.views[id(filters)].grad = matrix_view(filters.grad)

    @property
    def param_groups(self) -> list[dict]:
        return self.sgd.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)
        for p in self.filters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.sgd.step()
        for p in self.filters:
            if p.grad is None:
                continue
            view = self.views[id(p)]
            # Taken again now: DistributedDataParallel averages the ranks' gradients after backward.
            view.grad = matrix_view(p.grad)
            view.mul_(math.sqrt(view.shape[0]) / view.norm().clamp_min(1e-12))
        self.muon.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        self.muon.load_state_dict(state["muon"])
