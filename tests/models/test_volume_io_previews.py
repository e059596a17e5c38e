"""NIfTI writing/reading with the affine kept, and PNG previews."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.previews import mid_slices, save_preview
from models.volume_io import VolumeError, read_label_map, write_volume


def test_written_volume_keeps_values_dtype_and_affine(tmp_path: Path) -> None:
    affine = np.array([[0, 0, 3.0, -20], [-2.0, 0, 0, 10], [0, 2.5, 0, 4], [0, 0, 0, 1]])
    values = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    path = write_volume(tmp_path / "out" / "image.nii.gz", values, affine)
    image = nib.load(str(path))
    assert np.array_equal(image.get_fdata(dtype=np.float32), values)
    assert np.allclose(image.affine, affine)
    labels = (values * 4).astype(np.uint8)
    label = nib.load(str(write_volume(tmp_path / "label.nii.gz", labels, affine, dtype=np.uint8)))
    assert label.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(label.dataobj), labels)
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label.nii.gz", "out"]


def test_label_map_is_read_in_ras_and_checked(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 1, 2] = 3
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(labels, lps), str(tmp_path / "lps.nii.gz"))
    ras_labels, ras_affine = read_label_map(tmp_path / "lps.nii.gz", (4, 4, 4), 4)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    # The same physical voxel holds the label in both orientations.
    (i, j, k), = np.argwhere(ras_labels == 3)
    assert np.allclose(ras_affine @ [i, j, k, 1], lps @ [0, 1, 2, 1])
    with pytest.raises(VolumeError, match="does not match"):
        read_label_map(tmp_path / "lps.nii.gz", (8, 8, 8), 4)
    with pytest.raises(VolumeError, match=r"span \[0, 3\]"):
        read_label_map(tmp_path / "lps.nii.gz", (4, 4, 4), 3)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(VolumeError, match="unreadable"):
        read_label_map(tmp_path / "broken.nii.gz", (4, 4, 4), 4)


def test_preview_is_a_png_with_three_planes(tmp_path: Path) -> None:
    volume = np.zeros((8, 10, 12))
    volume[4, 5, 6] = 1
    assert [s.shape for s in mid_slices(volume)] == [(12, 10), (12, 8), (10, 8)]
    assert all(s.max() == 1 for s in mid_slices(volume))
    path = save_preview(tmp_path / "p.png", [volume, volume], [volume.astype(int), None],
                        ["a", "b"], num_classes=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    height, width = imread(str(path)).shape[:2]
    assert width > height  # two rows of six panels
