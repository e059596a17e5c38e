"""NIfTI in and out: generated volumes and their label maps, with the affine kept.

Writing uses nibabel directly: MONAI's NibabelWriter runs its data through SpatialResample even
with ``resample=False`` and fails on axis-permuted affines (e.g. a sagittal acquisition), while the
array is already on the grid its affine describes. Files are written to a temporary name and
renamed into place, so a failed write leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np


class VolumeError(ValueError):
    """A volume that cannot be used. One line: ``<file>: <problem>; <fix>``."""


def write_volume(path: Path | str, array: np.ndarray, affine: np.ndarray,
                 dtype: type | np.dtype = np.float32) -> Path:
    """Write ``array`` (D, H, W) with ``affine`` (4, 4) to a ``.nii`` or ``.nii.gz`` file."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_volume expects a (D, H, W) array (got shape {array.shape})")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        affine = np.asarray(affine, dtype=np.float64)
        image = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
        image.set_qform(affine, code=1)  # scanner coordinates, in both header forms
        image.set_sform(affine, code=1)
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_label_map(path: Path | str, shape: Sequence[int],
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map as integer classes (D, H, W) in RAS orientation, and its RAS affine (4, 4).

    Reoriented with nibabel's ``as_closest_canonical`` (a permutation/flip of axes, no resampling),
    because the model was trained on RAS volumes. Raises :class:`VolumeError` when the file is
    missing or unreadable, the grid is not ``shape``, or a value is not a class in [0, num_classes).
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: label map not found; check the path in the mask folder "
                          f"or manifest")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        values = np.asarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel and gzip raise many types for a bad file
        raise VolumeError(f"{path}: unreadable NIfTI ({type(err).__name__}); "
                          f"replace the file") from None
    if values.ndim == 4 and values.shape[-1] == 1:
        values = values[..., 0]
    expected = tuple(int(s) for s in shape)
    if values.shape != expected:
        raise VolumeError(f"{path}: label map grid {list(values.shape)} does not match the model's "
                          f"{list(expected)}; preprocess the maps to the checkpoint's data shape")
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise VolumeError(f"{path}: label map holds non-integer values; give integer class labels")
    labels = values.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise VolumeError(f"{path}: label values span [{low}, {high}] but the model knows "
                          f"{num_classes} classes [0, {num_classes - 1}]; relabel the map")
    return labels, image.affine.astype(np.float64)
