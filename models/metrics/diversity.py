"""MS-SSIM diversity of a synthetic set: mean over pairs of (1 - MS-SSIM).

0 means every sample is the same volume (mode collapse); larger means more varied.
MS-SSIM is MONAI's :class:`monai.metrics.MultiScaleSSIMMetric`.

**Scales and kernel for small volumes.** The standard MS-SSIM (5 scales, an 11-voxel
Gaussian window, sigma 1.5) needs about 180 voxels per side. :func:`ms_ssim_settings`
adapts it to the smallest side ``S`` of the volume:

* the number of scales ``n`` is the largest (at most 5) whose coarsest scale,
  ``S // 2**(n - 1)``, is still at least 4 voxels, so a 3-voxel window fits inside it;
* the window is the largest odd size, at most 11, strictly smaller than that coarsest
  scale (and within MONAI's own size check); it keeps the standard sigma of 1.5, i.e. the
  standard Gaussian truncated to the smaller window (a narrower sigma would make a
  3-voxel window almost a single voxel, with no local variance left to compare);
* the weights are the first ``n`` standard weights (Wang et al. 2003) rescaled to sum to 1.

So 16^3 -> 3 scales, 3-voxel window; 32^3 -> 4 scales, 3; 64^3 -> 5 scales, 3;
128^3 -> 5 scales, 7; 192^3 and up -> the standard 5 scales, 11.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from monai.metrics import MultiScaleSSIMMetric
from tqdm.auto import tqdm

from models.metrics.errors import MetricInputError

STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
STANDARD_KERNEL_SIZE = 11
STANDARD_KERNEL_SIGMA = 1.5
MIN_KERNEL_SIZE = 3


@dataclass(frozen=True)
class MSSSIMSettings:
    """The MS-SSIM set-up used for one volume size."""

    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]

    @property
    def scales(self) -> int:
        return len(self.weights)


def ms_ssim_settings(spatial_shape: tuple[int, ...]) -> MSSSIMSettings:
    """Scales, window and weights that fit volumes of ``spatial_shape`` (module docstring)."""
    side = min(spatial_shape)
    for scales in range(len(STANDARD_WEIGHTS), 0, -1):
        coarsest = side // 2 ** (scales - 1)
        # MONAI's own check: side // max(1, scales - 1)**2 > kernel_size - 1
        largest = min(STANDARD_KERNEL_SIZE, coarsest - 1, side // max(1, scales - 1) ** 2)
        kernel_size = largest if largest % 2 else largest - 1
        if kernel_size >= MIN_KERNEL_SIZE:
            weights = STANDARD_WEIGHTS[:scales]
            total = sum(weights)
            return MSSSIMSettings(kernel_size=kernel_size, kernel_sigma=STANDARD_KERNEL_SIGMA,
                                  weights=tuple(w / total for w in weights))
    raise MetricInputError(f"ms_ssim: volumes of shape {tuple(spatial_shape)} are too small; "
                           f"every side must be at least {MIN_KERNEL_SIZE + 1} voxels")


def ms_ssim_diversity(samples: torch.Tensor, data_range: float = 1.0, max_pairs: int = 2000,
                      batch_size: int = 16, seed: int = 0) -> float:
    """Mean of (1 - MS-SSIM) over pairs of ``samples`` ``(N, 1, D, H, W)``, N >= 2.

    All ``N (N - 1) / 2`` pairs when there are at most ``max_pairs`` of them, else a
    seeded random subset of ``max_pairs`` pairs. ``data_range`` is the intensity range
    (1 for the site normalisation to ~[0, 1]).
    """
    if samples.ndim != 5:
        raise MetricInputError(f"ms_ssim: expected samples of shape (N, C, D, H, W), got "
                               f"{tuple(samples.shape)}; pass 3D volumes")
    if samples.shape[0] < 2:
        raise MetricInputError(f"ms_ssim: diversity needs at least 2 samples, got "
                               f"{samples.shape[0]}; add more synthetic volumes")
    settings = ms_ssim_settings(tuple(samples.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range,
                                  kernel_size=settings.kernel_size,
                                  kernel_sigma=settings.kernel_sigma,
                                  weights=settings.weights, reduction="none")
    pairs = torch.tensor(list(itertools.combinations(range(samples.shape[0]), 2)))
    if len(pairs) > max_pairs:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
        pairs = pairs[keep[:max_pairs]]
    dissimilarity = []
    with torch.no_grad():
        for start in tqdm(range(0, len(pairs), batch_size), desc="ms-ssim pairs", unit="batch",
                          disable=None, leave=False):
            first, second = pairs[start:start + batch_size].T
            similarity = metric(samples[first].float(), samples[second].float())
            dissimilarity.append(1.0 - similarity.flatten().double())
    return float(torch.cat(dissimilarity).mean())
