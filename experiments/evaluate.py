"""Quality of a synthetic dataset against real scans: the glue behind ``fedsynth evaluate``.

Both folders are site-format folders (``manifest.csv`` with ``patient_id,image,label``
plus NIfTI files), read through :func:`client.site_data.load_site`, so real and
synthetic volumes get exactly the same preprocessing (RAS, spacing, pad/crop, intensity
to [0, 1]). The grid is the config's ``data.shape``/``data.spacing`` when a config is
given; otherwise it is the grid of the first real scan, and every synthetic scan must
already be on that grid.

The real scans are split by patient (seeded) into a segmenter-train part and a held-out
part; no patient is in both. rf_fid, MMD and MedicalNet FID compare all real scans with
all synthetic scans; the segmenters are scored on the held-out part only. The metrics
themselves live in :mod:`models.metrics`.

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
from typing import Any

import nibabel as nib
import numpy as np
import torch

from client.site_data import load_site, read_manifest
from configs.schema import DataConfig
from models.device import autocast, resolve_device
from models.metrics import (RANDOM_FEATURE_SEED, QualityReport, build_medicalnet_feature_net,
                            build_random_feature_net, evaluate_quality, feature_net_fingerprint,
                            ms_ssim_settings)

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.3
DEFAULT_SEG_STEPS = 300
DEFAULT_SEG_BATCH_SIZE = 2
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
        return {"metrics": self.report.to_json_dict(), **self.details}


def _ras_grid(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and voxel size of a NIfTI file in RAS axis order, from its header only."""
    image = nib.load(path)
    axes = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for source, target in enumerate(axes[:3]):
        shape[target] = int(image.shape[source])
        spacing[target] = float(image.header.get_zooms()[source])
    return tuple(shape), tuple(spacing)


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


def evaluate_folders(real_dir: Path, synthetic_dir: Path, data: DataConfig | None = None, *,
                     seg_steps: int = DEFAULT_SEG_STEPS, seed: int = 0,
                     medicalnet_weights: Path | None = None,
                     holdout_fraction: float = HOLDOUT_FRACTION,
                     seg_batch_size: int = DEFAULT_SEG_BATCH_SIZE,
                     device: str | None = None, precision: str = "fp32") -> EvaluationResult:
    """All quality metrics of the synthetic folder against the real folder.

    ``data`` None: built-in label names, the real folder's own grid (see the module
    docstring). Raises :class:`EvaluationError`, ``SiteDataError`` or
    ``MetricInputError`` (all one line) on bad input, before any long computation.
    """
    real_dir, synthetic_dir = Path(real_dir), Path(synthetic_dir)
    if seg_steps < 1:
        raise EvaluationError(f"--seg-steps: must be >= 1 (got {seg_steps}); "
                              f"give the segmenters a training budget")
    device = str(resolve_device(device))  # None / auto: CUDA when present
    manifest = (data or DataConfig()).manifest
    _check_folder(real_dir, "real", manifest)
    _check_folder(synthetic_dir, "synthetic", manifest)
    # Build MedicalNet first: a bad weights file should stop us before minutes of work.
    medicalnet = build_medicalnet_feature_net(medicalnet_weights) if medicalnet_weights else None
    if data is None:
        data = data_config_from_folder(real_dir, DataConfig())
        check_synthetic_grid(synthetic_dir, data, real_dir)

    real = load_volume_set(real_dir, data)
    synthetic = load_volume_set(synthetic_dir, data)
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise EvaluationError(f"{synthetic_dir}: synthetic volumes "
                              f"{tuple(synthetic.images.shape[2:])} differ from real "
                              f"{tuple(real.images.shape[2:])} after loading; "
                              f"pass --config with one data.shape for both")
    for role, volumes in (("real", real), ("synthetic", synthetic)):
        if len(volumes.patient_ids) < 2:
            raise EvaluationError(f"{volumes.folder}: {len(volumes.patient_ids)} {role} scan(s); "
                                  f"the metrics need at least 2 per folder; add scans")
    train_idx, heldout_idx = split_by_patient(real.patient_ids, holdout_fraction, seed)
    if not bool((real.labels[heldout_idx] > 0).any()):
        raise EvaluationError(f"{real_dir}: the held-out real label maps hold no foreground; "
                              f"the segmentation utility needs labelled structures")

    with autocast(device, precision):  # bf16 only when asked (the config's precision)
        report = evaluate_quality(
            real.images, synthetic.images, synthetic.labels,
            real.images[train_idx], real.labels[train_idx],
            real.images[heldout_idx], real.labels[heldout_idx],
            data.num_classes, seg_steps=seg_steps, seed=seed, feature_seed=RANDOM_FEATURE_SEED,
            medicalnet=medicalnet, seg_batch_size=seg_batch_size, device=device)

    ms_ssim = ms_ssim_settings(tuple(synthetic.images.shape[2:]))
    heldout_patients = {real.patient_ids[i] for i in heldout_idx}
    details = {
        "real": {"folder": str(real_dir), "scans": len(real.patient_ids),
                 "patients": real.num_patients,
                 "segmenter_train_patients": real.num_patients - len(heldout_patients),
                 "segmenter_train_scans": len(train_idx),
                 "heldout_patients": len(heldout_patients), "heldout_scans": len(heldout_idx)},
        "synthetic": {"folder": str(synthetic_dir), "scans": len(synthetic.patient_ids)},
        "grid": {"shape": list(data.shape), "spacing_mm": list(data.spacing),
                 "label_names": list(data.label_names)},
        "settings": {
            "seed": seed, "seg_steps": seg_steps, "seg_batch_size": seg_batch_size,
            "holdout_fraction": holdout_fraction, "device": device,
            "torch_version": torch.__version__,
            "rf_fid_feature_seed": RANDOM_FEATURE_SEED,
            "rf_fid_feature_net_sha256": feature_net_fingerprint(
                build_random_feature_net(RANDOM_FEATURE_SEED)),
            "ms_ssim": {"scales": ms_ssim.scales, "kernel_size": ms_ssim.kernel_size,
                        "kernel_sigma": ms_ssim.kernel_sigma, "weights": list(ms_ssim.weights)},
            "medicalnet_weights": str(medicalnet_weights) if medicalnet_weights else None,
        },
        "notes": {
            "rf_fid": "random-feature FID: Frechet distance on features of a seeded, randomly "
                      "initialised 3D ResNet; NOT comparable with Inception FID, only with "
                      "rf_fid from the same feature net (sha256 above) and grid",
            "mmd": "MONAI unbiased linear-kernel MMD^2 per voxel on the volumes; ~0 when the "
                   "distributions match, may be slightly negative",
        },
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


_DESCRIPTIONS = {
    "rf_fid": "random-feature FID, lower is closer (not Inception FID)",
    "mmd": "MMD^2 per voxel on volumes, ~0 when matched",
    "ms_ssim_diversity": "mean pairwise 1 - MS-SSIM of synthetic, 0 = collapsed",
    "dice_synthetic": "held-out real Dice, segmenter trained on synthetic",
    "dice_real": "held-out real Dice, segmenter trained on real",
    "dice_ratio": "dice_synthetic / dice_real, 1 = as useful as real",
    "medicalnet_fid": "FID on MedicalNet features (--medicalnet-weights)",
}


def format_table(result: EvaluationResult) -> str:
    """The metrics as an aligned text table, one row per metric."""
    rows = [f"{'metric':<18} {'value':>12}  meaning"]
    for name, value in result.report.to_json_dict().items():
        shown = "n/a" if value is None else f"{value:.6g}"
        rows.append(f"{name:<18} {shown:>12}  {_DESCRIPTIONS[name]}")
    real, synthetic = result.details["real"], result.details["synthetic"]
    rows.append(f"real: {real['scans']} scans of {real['patients']} patients "
                f"({real['heldout_patients']} held out); synthetic: {synthetic['scans']} scans")
    return "\n".join(rows)
