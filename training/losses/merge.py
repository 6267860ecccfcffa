"""EMA loss normalisation and the scale-neutral merge across patch sizes.

Each scale's total loss is divided by its own (detached) running mean, so a
patch size whose loss is naturally larger does not dominate, and the scales are
merged by a geometric mean: every scale contributes equally in relative terms.
"""
from __future__ import annotations

import math

import torch


class EMANormalizer:
    """Running means of named non-negative losses; ``normalize`` divides by them (detached)."""

    def __init__(self, momentum: float = 0.99, eps: float = 1e-8):
        self.momentum, self.eps = momentum, eps
        self.values: dict[str, float] = {}

    def normalize(self, name: str, loss: torch.Tensor, update: bool = True) -> torch.Tensor:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss '{name}' is not finite ({value})")
        if update:
            old = self.values.get(name)
            self.values[name] = value if old is None else self.momentum * old + (1 - self.momentum) * value
        return loss / (self.values.get(name, value) + self.eps)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = state["momentum"]
        self.values = dict(state["values"])


def scale_neutral_merge(losses: dict[str, torch.Tensor], ema: EMANormalizer, eps: float = 1e-6) -> torch.Tensor:
    """Geometric mean over scales of each scale's EMA-normalised total loss."""
    if not losses:
        raise ValueError("no losses to merge")
    logs = [torch.log(ema.normalize(f"scale/{name}", loss) + eps) for name, loss in losses.items()]
    return torch.exp(torch.stack(logs).mean())
