"""Quality of a synthetic dataset against real scans: the glue behind ``fedsynth evaluate``.

Both folders are site-format folders (``manifest.csv`` with ``patient_id,image,label``
plus NIfTI files), read through :func:`client.site_data.load_site`, so real and
synthetic volumes get exactly the same preprocessing (RAS, spacing, pad/crop, intensity
to [0, 1]). The grid is the config's ``data.shape``/``data.spacing`` when a config is
given; otherwise it is the grid of the first real scan, and every synthetic scan must
already be on that grid.

The real scans (patients no site and no pretraining saw) are split by patient (seeded) into
the reference and the ``real`` baseline; no patient is in both. The synthetic set and every
baseline (real, collapse, copy, pretrained-only) are measured the same way against the
reference (:mod:`models.metrics.quality`): feature KID on the public segmenter's encoder,
conditional Dice, utility Dice, MS-SSIM diversity, and rf_fid as a secondary figure. The
public segmenter is trained on the public folder once and cached.

The JSON report holds counts and settings but no patient ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch

from client.site_data import load_site, read_manifest
from configs.schema import DataConfig
from models.device import autocast, native_bf16, resolve_device
from models.metrics import (BASELINES, RANDOM_FEATURE_SEED, SET_METRICS, QualityReport,
                            SegmenterSettings, build_medicalnet_feature_net,
                            build_random_feature_net, collapse_baseline, copy_baseline,
                            evaluate_quality, feature_net_fingerprint, make_reference,
                            measure_set, medicalnet_fid, ms_ssim_settings, public_segmenter,
                            start_public_segmenter)
from models.metrics.segmenter_pool import SegmenterPool

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.5   # of the real patients: the reference; the rest is the real baseline
DEFAULT_SEG_STEPS = SegmenterSettings().max_steps
DEFAULT_SEG_BATCH_SIZE = SegmenterSettings().batch_size
GRID_TOLERANCE_MM = 1e-3


class EvaluationError(ValueError):
    """Evaluation input that cannot be used. One line: ``<where>: <problem>; <fix>``."""


@dataclass(frozen=True)
class VolumeSet:
    """A folder's scans, preprocessed.

    images: float32 ``(N, 1, D, H, W)`` in ~[0, 1]; labels: uint8 ``(N, 1, D, H, W)``
    class indices; patient_ids: one per scan.
    """

    folder: Path
    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]

    @property
    def num_patients(self) -> int:
        return len(set(self.patient_ids))


@dataclass(frozen=True)
class EvaluationResult:
    """The metrics plus what is needed to reproduce and compare them."""

    report: QualityReport
    details: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        return {**self.report.to_json_dict(), **self.details}


def _ras_grid(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and voxel size of a NIfTI file in RAS axis order, from its header only."""
    image = _readable_header(path)
    axes = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for source, target in enumerate(axes[:3]):
        shape[target] = int(image.shape[source])
        spacing[target] = float(image.header.get_zooms()[source])
    return tuple(shape), tuple(spacing)


def _readable_header(path: Path) -> nib.spatialimages.SpatialImage:
    """The NIfTI image at ``path`` (header read, voxels not yet); one EvaluationError line for a
    garbage, truncated or non-3D file."""
    fix = "write it again (a complete 3D NIfTI file) or drop its row from the manifest"
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise EvaluationError(f"{path}: not a readable NIfTI file ({type(err).__name__}); "
                              f"{fix}") from None
    if len(shape) != 3:
        raise EvaluationError(f"{path}: a {len(shape)}D volume of shape {shape}; {fix}")
    return image


def _grid_text(shape: tuple[int, ...], spacing: tuple[float, ...]) -> str:
    return (f"{'x'.join(map(str, shape))} voxels of "
            f"{'x'.join(f'{s:g}' for s in spacing)} mm")


def _check_folder(folder: Path, role: str, manifest: str) -> None:
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: {role} folder not found; pass a site-format folder "
                              f"(manifest.csv with patient_id,image,label plus NIfTI files)")
    if not (folder / manifest).is_file():
        contents = "empty" if not any(folder.iterdir()) else f"has no {manifest}"
        raise EvaluationError(f"{folder}: {role} folder is {contents}; pass a site-format "
                              f"folder with {manifest} (patient_id,image,label) and its "
                              f"NIfTI files")


def data_config_from_folder(folder: Path, data: DataConfig) -> DataConfig:
    """``data`` with ``shape``/``spacing`` set to the RAS grid of the folder's first scan."""
    first = read_manifest(folder, data.manifest)[0]
    if not first.image.is_file():
        raise EvaluationError(f"{first.image}: image file not found; fix the manifest of {folder}")
    shape, spacing = _ras_grid(first.image)
    return dataclasses.replace(data, shape=shape, spacing=spacing)


def check_synthetic_grid(synthetic_dir: Path, data: DataConfig, real_dir: Path) -> None:
    """Refuse synthetic scans whose grid differs from the real one (``data``'s grid)."""
    for record in read_manifest(synthetic_dir, data.manifest):
        if not record.image.is_file():
            continue  # load_site names the missing file
        shape, spacing = _ras_grid(record.image)
        if shape != tuple(data.shape) or not np.allclose(spacing, data.spacing, rtol=0,
                                                         atol=GRID_TOLERANCE_MM):
            raise EvaluationError(
                f"{record.image}: synthetic grid {_grid_text(shape, spacing)} differs from the "
                f"real data's {_grid_text(tuple(data.shape), tuple(data.spacing))} ({real_dir}); "
                f"write the synthetic volumes on the real grid or pass --config to resample both "
                f"to data.shape and data.spacing")


def load_volume_set(folder: Path, data: DataConfig) -> VolumeSet:
    """Read a site-format folder through :func:`client.site_data.load_site`."""
    dataset = load_site(folder, data, data.manifest)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items]).float()
    labels = torch.stack([item["label"].argmax(0, keepdim=True) for item in items]).to(torch.uint8)
    return VolumeSet(folder=folder, images=images, labels=labels,
                     patient_ids=[item["patient_id"] for item in items])


def split_by_patient(patient_ids: list[str], holdout_fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Scan indices of the segmenter-train part and of the held-out part.

    Patients (sorted, then shuffled with ``seed``) go whole to one side: ``round(fraction
    * patients)`` of them, at least 1 and at most all but 1, are held out.
    """
    patients = sorted(set(patient_ids))
    if len(patients) < 2:
        raise EvaluationError(f"real data: {len(patients)} patient(s); the segmentation utility "
                              f"needs at least 2 (one to train on, one held out); add patients")
    order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed))
    count = min(max(1, round(holdout_fraction * len(patients))), len(patients) - 1)
    heldout = {patients[i] for i in order[:count].tolist()}
    train_idx = [i for i, p in enumerate(patient_ids) if p not in heldout]
    heldout_idx = [i for i, p in enumerate(patient_ids) if p in heldout]
    return train_idx, heldout_idx


def default_cache_dir() -> Path:
    """The public segmenter's cache: ``$XDG_CACHE_HOME/fedsynth`` (``~/.cache/fedsynth``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedsynth"


def _loaded(folder: Path, data: DataConfig, role: str, shape: tuple[int, ...]) -> VolumeSet:
    volumes = load_volume_set(folder, data)
    if volumes.images.shape[1:] != shape:
        raise EvaluationError(f"{folder}: {role} volumes {tuple(volumes.images.shape[2:])} differ "
                              f"from real {tuple(shape[1:])} after loading; pass --config with "
                              f"one data.shape for all folders")
    if len(volumes.patient_ids) < 2:
        raise EvaluationError(f"{folder}: {len(volumes.patient_ids)} {role} scan(s); the metrics "
                              f"need at least 2 per folder; add scans")
    return volumes


def _real_split(real_dir: Path, data: DataConfig, holdout_fraction: float,
                seed: int) -> tuple[VolumeSet, list[int], list[int]]:
    """The real folder's scans and their split by patient: (scans, real-baseline indices,
    reference indices)."""
    real = load_volume_set(real_dir, data)
    if len(real.patient_ids) < 2:
        raise EvaluationError(f"{real_dir}: {len(real.patient_ids)} real scan(s); the metrics "
                              f"need at least 2 per folder; add scans")
    real_idx, reference_idx = split_by_patient(real.patient_ids, holdout_fraction, seed)
    if not bool((real.labels[reference_idx] > 0).any()):
        raise EvaluationError(f"{real_dir}: the reference label maps hold no foreground; "
                              f"the Dice metrics need labelled structures")
    if len(real_idx) < 2 or len(reference_idx) < 2:
        raise EvaluationError(f"{real_dir}: {len(real.patient_ids)} scans split into "
                              f"{len(reference_idx)} reference and {len(real_idx)} real-baseline "
                              f"scans; each side needs at least 2; add patients")
    return real, real_idx, reference_idx


def _segmenter_settings(seg_steps: int, seg_batch_size: int, device: str) -> SegmenterSettings:
    # bf16 forward passes where the hardware has it (1.8x faster on the demo, same Dice).
    return SegmenterSettings(max_steps=seg_steps, batch_size=seg_batch_size,
                             bf16_training=native_bf16(device))


def _data_baselines(trains: list[VolumeSet], real_half: tuple[torch.Tensor, torch.Tensor],
                    maps: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``collapse`` and ``copy`` baselines for conditioning ``maps`` ``(M, 1, D, H, W)``,
    built from the training folders (the ``real`` baseline half without them)."""
    training = [(t.images, t.labels) for t in trains] or [real_half]
    pooled = (torch.cat([t[0] for t in training]), torch.cat([t[1] for t in training]))
    return {"collapse": collapse_baseline(training, maps), "copy": copy_baseline(*pooled, maps)}


def prepare_real_side(real_dir: Path, data: DataConfig, *, public_dir: Path, seed: int = 0,
                      seg_steps: int = DEFAULT_SEG_STEPS,
                      seg_batch_size: int = DEFAULT_SEG_BATCH_SIZE,
                      holdout_fraction: float = HOLDOUT_FRACTION, cache_dir: Path,
                      train_dirs: tuple[Path, ...] = (),
                      planned_maps: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      device: str | None = None) -> None:
    """Train and cache, in this process, the part of :func:`evaluate_folders` that needs real
    data only: the public segmenter and the ``real`` baseline's figures (its utility segmenter
    included). A later :func:`evaluate_folders` with the same arguments and ``cache_dir`` reads
    them back and trains only the segmenters of the sets not measured here. The demo runs this
    in a background process beside public pretraining.

    ``planned_maps``: given the public folder's maps ``(K, 1, D, H, W)``, the maps the synthetic
    set will be conditioned on ``(M, 1, D, H, W)`` (the release's first attempts,
    :func:`server.release.first_attempt_maps`). With it, the ``collapse`` and ``copy``
    baselines for those maps (from ``train_dirs``) are measured and cached too; the evaluation
    reads them back only if the synthetic set's maps are exactly these (its cache is keyed by
    content), and otherwise measures them itself.
    """
    device = str(resolve_device(device))
    real, real_idx, reference_idx = _real_split(Path(real_dir), data, holdout_fraction, seed)
    shape = tuple(real.images.shape[1:])
    public = _loaded(Path(public_dir), data, "public", shape)
    settings = _segmenter_settings(seg_steps, seg_batch_size, device)
    segmenter = public_segmenter(public.images, public.labels, data.num_classes, cache_dir,
                                 seed=seed, settings=settings, device=device)
    reference = make_reference(real.images[reference_idx], real.labels[reference_idx], segmenter)
    real_half = (real.images[real_idx], real.labels[real_idx])
    sets = {"real": real_half}
    if planned_maps is not None:
        trains = [_loaded(Path(f), data, "training", shape) for f in train_dirs]
        sets.update(_data_baselines(trains, real_half, planned_maps(public.labels)))
    for name, (images, labels) in sets.items():
        measure_set(images, labels, reference, segmenter, data.num_classes, seed=seed,
                    seg_settings=settings, device=device, name=name, cache_dir=cache_dir)


def evaluate_folders(real_dir: Path, synthetic_dir: Path, data: DataConfig | None = None, *,
                     public_dir: Path | None = None, train_dirs: tuple[Path, ...] = (),
                     pretrained_dir: Path | None = None, seg_steps: int = DEFAULT_SEG_STEPS,
                     seed: int = 0, medicalnet_weights: Path | None = None,
                     holdout_fraction: float = HOLDOUT_FRACTION,
                     seg_batch_size: int = DEFAULT_SEG_BATCH_SIZE,
                     cache_dir: Path | None = None,
                     device: str | None = None, precision: str = "fp32") -> EvaluationResult:
    """The quality of the synthetic folder and of the baselines against the real folder.

    The real folder (held-out patients) is split by patient into the reference and the
    ``real`` baseline. ``public_dir`` (default ``data.public_dir``) trains the public segmenter
    (cached under ``cache_dir``). ``train_dirs`` (the sites' training data) build the
    ``collapse`` and ``copy`` baselines; without them, the ``real`` baseline half stands in.
    ``pretrained_dir`` holds samples of the pretrained-only model (baseline not measured
    without it). ``data`` None: built-in label names, the real folder's own grid. Raises
    :class:`EvaluationError`, ``SiteDataError`` or ``MetricInputError`` (all one line) on bad
    input, before any long computation.
    """
    real_dir, synthetic_dir = Path(real_dir), Path(synthetic_dir)
    if seg_steps < 1:
        raise EvaluationError(f"--seg-steps: must be >= 1 (got {seg_steps}); "
                              f"give the segmenters a training budget")
    device = str(resolve_device(device))  # None / auto: CUDA when present
    manifest = (data or DataConfig()).manifest
    public_dir = Path(public_dir) if public_dir is not None else (
        Path(data.public_dir) if data is not None and data.public_dir is not None else None)
    if public_dir is None:
        raise EvaluationError("public data: not given; pass --public DIR (the public cohort the "
                              "KID features and the conditional-Dice segmenter are trained on) "
                              "or a --config with data.public_dir")
    _check_folder(real_dir, "real", manifest)
    _check_folder(synthetic_dir, "synthetic", manifest)
    _check_folder(public_dir, "public", manifest)
    for folder in train_dirs:
        _check_folder(Path(folder), "training", manifest)
    if pretrained_dir is not None:
        _check_folder(Path(pretrained_dir), "pretrained-only samples", manifest)
    # Build MedicalNet first: a bad weights file should stop us before minutes of work.
    medicalnet = build_medicalnet_feature_net(medicalnet_weights) if medicalnet_weights else None
    if data is None:
        data = data_config_from_folder(real_dir, DataConfig())
        check_synthetic_grid(synthetic_dir, data, real_dir)

    real, real_idx, reference_idx = _real_split(real_dir, data, holdout_fraction, seed)
    shape = tuple(real.images.shape[1:])
    synthetic = _loaded(synthetic_dir, data, "synthetic", shape)
    public = _loaded(public_dir, data, "public", shape)
    trains = [_loaded(Path(f), data, "training", shape) for f in train_dirs]
    pretrained = _loaded(Path(pretrained_dir), data, "pretrained-only", shape) \
        if pretrained_dir is not None else None

    seg_settings = _segmenter_settings(seg_steps, seg_batch_size, device)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    reference = (real.images[reference_idx], real.labels[reference_idx])
    real_half = (real.images[real_idx], real.labels[real_idx])
    count = len(synthetic.patient_ids)
    baselines = {
        "real": real_half,
        **_data_baselines(trains, real_half, synthetic.labels),
        "pretrained_only": (pretrained.images, pretrained.labels) if pretrained else None,
    }
    medical = None
    if medicalnet is not None:
        medical = medicalnet_fid(reference[0], synthetic.images, medicalnet, device=device)
    # The public segmenter and the sets' utility segmenters train side by side in the pool.
    with SegmenterPool(device) as pool, autocast(device, precision):  # bf16 only when asked
        pending = start_public_segmenter(public.images, public.labels, data.num_classes,
                                         cache_dir, seed=seed, settings=seg_settings,
                                         device=device, pool=pool)
        report = evaluate_quality((synthetic.images, synthetic.labels), reference, baselines,
                                  pending, data.num_classes, seed=seed, seg_settings=seg_settings,
                                  device=device, medicalnet_fid=medical, cache_dir=cache_dir,
                                  pool=pool)
    segmenter = pending.result()

    ms_ssim = ms_ssim_settings(tuple(synthetic.images.shape[2:]))
    reference_patients = {real.patient_ids[i] for i in reference_idx}
    details = {
        "real": {"folder": str(real_dir), "scans": len(real.patient_ids),
                 "patients": real.num_patients,
                 "reference_patients": len(reference_patients),
                 "reference_scans": len(reference_idx),
                 "real_baseline_patients": real.num_patients - len(reference_patients),
                 "real_baseline_scans": len(real_idx)},
        "synthetic": {"folder": str(synthetic_dir), "scans": count},
        "public": {"folder": str(public_dir), "scans": len(public.patient_ids)},
        "training": {"folders": [str(f) for f in train_dirs] or ["(real baseline half)"],
                     "scans": sum(len(t.patient_ids) for t in trains) or len(real_idx)},
        "pretrained_only": {"folder": str(pretrained_dir) if pretrained_dir else None},
        "grid": {"shape": list(data.shape), "spacing_mm": list(data.spacing),
                 "label_names": list(data.label_names)},
        "settings": {
            "seed": seed, "seg_steps": seg_steps, "seg_batch_size": seg_batch_size,
            "segmenter": seg_settings.to_json_dict(),
            "holdout_fraction": holdout_fraction, "device": device,
            "torch_version": torch.__version__,
            "public_segmenter_sha256": segmenter.sha256,
            "public_segmenter_validation_dice": segmenter.validation_dice,
            "public_segmenter_steps": segmenter.steps,
            "rf_fid_feature_seed": RANDOM_FEATURE_SEED,
            "rf_fid_feature_net_sha256": feature_net_fingerprint(
                build_random_feature_net(RANDOM_FEATURE_SEED)),
            "ms_ssim": {"scales": ms_ssim.scales, "kernel_size": ms_ssim.kernel_size,
                        "kernel_sigma": ms_ssim.kernel_sigma, "weights": list(ms_ssim.weights)},
            "medicalnet_weights": str(medicalnet_weights) if medicalnet_weights else None,
        },
        "notes": NOTES,
    }
    return EvaluationResult(report=report, details=details)


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(content, stream, indent=2, allow_nan=False)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


NOTES = {
    "reference": "held-out real patients (half of --real, split by patient); every set below is "
                 "measured against it",
    "kid": "feature KID: unbiased polynomial-kernel MMD^2 (Binkowski et al.) on the public "
           "segmenter's encoder features, mean and std over 100 subsets; ~0 when matched",
    "conditional_dice": "the public segmenter's Dice on the set's images against the maps they "
                        "were generated from (Med-LSDM protocol)",
    "utility_dice": "Dice on the reference of a segmenter trained to convergence on the set "
                    "(Med-DDPM protocol)",
    "intensity_dice": "no network: each voxel takes the class whose mean intensity in its own "
                      "image (under the image's map) is nearest; mean foreground Dice against "
                      "the map. Contrast-free; partial volume and noise keep real scans below 1",
    "sharpness": "no network: mean gradient magnitude (central differences, [0, 1] intensity "
                 "per voxel) inside the map's foreground grown by one voxel; scanner noise "
                 "raises it for real scans",
    "rf_fid": "SECONDARY: random-feature FID (seeded random 3D ResNet, 120 features; "
              "rank-deficient covariance with tens of samples; not Inception FID)",
    "baselines": "real: the other half of the held-out patients (the floor); collapse: each "
                 "training set's mean scan repeated; copy: for each conditioning map the "
                 "training scan with the closest map (both scored against the model's "
                 "conditioning maps); pretrained_only: "
                 "samples of the public model before federation",
}

_DESCRIPTIONS = {
    "kid": "feature KID vs reference, lower is closer",
    "kid_std": "KID std over subsets",
    "conditional_dice": "public segmenter Dice vs conditioning map",
    "utility_dice": "reference Dice of a segmenter trained on the set",
    "ms_ssim_diversity": "mean pairwise 1 - MS-SSIM, 0 = collapsed",
    "intensity_dice": "network-free: nearest tissue-mean labelling vs map",
    "sharpness": "network-free: mean gradient magnitude in the brain",
    "rf_fid": "secondary: random-feature FID",
    "count": "volumes in the set",
}


def _shown(value: float | int | None) -> str:
    return "n/a" if value is None else (f"{value}" if isinstance(value, int) else f"{value:.4g}")


def format_table(result: EvaluationResult) -> str:
    """The model's metrics next to every baseline, one row per metric, then ratios and bars."""
    data = result.to_json_dict()
    columns = ["model", *BASELINES]
    sets = {"model": data["metrics"], **data["baselines"]}
    rows = [f"{'metric':<18} " + " ".join(f"{c:>15}" for c in columns) + "  meaning"]
    for name in (*SET_METRICS, "count"):
        values = [_shown((sets[c] or {}).get(name)) for c in columns]
        rows.append(f"{name:<18} " + " ".join(f"{v:>15}" for v in values)
                    + f"  {_DESCRIPTIONS[name]}")
    for name in ("conditional_dice_ratio", "utility_dice_ratio", "diversity_ratio",
                 "intensity_dice_ratio", "sharpness_ratio", "medicalnet_fid"):
        if data["metrics"].get(name) is not None:
            rows.append(f"{name:<22} {data['metrics'][name]:.4g}")
    rows += [f"bar {name}: {'met' if met else 'NOT met'}" for name, met in data["bars"].items()]
    real = data["real"]
    rows.append(f"reference: {real['reference_scans']} scans of {real['reference_patients']} "
                f"held-out patients; real baseline: {real['real_baseline_scans']} scans of "
                f"{real['real_baseline_patients']}; synthetic: {data['synthetic']['scans']} scans; "
                f"public segmenter validation Dice "
                f"{data['public_segmenter']['validation_dice']:.3f}")
    return "\n".join(rows)
