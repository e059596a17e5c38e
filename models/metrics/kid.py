"""Kernel Inception Distance on any features: the unbiased polynomial-kernel MMD^2 of
Binkowski et al. (2018), averaged over random subsets, with its standard deviation.

Kernel ``k(x, y) = (x . y / d + 1) ** 3`` (d = feature dimension). For each subset, ``m``
features are drawn without replacement from each set and the unbiased MMD^2 estimate is
computed (the formula torchmetrics' ``KernelInceptionDistance`` uses). Unlike a Frechet
distance it needs no covariance estimate, so it is usable with tens of samples, and it is
unbiased: two samples of one distribution score about 0 (small negative values happen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.metrics.errors import MetricInputError

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 50


@dataclass(frozen=True)
class KID:
    """KID mean and standard deviation over subsets, and the subset size used."""

    mean: float
    std: float
    subset_size: int


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x y^T / d + 1)^3`` for features ``x`` ``(N, d)`` and ``y`` ``(M, d)`` -> ``(N, M)``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of ``x`` ``(m, d)`` and ``y`` ``(m, d)`` under :func:`polynomial_kernel`."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = ((k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum()))
    return within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor,
                              subsets: int = DEFAULT_SUBSETS,
                              subset_size: int = DEFAULT_SUBSET_SIZE, seed: int = 0) -> KID:
    """KID of feature sets ``real`` ``(N, d)`` and ``fake`` ``(M, d)``.

    The subset size is ``min(subset_size, N, M)`` (at least 2); subsets are drawn with a
    generator seeded by ``seed``, so the figure is reproducible.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricInputError(f"kid: expected feature matrices (N, d) and (M, d), got "
                               f"{tuple(real.shape)} and {tuple(fake.shape)}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise MetricInputError(f"kid: needs at least 2 feature vectors per set (got "
                               f"{real.shape[0]} real, {fake.shape[0]} synthetic); add volumes")
    real, fake = real.double(), fake.double()
    generator = torch.Generator().manual_seed(seed)
    scores = torch.stack([
        unbiased_mmd2(real[torch.randperm(real.shape[0], generator=generator)[:size]],
                      fake[torch.randperm(fake.shape[0], generator=generator)[:size]])
        for _ in range(subsets)])
    return KID(mean=float(scores.mean()), std=float(scores.std(unbiased=False)),
               subset_size=size)
