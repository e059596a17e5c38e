"""Quality metrics of synthetic 3D volumes against real ones, with no downloaded weights.

Headline (:mod:`models.metrics.quality`), each shown next to the baselines of
:mod:`models.metrics.baselines` measured the same way:

* :func:`kernel_inception_distance`: unbiased polynomial-kernel KID on the encoder features of
  the public segmenter (:func:`public_segmenter`, trained on public scans only, cached);
* :func:`conditional_dice`: the public segmenter's Dice on synthetic volumes against their maps;
* :func:`segmenter_dice`: Dice on held-out real scans of a segmenter trained on a set
  (:class:`SegmenterPool` trains several at once on a multi-core CPU);
* :func:`ms_ssim_diversity`: mean pairwise (1 - MS-SSIM) within a set;
* :func:`intensity_dice`, :func:`edge_sharpness`: network-free map-following and sharpness.

Secondary: :func:`rf_fid` (random-feature FID), :func:`medicalnet_fid` (local weights file),
:func:`volume_mmd`.
"""

from models.metrics.baselines import collapse_baseline, copy_baseline
from models.metrics.diversity import MSSSIMSettings, ms_ssim_diversity, ms_ssim_settings
from models.metrics.errors import MetricInputError
from models.metrics.feature_net import (RANDOM_FEATURE_DIM, RANDOM_FEATURE_SEED,
                                        StagePooledResNet, build_medicalnet_feature_net,
                                        build_random_feature_net, extract_features,
                                        feature_net_fingerprint, zscore_volumes)
from models.metrics.fid import frechet_distance, medicalnet_fid, rf_fid
from models.metrics.kid import KID, kernel_inception_distance
from models.metrics.map_contrast import edge_sharpness, intensity_dice
from models.metrics.mmd import volume_mmd
from models.metrics.public_segmenter import (PendingPublicSegmenter, PublicSegmenter,
                                             conditional_dice, public_segmenter,
                                             segmenter_features, start_public_segmenter)
from models.metrics.quality import (BASELINES, SET_METRICS, QualityReport, Reference,
                                    SetQuality, evaluate_quality, make_reference, measure_set)
from models.metrics.segmentation_utility import (SegmentationUtility, SegmenterSettings,
                                                 TrainedSegmenter, build_segmenter,
                                                 mean_foreground_dice, predict_labels,
                                                 segmentation_utility, segmenter_dice,
                                                 train_segmenter)
from models.metrics.segmenter_pool import SegmenterPool

__all__ = [
    "BASELINES", "KID", "MSSSIMSettings", "MetricInputError", "PendingPublicSegmenter",
    "PublicSegmenter",
    "QualityReport", "RANDOM_FEATURE_DIM", "RANDOM_FEATURE_SEED", "Reference", "SET_METRICS",
    "SegmentationUtility", "SegmenterPool", "SegmenterSettings", "SetQuality", "StagePooledResNet",
    "TrainedSegmenter", "build_medicalnet_feature_net", "build_random_feature_net",
    "build_segmenter", "collapse_baseline", "conditional_dice", "copy_baseline",
    "edge_sharpness", "evaluate_quality", "extract_features", "feature_net_fingerprint", "frechet_distance",
    "intensity_dice", "kernel_inception_distance", "make_reference", "mean_foreground_dice", "measure_set",
    "medicalnet_fid", "ms_ssim_diversity", "ms_ssim_settings", "predict_labels",
    "public_segmenter", "rf_fid", "segmentation_utility", "segmenter_dice",
    "segmenter_features", "start_public_segmenter", "train_segmenter", "volume_mmd", "zscore_volumes",
]
