"""Weight averaging during training: an EMA of the weights, and airbench's Lookahead."""
from __future__ import annotations

import torch


class WeightEMA:
    """Exponential moving average of the weights; BatchNorm statistics are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point and not k.endswith(("running_mean", "running_var")):
                self.state[k].lerp_(v, 1.0 - self.decay)
            else:
                self.state[k].copy_(v)


class Lookahead:
    """airbench's lookahead: every `every` steps, a slow copy of the weights moves toward the
    live ones and the live ones jump back to it.

    The slow copy's decay grows as 0.95^every * (step/total)^3: early on it is ~0 (the live
    weights run free); at the end it is 0.77 for every=5, a memory of ~4 updates (~20 steps),
    which smooths the last, small-lr steps of a short run. BatchNorm statistics are averaged the
    same way, so they match the averaged weights. The last step syncs too, so the model ends on
    the slow weights and no step is dropped. (Weights that share storage would be updated twice;
    no registered model ties weights.)
    """

    def __init__(self, model: torch.nn.Module, every: int):
        self.every = every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if v.dtype.is_floating_point}

    def decay_at(self, step: int, total_steps: int) -> float:
        return 0.95 ** self.every * (step / max(total_steps, 1)) ** 3

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].lerp_(v, 1.0 - decay)
                v.copy_(self.state[k])

    def after_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """Sync after every `every`-th step and after the last one.

        The first sync takes the live weights as they are (decay 0): the slow copy then never
        holds the initial weights, which a run shorter than `every` steps would otherwise end on
        with weight 0.77. In a run of thousands of steps the first decay is ~1e-9 anyway.
        """
        if step % self.every == 0 or step == total_steps:
            self.update(model, 0.0 if step <= self.every else self.decay_at(step, total_steps))
