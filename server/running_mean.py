"""A weighted mean of state dicts folded in one at a time (FedAvg without holding every reply).

``add(weights, w)`` adds ``w * weights`` to a float64 running sum; ``mean()`` divides by the total
weight. Memory: one float64 copy of the model, whatever the number of sites.
"""

from __future__ import annotations

from typing import Mapping

import torch


class RunningMean:
    """The weighted mean of the state dicts added so far (all with the same keys and shapes)."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, weights: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one state dict (name -> tensor of any shape) with weight ``weight`` > 0."""
        if weight <= 0:
            raise ValueError(f"weight must be > 0 (got {weight})")
        if self.total and set(weights) != set(self.total):
            raise ValueError("a reply's weights do not have the keys of the others")
        for name, tensor in weights.items():
            term = tensor.detach().to(torch.float64) * float(weight)
            if name in self.total:
                self.total[name] += term
            else:
                self.total[name] = term
        self.weight += float(weight)
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """name -> float64 tensor: sum(w_k * x_k) / sum(w_k)."""
        if not self.count:
            raise ValueError("no state dict was added")
        return {name: total / self.weight for name, total in self.total.items()}
