"""Frechet distances between real and synthetic volumes, on features of a 3D network.

``rf_fid`` uses the seeded random-feature network of :mod:`models.metrics.feature_net`:
a "random-feature FID". It ranks synthetic sets against the same real set, but its
scale is its own: it is NOT comparable with Inception FID or published FID numbers, and
only comparable between runs with the same seed, network and volume size.
``medicalnet_fid`` is the 3D FID on MedicalNet features, from a local weights file.
The distance itself is MONAI's :class:`monai.metrics.FIDMetric`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from monai.metrics import FIDMetric
from torch import nn

from models.metrics.errors import MetricInputError
from models.metrics.feature_net import (RANDOM_FEATURE_SEED, build_medicalnet_feature_net,
                                        build_random_feature_net, extract_features,
                                        zscore_volumes)


def frechet_distance(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to ``(N_real, F)`` and ``(N_synthetic, F)``
    features (MONAI's FIDMetric)."""
    for name, features in (("real", real_features), ("synthetic", synthetic_features)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise MetricInputError(f"{name} features: need at least 2 samples of shape (N, F) "
                                   f"for a covariance, got {tuple(features.shape)}; "
                                   f"add more volumes")
    if real_features.shape[1] != synthetic_features.shape[1]:
        raise MetricInputError(f"features: real have {real_features.shape[1]} dimensions but "
                               f"synthetic {synthetic_features.shape[1]}; use one feature network")
    with warnings.catch_warnings():
        # with fewer samples than features the covariances are singular by construction;
        # scipy's sqrtm still returns the right root and says so at every call
        warnings.filterwarnings("ignore", message="Matrix is singular")
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated")
        distance = float(FIDMetric()(synthetic_features.double(), real_features.double()))
    # the square root leaves a tiny negative residue when the two sets are equal
    return max(distance, 0.0)


def _network_fid(net: nn.Module, real: torch.Tensor, synthetic: torch.Tensor,
                 batch_size: int, label: str) -> float:
    real_features = extract_features(net, real, batch_size, f"{label} real")
    synthetic_features = extract_features(net, synthetic, batch_size, f"{label} synthetic")
    return frechet_distance(real_features, synthetic_features)


def rf_fid(real: torch.Tensor, synthetic: torch.Tensor, seed: int = RANDOM_FEATURE_SEED,
           batch_size: int = 8, device: torch.device | str = "cpu") -> float:
    """Random-feature FID between ``real`` and ``synthetic`` volumes ``(N, 1, D, H, W)``.

    Features: the seeded random 3D ResNet, every stage globally average-pooled (120 dimensions).
    Not comparable with Inception FID (see the module docstring).
    """
    net = build_random_feature_net(seed).to(device)
    return _network_fid(net, real, synthetic, batch_size, "rf_fid")


def medicalnet_fid(real: torch.Tensor, synthetic: torch.Tensor, weights: Path | str | nn.Module,
                   batch_size: int = 4, device: torch.device | str = "cpu") -> float:
    """3D FID on MedicalNet features between volumes ``(N, 1, D, H, W)``.

    ``weights`` is a local MedicalNet ``.pth`` file (or a network already built from one
    by :func:`build_medicalnet_feature_net`). Each volume is z-scored first, the input
    normalisation MedicalNet was trained with.
    """
    net = weights if isinstance(weights, nn.Module) else build_medicalnet_feature_net(weights)
    net = net.to(device)
    return _network_fid(net, zscore_volumes(real), zscore_volumes(synthetic), batch_size,
                        "medicalnet_fid")
