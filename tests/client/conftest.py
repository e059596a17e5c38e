"""A small valid site written as real NIfTI files: 3 patients, 4 scans of 16^3 at 12 mm."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import yaml

from configs import DataConfig

SIZE, SPACING = 16, 12.0
SITE_ROWS = [  # patient p0 has two scans
    {"patient_id": "p0", "image": "images/s0.nii.gz", "label": "labels/s0_label.nii.gz",
     "age": "61", "sex": "0", "scanner": "ge"},
    {"patient_id": "p0", "image": "images/s1.nii.gz", "label": "labels/s1_label.nii.gz",
     "age": "62", "sex": "0", "scanner": "ge"},
    {"patient_id": "p1", "image": "images/s2.nii.gz", "label": "labels/s2_label.nii.gz",
     "age": "35", "sex": "1", "scanner": "siemens"},
    {"patient_id": "p2", "image": "images/s3.nii.gz", "label": "labels/s3_label.nii.gz",
     "age": "77", "sex": "1", "scanner": "ge"},
]


def ras_affine(spacing: float = SPACING, size: int = SIZE) -> np.ndarray:
    """Isotropic RAS affine, centred on the origin. float64 (4, 4)."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2
    return affine


def phantom(seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom: image float32 (size^3) and label uint8 (size^3) in {0, 1, 2, 3}.

    Off-centre shells (csf, grey, white matter) so that flips of the grid are visible.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    centre = np.array([0.15, -0.1, 0.05]) + rng.uniform(-0.05, 0.05, 3)
    radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    label = np.digitize(-radius, [-0.85, -0.7, -0.4]).astype(np.uint8)  # 0 out .. 3 in
    means = np.array([0.0, 300.0, 600.0, 900.0], np.float32)
    image = means[label] + rng.normal(0, 20, label.shape).astype(np.float32) * (label > 0)
    return image.astype(np.float32), label


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, ras_affine() if affine is None else affine), path)
    return path


def save_manifest(site: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    path = site / name
    if name.endswith((".yaml", ".yml")):
        path.write_text(yaml.safe_dump(rows, sort_keys=False))
    else:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, array, affine=None)``: save a NIfTI (RAS 12 mm by default)."""
    return save_nifti


@pytest.fixture
def write_manifest() -> Callable[..., Path]:
    """``write_manifest(site, rows, name="manifest.csv")``: CSV or YAML by extension."""
    return save_manifest


@pytest.fixture
def site_rows() -> list[dict]:
    """The valid site's manifest rows (a fresh copy to edit)."""
    return [dict(row) for row in SITE_ROWS]


@pytest.fixture
def make_phantom() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return phantom


@pytest.fixture
def site_dir(tmp_path: Path, site_rows: list[dict]) -> Path:
    """A valid site folder: 3 patients, 4 scans, 16^3 RAS volumes at 12 mm, manifest.csv."""
    site = tmp_path / "site"
    for seed, row in enumerate(site_rows):
        image, label = phantom(seed)
        save_nifti(site / row["image"], image)
        save_nifti(site / row["label"], label)
    save_manifest(site, site_rows)
    return site


@pytest.fixture
def data_config() -> DataConfig:
    """The site's grid: 16^3 at 12 mm, four classes."""
    return DataConfig(shape=(SIZE,) * 3, spacing=(SPACING,) * 3)
