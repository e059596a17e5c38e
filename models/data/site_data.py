"""A site's scans: validation with nibabel, preprocessing with MONAI, grouped by patient.

``load_site`` refuses the first bad input with one :class:`SiteDataError` line;
``check_site`` checks every file and collects all problems (``fedsynth data check``).
Preprocessed volumes are cached in memory: sites are small, and every DP-SGD epoch
reads them all.
"""

from __future__ import annotations

import gzip
import logging
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (AsDiscreted, Compose, LoadImaged, Orientationd,
                              ResizeWithPadOrCropd, ScaleIntensityRangePercentilesd, Spacingd)
from tqdm.auto import tqdm

from configs.schema import DataConfig
from models.data.manifest import (ScanRecord, SiteDataError, attribute_matrix, inspect_attributes,
                                  inspect_manifest, read_manifest)

__all__ = ["SiteDataError", "ScanRecord", "ScanInfo", "SiteReport", "SiteDataset",
           "read_manifest", "check_scan", "check_site", "load_site"]

log = logging.getLogger(__name__)

# Image and label grids agree when their affines differ by less than this (mm).
AFFINE_TOLERANCE_MM = 1e-3
_KEYS = ("image", "label")


@dataclass(frozen=True)
class ScanInfo:
    """What a valid scan looks like on disk (before preprocessing)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]       # mm, from the NIfTI header
    orientation: str                          # axis codes of the affine, e.g. "RAS", "LPS"
    label_counts: np.ndarray                  # int64 (C,): voxels per declared class


@dataclass
class SiteReport:
    """Everything ``check_site`` found: the usable rows, the scans that passed, the problems."""

    manifest: Path
    records: list[ScanRecord]
    scans: list[tuple[ScanRecord, ScanInfo]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _is_truncated_gzip(path: Path) -> bool:
    with path.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            return False
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return True
    return False


def _read_nifti(path: Path, role: str, as_float: bool) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load one 3D NIfTI volume fully; any unreadable file becomes one SiteDataError line."""
    fix = f"re-export the {role} as a 3D NIfTI file (.nii or .nii.gz)"
    if not path.is_file():
        raise SiteDataError(f"{path}: {role} file not found; fix the path in the manifest "
                            f"(relative to the site folder) or add the file")
    nifti = (nib.Nifti1Image, nib.Nifti2Image)
    try:
        img = nib.load(path)
        if isinstance(img, nifti):
            array = img.get_fdata(dtype=np.float32) if as_float else np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged files
        if _is_truncated_gzip(path):
            raise SiteDataError(f"{path}: truncated gzip (the {role} file ends early, e.g. an "
                                f"interrupted copy); copy or export it again") from None
        if isinstance(err, (EOFError, OSError)):
            raise SiteDataError(f"{path}: damaged or truncated {role} file (its voxels cannot "
                                f"all be read); copy or export it again") from None
        raise SiteDataError(f"{path}: not a readable NIfTI file; {fix}") from None
    if not isinstance(img, nifti):
        raise SiteDataError(f"{path}: {role} is a {type(img).__name__}, not NIfTI; {fix}")
    if array.ndim != 3:
        raise SiteDataError(f"{path}: {role} is a {array.ndim}D volume of shape {array.shape}; "
                            f"fedsynth needs one 3D volume per file (split 4D series, "
                            f"stack 2D slices into a volume)")
    return img, array


def check_scan(record: ScanRecord, label_names: Sequence[str]) -> ScanInfo:
    """Validate one scan's image and label files; :class:`SiteDataError` on the first problem."""
    image, image_data = _read_nifti(record.image, "image", as_float=True)
    label, label_data = _read_nifti(record.label, "label", as_float=False)
    if not np.isfinite(image_data).all():
        bad = int((~np.isfinite(image_data)).sum())
        raise SiteDataError(f"{record.image}: {bad} NaN or Inf voxel(s); replace them "
                            f"(e.g. with 0) when exporting the image")
    if not image_data.any():
        raise SiteDataError(f"{record.image}: the image is all zeros; export the scan again "
                            f"or drop its row from the manifest")
    if image_data.shape != label_data.shape:
        raise SiteDataError(f"{record.label}: label shape {label_data.shape} disagrees with its "
                            f"image {record.image.name} {image_data.shape}; resample the label "
                            f"onto the image grid")
    if not np.allclose(image.affine, label.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        axes = ["".join(nib.aff2axcodes(a)) for a in (label.affine, image.affine)]
        raise SiteDataError(f"{record.label}: label affine disagrees with its image "
                            f"{record.image.name} (orientation {axes[0]} vs {axes[1]}, max "
                            f"difference {np.abs(image.affine - label.affine).max():.3g} mm); "
                            f"save the label with the image's affine")
    classes = np.unique(label_data)
    declared = f"0..{len(label_names) - 1} ({', '.join(label_names)})"
    whole = np.isfinite(classes) & (classes == np.round(classes))
    if not whole.all():
        raise SiteDataError(f"{record.label}: non-integer label value(s) "
                            f"{classes[~whole][:5].tolist()}; save the label map as integer "
                            f"class indices {declared}")
    outside = classes[(classes < 0) | (classes >= len(label_names))]
    if outside.size:
        raise SiteDataError(f"{record.label}: label value(s) {outside.astype(int)[:5].tolist()} "
                            f"outside the declared classes {declared}; fix the label map or "
                            f"declare the class in data.label_names")
    counts = np.bincount(label_data.astype(np.int64).ravel(), minlength=len(label_names))
    return ScanInfo(shape=tuple(int(s) for s in image_data.shape),
                    spacing=tuple(float(z) for z in image.header.get_zooms()[:3]),
                    orientation="".join(nib.aff2axcodes(image.affine)),
                    label_counts=counts)


def check_site(site_dir: Path, data: DataConfig, manifest: str = "manifest.csv",
               attributes: Sequence[str] = ()) -> SiteReport:
    """Check the manifest and EVERY scan, collecting all problems (one line each).

    Raises :class:`SiteDataError` only when the manifest cannot be read at all.
    """
    records, problems = inspect_manifest(Path(site_dir), manifest,
                                         allow_outside=data.allow_outside_paths)
    problems += inspect_attributes(records, attributes)[1]
    report = SiteReport(Path(site_dir).resolve() / manifest, records, problems=problems)
    for record in tqdm(records, desc="checking scans", unit="scan", disable=None):
        try:
            report.scans.append((record, check_scan(record, data.label_names)))
        except SiteDataError as err:
            report.problems.append(str(err))
    return report


def _preprocessing(data: DataConfig) -> Compose:
    """NIfTI paths -> RAS, ``data.spacing``, ``data.shape``; image in [0, 1], label one-hot."""
    low, high = data.intensity_percentiles
    return Compose([
        LoadImaged(_KEYS, reader="NibabelReader", image_only=True, ensure_channel_first=True),
        # Percentiles of the scan as stored, before padding adds background voxels.
        ScaleIntensityRangePercentilesd("image", low, high, b_min=0.0, b_max=1.0, clip=True),
        # labels=None: take the axis labels from the MetaTensor's space (RAS for NIfTI).
        Orientationd(_KEYS, axcodes="RAS", labels=None),
        Spacingd(_KEYS, pixdim=data.spacing, mode=("bilinear", "nearest")),
        ResizeWithPadOrCropd(_KEYS, spatial_size=data.shape),
        AsDiscreted("label", to_onehot=data.num_classes),
    ])


class SiteDataset(torch.utils.data.Dataset):
    """A site's preprocessed scans, cached in memory, grouped by patient.

    Build it with :func:`load_site`, which validates the files first. Item ``i`` is a dict:
    ``image`` float32 (1, D, H, W) in [0, 1]; ``label`` float32 (C, D, H, W) one-hot;
    ``patient_id`` str; ``attributes`` float32 (A,) in ``attribute_names`` order;
    ``affine`` float64 (4, 4), the RAS affine of the preprocessed volume.
    """

    def __init__(self, records: Sequence[ScanRecord], data: DataConfig,
                 attributes: np.ndarray | torch.Tensor | None = None,
                 attribute_names: Sequence[str] = (), *, cached: bool = True):
        """``cached`` False reads and preprocesses each scan on access (a streamed cohort)."""
        self.records = list(records)
        self.data = data
        self.attribute_names = tuple(attribute_names)
        self._attributes = torch.as_tensor(
            np.zeros((len(self.records), 0), np.float32) if attributes is None else attributes,
            dtype=torch.float32)
        self.patients: dict[str, list[int]] = {}
        for i, record in enumerate(self.records):
            self.patients.setdefault(record.patient_key, []).append(i)
        files = [{"image": str(r.image), "label": str(r.label)} for r in self.records]
        # No random transforms follow, so cached items need no defensive copy.
        self._items = CacheDataset(files, _preprocessing(data), copy_cache=False,
                                   progress=sys.stderr.isatty()) if cached else \
            Dataset(files, _preprocessing(data))

    @property
    def attributes(self) -> torch.Tensor:
        """float32 (N, A): every scan's attributes in ``attribute_names`` order."""
        return self._attributes

    @property
    def num_patients(self) -> int:
        return len(self.patients)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = self._items[i]
        return {"image": item["image"].as_tensor(),
                "label": item["label"].as_tensor(),
                "patient_id": self.records[i].patient_id,
                "attributes": self._attributes[i],
                "affine": item["image"].affine.to(torch.float64)}


def load_site(site_dir: Path, data: DataConfig, manifest: str = "manifest.csv",
              attributes: Sequence[str] = ()) -> SiteDataset:
    """Validate a site's manifest and every scan, then preprocess and cache them.

    Raises :class:`SiteDataError` (one line) on the first bad input.
    """
    records = read_manifest(Path(site_dir), manifest, allow_outside=data.allow_outside_paths)
    values = attribute_matrix(records, attributes)
    for record in tqdm(records, desc="validating scans", unit="scan", disable=None):
        check_scan(record, data.label_names)
    dataset = SiteDataset(records, data, values, attributes)
    log.info("%s: %d scans of %d patients", site_dir, len(dataset), dataset.num_patients)
    return dataset
