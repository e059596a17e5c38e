"""Quality of a synthetic set and of its baselines, all measured the same way against one
held-out real reference, as one typed report.

Every set of (image, map) pairs -- the model's samples and each baseline -- gets
(:func:`measure_set`):

* ``kid`` / ``kid_std``: feature KID (unbiased polynomial kernel, mean and std over subsets) of
  the set against the reference, on the public segmenter's encoder features (headline
  distribution metric; ~0 when matched);
* ``conditional_dice``: the public segmenter's Dice on the set's images against the set's maps
  (Med-LSDM protocol; for real scans: their own maps);
* ``utility_dice``: Dice on the reference of a segmenter trained to convergence on the set
  (Med-DDPM protocol);
* ``ms_ssim_diversity``: mean pairwise 1 - MS-SSIM within the set;
* ``intensity_dice`` and ``sharpness``: network-free figures (:mod:`models.metrics.map_contrast`):
  how well the images' own intensities separate the tissues of their maps, and their mean
  gradient magnitude inside the brain;
* ``rf_fid``: random-feature FID against the reference (secondary; rank-deficient covariance
  with tens of samples, kept for continuity with earlier reports).

The baselines (:data:`BASELINES`): ``real`` (held-out real scans of other patients than the
reference: the floor), ``collapse`` (mean scan repeated), ``copy`` (nearest training scans),
``pretrained_only`` (samples of the public model before any site trained).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models.metrics.diversity import ms_ssim_diversity
from models.metrics.fid import rf_fid
from models.metrics.kid import kernel_inception_distance
from models.metrics.map_contrast import edge_sharpness, intensity_dice
from models.metrics.public_segmenter import (PendingPublicSegmenter, PublicSegmenter,
                                             conditional_dice, segmenter_features)
from models.metrics.segmentation_utility import (SegmenterSettings, TrainedSegmenter,
                                                 mean_foreground_dice, predict_labels,
                                                 segmenter_dice)
from models.metrics.segmenter_pool import SegmenterPool

log = logging.getLogger(__name__)

BASELINES = ("real", "collapse", "copy", "pretrained_only")
SET_METRICS = ("kid", "kid_std", "conditional_dice", "utility_dice", "ms_ssim_diversity",
               "intensity_dice", "sharpness", "rf_fid")
# Bumped when a set's figures change meaning or are added: cached sets are measured again.
_SET_FORMAT = 2
# Lower is better for these; higher for the rest of SET_METRICS (kid_std is neither).
LOWER_IS_BETTER = ("kid", "rf_fid")

Pairs = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SetQuality:
    """Quality of one set of pairs against the reference (see the module docstring)."""

    kid: float
    kid_std: float
    conditional_dice: float
    utility_dice: float
    ms_ssim_diversity: float
    intensity_dice: float
    sharpness: float
    rf_fid: float
    count: int

    def to_json_dict(self) -> dict[str, float | int | None]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in asdict(self).items()}


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else math.nan


@dataclass(frozen=True)
class QualityReport:
    """The model's :class:`SetQuality`, each baseline's (None: not measured), and what the
    figures were computed with."""

    synthetic: SetQuality
    baselines: dict[str, SetQuality | None]
    public_segmenter_sha256: str
    public_segmenter_validation_dice: float
    medicalnet_fid: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float]:
        """The model's conditional Dice, utility Dice, diversity, intensity Dice and sharpness as
        fractions of real's."""
        real = self.baselines.get("real")
        if real is None:
            return {}
        return {"conditional_dice_ratio": _ratio(self.synthetic.conditional_dice,
                                                 real.conditional_dice),
                "utility_dice_ratio": _ratio(self.synthetic.utility_dice, real.utility_dice),
                "diversity_ratio": _ratio(self.synthetic.ms_ssim_diversity,
                                          real.ms_ssim_diversity),
                "intensity_dice_ratio": _ratio(self.synthetic.intensity_dice,
                                               real.intensity_dice),
                "sharpness_ratio": _ratio(self.synthetic.sharpness, real.sharpness)}

    @property
    def bars(self) -> dict[str, bool]:
        """Issue 11's bars: collapse beaten on KID, conditional Dice and diversity; conditional
        and utility Dice >= 0.9 x real's; diversity within 25% of real's."""
        bars: dict[str, bool] = {}
        collapse, model = self.baselines.get("collapse"), self.synthetic
        if collapse is not None:
            bars.update(beats_collapse_kid=model.kid < collapse.kid,
                        beats_collapse_conditional_dice=(model.conditional_dice
                                                         > collapse.conditional_dice),
                        beats_collapse_diversity=(model.ms_ssim_diversity
                                                  > collapse.ms_ssim_diversity))
        ratios = self.ratios
        if ratios:
            bars.update(conditional_dice_at_least_0_9_real=ratios["conditional_dice_ratio"] >= 0.9,
                        utility_dice_at_least_0_9_real=ratios["utility_dice_ratio"] >= 0.9,
                        diversity_within_25pct_of_real=abs(ratios["diversity_ratio"] - 1) <= 0.25)
        return bars

    def metrics(self) -> dict[str, float | int | None]:
        """The model's figures and ratios, flat (what a sweep row or MLflow logs)."""
        flat = {**self.synthetic.to_json_dict(),
                **{k: (v if math.isfinite(v) else None) for k, v in self.ratios.items()},
                "medicalnet_fid": self.medicalnet_fid}
        return flat

    def to_json_dict(self) -> dict:
        return {"metrics": self.metrics(),
                "baselines": {name: (q.to_json_dict() if q is not None else None)
                              for name, q in self.baselines.items()},
                "bars": self.bars,
                "public_segmenter": {"sha256": self.public_segmenter_sha256,
                                     "validation_dice": self.public_segmenter_validation_dice},
                "notes": self.notes}


@dataclass(frozen=True)
class Reference:
    """The held-out real reference: images and maps ``(N, 1, D, H, W)`` and their KID features."""

    images: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor


def make_reference(images: torch.Tensor, labels: torch.Tensor,
                   segmenter: PublicSegmenter) -> Reference:
    """The reference pairs with their public-segmenter features computed once."""
    return Reference(images, labels, segmenter_features(segmenter, images, "reference features"))


def _set_cache_file(images: torch.Tensor, labels: torch.Tensor, reference: Pairs,
                    segmenter_key: str, seed: int, seg_settings: SegmenterSettings,
                    cache_dir: Path | str) -> Path:
    """Where the figures of these pairs against this reference are cached. Named by the public
    segmenter's key (its data and settings), so it is known before that segmenter is trained."""
    digest = hashlib.sha256()
    for tensor in (images.float(), labels.to(torch.uint8), reference[0].float(),
                   reference[1].to(torch.uint8)):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"format": _SET_FORMAT, "segmenter": segmenter_key, "seed": seed,
                              "settings": seg_settings.to_json_dict()}, sort_keys=True).encode())
    return Path(cache_dir) / "sets" / f"{digest.hexdigest()[:24]}.json"


def measure_set(images: torch.Tensor, labels: torch.Tensor, reference: Reference,
                segmenter: PublicSegmenter, num_classes: int, *, seed: int = 0,
                seg_settings: SegmenterSettings = SegmenterSettings(),
                device: torch.device | str = "cpu", name: str = "set",
                cache_dir: Path | str | None = None,
                utility_segmenter: Future[TrainedSegmenter] | None = None) -> SetQuality:
    """Every :class:`SetQuality` figure of pairs ``images``/``labels`` ``(N, 1, D, H, W)`` (N >= 2)
    against ``reference``. With ``cache_dir``, a set measured before (same pairs, reference,
    public segmenter, seed and settings) is read back instead of measured again.
    ``utility_segmenter``: the set's utility segmenter already being trained (a
    :class:`SegmenterPool` job with ``seed`` and ``seg_settings``); without it, it is trained
    here."""
    cached = None
    if cache_dir is not None:
        cached = _set_cache_file(images, labels, (reference.images, reference.labels),
                                 segmenter.key, seed, seg_settings, cache_dir)
        if cached.is_file():
            log.info("%s: measured before, read from %s", name, cached)
            return SetQuality(**json.loads(cached.read_text()))
    kid = kernel_inception_distance(reference.features,
                                    segmenter_features(segmenter, images, f"{name} features"),
                                    seed=seed)
    if utility_segmenter is None:
        utility = segmenter_dice(images, labels, reference.images, reference.labels,
                                 num_classes, seed, seg_settings, device,
                                 description=f"segmenter on {name}")
    else:
        utility = mean_foreground_dice(predict_labels(utility_segmenter.result().net,
                                                      reference.images),
                                       reference.labels, num_classes)
    quality = SetQuality(
        kid=kid.mean, kid_std=kid.std,
        conditional_dice=conditional_dice(segmenter, images, labels, num_classes),
        utility_dice=utility,
        ms_ssim_diversity=ms_ssim_diversity(images, seed=seed),
        intensity_dice=intensity_dice(images, labels, num_classes),
        sharpness=edge_sharpness(images, labels),
        rf_fid=rf_fid(reference.images, images, device=device),
        count=int(images.shape[0]))
    log.info("%s: %s", name, quality)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(quality)))
        temporary.replace(cached)
    return quality


def evaluate_quality(synthetic: Pairs, reference: Pairs, baselines: dict[str, Pairs | None],
                     segmenter: PublicSegmenter | PendingPublicSegmenter, num_classes: int, *,
                     seed: int = 0, seg_settings: SegmenterSettings = SegmenterSettings(),
                     device: torch.device | str = "cpu",
                     medicalnet_fid: float | None = None,
                     cache_dir: Path | str | None = None,
                     pool: SegmenterPool | None = None) -> QualityReport:
    """:class:`QualityReport` of ``synthetic`` and of each baseline, all against ``reference``.

    Every entry is (images, class maps), both ``(N, 1, D, H, W)``; a baseline given as None is
    reported as not measured. ``segmenter`` is the public segmenter
    (:func:`models.metrics.public_segmenter.public_segmenter`), or one still training in
    ``pool`` (:func:`~models.metrics.public_segmenter.start_public_segmenter`). The sets'
    utility segmenters train in ``pool`` (default: a :class:`SegmenterPool` for ``device``),
    beside each other and beside a public segmenter still in training. ``cache_dir``: see
    :func:`measure_set`.
    """
    sets = {name: pairs for name, pairs in baselines.items() if pairs is not None}
    sets["synthetic"] = synthetic
    with ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(SegmenterPool(device))
        training = {}
        for name, pairs in sets.items():
            if cache_dir is not None and _set_cache_file(*pairs, reference, segmenter.key, seed,
                                                         seg_settings, cache_dir).is_file():
                continue
            training[name] = pool.submit(*pairs, num_classes, seed, seg_settings,
                                         f"segmenter on {name}")
        public = segmenter.result() if isinstance(segmenter, PendingPublicSegmenter) else segmenter
        ref = make_reference(*reference, public)
        measured = {name: measure_set(*pairs, ref, public, num_classes, seed=seed,
                                      seg_settings=seg_settings, device=device, name=name,
                                      cache_dir=cache_dir, utility_segmenter=training.get(name))
                    for name, pairs in sets.items()}
    model = measured.pop("synthetic")
    return QualityReport(model, {name: measured.get(name) for name in baselines},
                         public.sha256, public.validation_dice, medicalnet_fid)
