"""Exponential moving average of model weights, used for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow`` = decay * shadow + (1 - decay) * params after every step.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) after n updates, so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = list(self.shadow.parameters())
        torch._foreach_lerp_(shadow, [p.detach() for p in model.parameters()], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"weights": self.shadow.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["weights"])
        self.updates = state["updates"]
