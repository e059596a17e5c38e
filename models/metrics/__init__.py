"""Quality metrics of synthetic 3D volumes against real ones, with no downloaded weights.

* :func:`rf_fid`: random-feature FID on a seeded random 3D ResNet (not Inception FID).
* :func:`medicalnet_fid`: 3D FID on MedicalNet features, from a local weights file.
* :func:`volume_mmd`: MONAI's unbiased MMD on the volumes.
* :func:`ms_ssim_diversity`: mean pairwise (1 - MS-SSIM) among synthetic samples.
* :func:`segmentation_utility`: Dice on held-out real data of a segmenter trained on
  synthetic versus real pairs.
* :func:`evaluate_quality`: all of them, as a :class:`QualityReport`.
"""

from models.metrics.diversity import MSSSIMSettings, ms_ssim_diversity, ms_ssim_settings
from models.metrics.errors import MetricInputError
from models.metrics.feature_net import (RANDOM_FEATURE_DIM, RANDOM_FEATURE_SEED,
                                        StagePooledResNet, build_medicalnet_feature_net,
                                        build_random_feature_net, extract_features,
                                        feature_net_fingerprint, zscore_volumes)
from models.metrics.fid import frechet_distance, medicalnet_fid, rf_fid
from models.metrics.mmd import volume_mmd
from models.metrics.quality import QualityReport, evaluate_quality
from models.metrics.segmentation_utility import (SegmentationUtility, build_segmenter,
                                                 mean_foreground_dice, predict_labels,
                                                 segmentation_utility, train_segmenter)

__all__ = [
    "MSSSIMSettings", "MetricInputError", "QualityReport", "RANDOM_FEATURE_DIM",
    "RANDOM_FEATURE_SEED", "SegmentationUtility", "StagePooledResNet",
    "build_medicalnet_feature_net", "build_random_feature_net", "build_segmenter",
    "evaluate_quality", "extract_features", "feature_net_fingerprint", "frechet_distance",
    "mean_foreground_dice", "medicalnet_fid", "ms_ssim_diversity", "ms_ssim_settings",
    "predict_labels", "rf_fid", "segmentation_utility", "train_segmenter", "volume_mmd",
    "zscore_volumes",
]
