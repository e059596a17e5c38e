"""Maximum mean discrepancy between real and synthetic volumes (MONAI's MMDMetric).

Computed on the **volumes themselves** (not on network features), each flattened and
scaled by ``1 / sqrt(voxels)`` so the value is a per-voxel quantity in squared intensity
units, comparable across volume sizes. MONAI's estimator is the unbiased MMD^2 with a
linear kernel, i.e. an unbiased estimate of ``mean over voxels of (mean real image -
mean synthetic image)^2``:

* two independent sets from one distribution give values around 0 (slightly negative
  values happen and are expected);
* the very same set on both sides gives exactly ``-2 / n * (mean per-voxel variance)``,
  the estimator's correction for self-similarity, which is small next to real shifts.

MONAI's implementation needs equally many volumes on both sides. When the counts
differ, the larger set is shuffled (seeded) and cut into chunks of the smaller set's
size (the last chunk wraps around), and the MMD is averaged over the chunks, so every
volume counts.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import MMDMetric

from models.metrics.errors import MetricInputError


def _per_voxel(volumes: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` -> float64 ``(N, voxels)`` scaled so a dot product is a per-voxel mean."""
    flat = volumes.flatten(1).double()
    return flat / math.sqrt(flat.shape[1])


def volume_mmd(real: torch.Tensor, synthetic: torch.Tensor, seed: int = 0) -> float:
    """Unbiased linear-kernel MMD^2 per voxel between ``(N_real, 1, D, H, W)`` and
    ``(N_synthetic, 1, D, H, W)`` volumes (see the module docstring)."""
    if real.shape[1:] != synthetic.shape[1:]:
        raise MetricInputError(f"mmd: real volumes are {tuple(real.shape[1:])} but synthetic "
                               f"{tuple(synthetic.shape[1:])}; compare volumes of one shape")
    for name, volumes in (("real", real), ("synthetic", synthetic)):
        if volumes.shape[0] < 2:
            raise MetricInputError(f"mmd: needs at least 2 {name} volumes, got "
                                   f"{volumes.shape[0]}; add more volumes")
    real_flat, synthetic_flat = _per_voxel(real), _per_voxel(synthetic)
    small, large = sorted((real_flat, synthetic_flat), key=len)
    order = torch.randperm(len(large), generator=torch.Generator().manual_seed(seed))
    chunks = math.ceil(len(large) / len(small))
    order = order.repeat(chunks + 1)  # wrap around for the last chunk
    metric = MMDMetric()
    values = []
    for chunk in range(chunks):
        picked = large[order[chunk * len(small):(chunk + 1) * len(small)]]
        # MMDMetric(y, y_pred): keep real as y whichever side was chunked
        pair = (small, picked) if small is real_flat else (picked, small)
        values.append(float(metric(*pair)))
    return sum(values) / len(values)
