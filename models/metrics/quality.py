"""All quality metrics of a synthetic set against real data, as one typed report."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from models.metrics.diversity import ms_ssim_diversity
from models.metrics.feature_net import RANDOM_FEATURE_SEED
from models.metrics.fid import medicalnet_fid, rf_fid
from models.metrics.mmd import volume_mmd
from models.metrics.segmentation_utility import segmentation_utility

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityReport:
    """Quality of a synthetic set against real data.

    rf_fid: random-feature FID (seeded random 3D ResNet features; lower is closer;
        NOT comparable with Inception FID).
    mmd: unbiased linear-kernel MMD^2 per voxel on the volumes (around 0 when the
        distributions match; small negative values are possible).
    ms_ssim_diversity: mean (1 - MS-SSIM) over synthetic pairs (0 = all identical).
    dice_synthetic / dice_real: held-out real foreground Dice of the segmenter trained on
        synthetic / on real pairs; dice_ratio = dice_synthetic / dice_real (NaN if
        dice_real is 0).
    medicalnet_fid: FID on MedicalNet features; None unless a weights file was given.
    """

    rf_fid: float
    mmd: float
    ms_ssim_diversity: float
    dice_synthetic: float
    dice_real: float
    dice_ratio: float
    medicalnet_fid: float | None = None

    def to_json_dict(self) -> dict[str, float | None]:
        """Plain dict for JSON: non-finite values (a NaN ratio) become None (null)."""
        return {key: (value if value is None or math.isfinite(value) else None)
                for key, value in asdict(self).items()}


def evaluate_quality(real_images: torch.Tensor, synthetic_images: torch.Tensor,
                     synthetic_labels: torch.Tensor, segmenter_train_images: torch.Tensor,
                     segmenter_train_labels: torch.Tensor, heldout_images: torch.Tensor,
                     heldout_labels: torch.Tensor, num_classes: int, *, seg_steps: int,
                     seed: int = 0, feature_seed: int = RANDOM_FEATURE_SEED,
                     medicalnet: Path | str | nn.Module | None = None, seg_batch_size: int = 2,
                     device: torch.device | str = "cpu") -> QualityReport:
    """Every metric of :class:`QualityReport`.

    Images ``(N, 1, D, H, W)`` in the site normalisation (~[0, 1]); label maps
    ``(N, 1, D, H, W)`` class indices. ``real_images`` (all real scans) feed rf_fid, MMD
    and MedicalNet FID; the segmenter trains on ``segmenter_train_*`` (real) and on
    ``synthetic_*``, and is scored on ``heldout_*``, real scans of other patients.
    ``seed`` drives the segmenters and the MMD chunking; ``feature_seed`` the rf_fid network.
    """
    fid = rf_fid(real_images, synthetic_images, seed=feature_seed, device=device)
    log.info("rf_fid %.6g", fid)
    mmd = volume_mmd(real_images, synthetic_images, seed=seed)
    log.info("mmd %.6g", mmd)
    diversity = ms_ssim_diversity(synthetic_images, seed=seed)
    log.info("ms_ssim_diversity %.6g", diversity)
    medical = None
    if medicalnet is not None:
        medical = medicalnet_fid(real_images, synthetic_images, medicalnet, device=device)
        log.info("medicalnet_fid %.6g", medical)
    utility = segmentation_utility(synthetic_images, synthetic_labels, segmenter_train_images,
                                   segmenter_train_labels, heldout_images, heldout_labels,
                                   num_classes, seg_steps, seed=seed, batch_size=seg_batch_size,
                                   device=device)
    return QualityReport(rf_fid=fid, mmd=mmd, ms_ssim_diversity=diversity,
                         dice_synthetic=utility.dice_synthetic, dice_real=utility.dice_real,
                         dice_ratio=utility.dice_ratio, medicalnet_fid=medical)
