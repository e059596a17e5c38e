"""Site data: manifest reading, refusal of every bad input (one line), preprocessing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from client.site_data import (ScanRecord, SiteDataError, SiteDataset, check_site, load_site,
                              read_manifest)
from configs import DataConfig


def refused(site: Path, data: DataConfig, *fragments: str, **kwargs) -> str:
    """Assert ``load_site`` refuses with one line holding every fragment."""
    with pytest.raises(SiteDataError) as info:
        load_site(site, data, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- manifest -------------------------------------------------------------------------------

def test_read_manifest_resolves_paths_and_keeps_attributes(site_dir):
    records = read_manifest(site_dir)
    assert [r.patient_id for r in records] == ["p0", "p0", "p1", "p2"]
    assert records[2].image == (site_dir / "images/s2.nii.gz").resolve()
    assert records[2].label.is_absolute() and records[2].label.is_file()
    assert records[2].attributes == {"age": "35", "sex": "1", "scanner": "siemens"}


def test_yaml_manifest_reads_like_csv(site_dir, site_rows, write_manifest):
    for row in site_rows:  # YAML numbers, not text
        row["age"], row["sex"] = int(row["age"]), int(row["sex"])
    write_manifest(site_dir, site_rows, "manifest.yaml")
    assert read_manifest(site_dir, "manifest.yaml") == read_manifest(site_dir)


def test_missing_manifest(site_dir, data_config):
    (site_dir / "manifest.csv").unlink()
    refused(site_dir, data_config, "manifest.csv", "manifest not found", "patient_id, image, label")


@pytest.mark.parametrize("name, text", [("manifest.csv", ""),
                                        ("manifest.csv", "patient_id,image,label\n"),
                                        ("manifest.yaml", "[]\n")])
def test_empty_manifest(site_dir, data_config, name, text):
    (site_dir / name).write_text(text)
    refused(site_dir, data_config, name, "has no rows", "one row per scan", manifest=name)


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.yaml"])
def test_manifest_missing_column(site_dir, site_rows, data_config, write_manifest, name):
    rows = [{k: v for k, v in row.items() if k != "label"} for row in site_rows]
    write_manifest(site_dir, rows, name)
    refused(site_dir, data_config, name, "missing column 'label'", "patient_id, image, label",
            manifest=name)


def test_manifest_not_a_list(site_dir, data_config):
    (site_dir / "manifest.yaml").write_text("patient_id: p0\n")
    refused(site_dir, data_config, "manifest.yaml", "list of mappings", manifest="manifest.yaml")


def test_unsupported_manifest_type(site_dir, data_config):
    (site_dir / "manifest.txt").write_text("p0 images/s0.nii.gz\n")
    refused(site_dir, data_config, "manifest.txt", "unsupported manifest type", ".csv, .yaml",
            manifest="manifest.txt")


def test_empty_patient_id(site_dir, site_rows, data_config, write_manifest):
    site_rows[2]["patient_id"] = ""
    write_manifest(site_dir, site_rows)
    refused(site_dir, data_config, "manifest.csv line 4", "empty patient_id")


def test_same_image_twice(site_dir, site_rows, data_config, write_manifest):
    write_manifest(site_dir, site_rows + [{**site_rows[0], "age": "99"}])
    refused(site_dir, data_config, "manifest.csv line 6", "images/s0.nii.gz",
            "already listed at", "line 2", "list each scan once")


def test_exact_duplicate_row(site_dir, site_rows, data_config, write_manifest):
    write_manifest(site_dir, site_rows + [site_rows[1]])
    refused(site_dir, data_config, "manifest.csv line 6", "repeats", "line 3 exactly",
            "remove the duplicate")


# --- scan files -----------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shifted_affine(site: Path, mm: float) -> np.ndarray:
    """The affine of scan s2's image, translated by ``mm`` along every axis."""
    affine = nib.load(site / "images/s2.nii.gz").affine.copy()
    affine[:3, 3] += mm
    return affine


BAD_FILES = {
    # name: (damage(site, write_nifti, phantom), file named, problem)
    "missing file": (lambda s, w, p: (s / "images/s2.nii.gz").unlink(),
                     "images/s2.nii.gz", "image file not found"),
    "not NIfTI": (lambda s, w, p: (s / "labels/s2_label.nii.gz").write_text("label,values\n"),
                  "labels/s2_label.nii.gz", "not a readable NIfTI file"),
    "truncated gzip": (lambda s, w, p: _truncate(s / "images/s2.nii.gz"),
                       "images/s2.nii.gz", "truncated gzip"),
    "truncated gzip header": (lambda s, w, p: (s / "images/s2.nii.gz").write_bytes(
        (s / "images/s2.nii.gz").read_bytes()[:60]), "images/s2.nii.gz", "truncated gzip"),
    "4D volume": (lambda s, w, p: w(s / "images/s2.nii.gz", np.stack([p(2)[0]] * 2, -1)),
                  "images/s2.nii.gz", "4D volume of shape (16, 16, 16, 2)"),
    "2D volume": (lambda s, w, p: w(s / "labels/s2_label.nii.gz", p(2)[1][:, :, 8]),
                  "labels/s2_label.nii.gz", "2D volume"),
    "shape mismatch": (lambda s, w, p: w(s / "labels/s2_label.nii.gz", p(2)[1][:, :, :12]),
                       "labels/s2_label.nii.gz", "shape (16, 16, 12) disagrees with its image"),
    "affine mismatch": (lambda s, w, p: w(s / "labels/s2_label.nii.gz", p(2)[1],
                                          _shifted_affine(s, 0.5)),
                        "labels/s2_label.nii.gz", "affine disagrees with its image s2.nii.gz"),
    "label outside classes": (lambda s, w, p: w(s / "labels/s2_label.nii.gz",
                                                np.where(p(2)[1] == 3, 5, p(2)[1])),
                              "labels/s2_label.nii.gz", "[5] outside the declared classes 0..3"),
    "non-integer label": (lambda s, w, p: w(s / "labels/s2_label.nii.gz",
                                            p(2)[1].astype(np.float32) * 0.5),
                          "labels/s2_label.nii.gz", "non-integer label value(s) [0.5"),
    "NaN": (lambda s, w, p: w(s / "images/s2.nii.gz",
                              np.where(p(2)[1] == 3, np.nan, p(2)[0]).astype(np.float32)),
            "images/s2.nii.gz", "NaN or Inf"),
    "Inf": (lambda s, w, p: w(s / "images/s2.nii.gz",
                              np.where(p(2)[1] == 3, np.inf, p(2)[0]).astype(np.float32)),
            "images/s2.nii.gz", "NaN or Inf"),
    "all zero": (lambda s, w, p: w(s / "images/s2.nii.gz", np.zeros((16,) * 3, np.float32)),
                 "images/s2.nii.gz", "all zeros"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused(site_dir, data_config, write_nifti, make_phantom, case):
    damage, name, problem = BAD_FILES[case]
    damage(site_dir, write_nifti, make_phantom)
    message = refused(site_dir, data_config, str(site_dir / name), problem)
    assert "; " in message  # and says how to fix it


def test_truncated_uncompressed_nifti(site_dir, site_rows, data_config, write_nifti,
                                      write_manifest, make_phantom):
    path = write_nifti(site_dir / "images/s2.nii", make_phantom(2)[0])
    _truncate(path)
    site_rows[2]["image"] = "images/s2.nii"
    write_manifest(site_dir, site_rows)
    refused(site_dir, data_config, str(path), "damaged or truncated image file")


def test_other_image_format_is_refused(site_dir, site_rows, data_config, write_manifest,
                                       make_phantom):
    path = site_dir / "images/s2.mgz"
    nib.save(nib.MGHImage(make_phantom(2)[0], np.eye(4)), path)
    site_rows[2]["image"] = "images/s2.mgz"
    write_manifest(site_dir, site_rows)
    refused(site_dir, data_config, str(path), "is a MGHImage, not NIfTI")


def test_affine_within_tolerance_is_accepted(site_dir, data_config, write_nifti, make_phantom):
    write_nifti(site_dir / "labels/s2_label.nii.gz", make_phantom(2)[1],
                _shifted_affine(site_dir, 1e-5))  # float rounding from another tool
    assert len(load_site(site_dir, data_config)) == 4


def test_requested_attribute_missing(site_dir, site_rows, data_config, write_manifest):
    site_rows[1]["age"] = ""
    write_manifest(site_dir, site_rows)
    refused(site_dir, data_config, "manifest.csv line 3", "attribute 'age'", "missing",
            attributes=["sex", "age"])
    refused(site_dir, data_config, "manifest.csv line 2", "attribute 'weight'", "missing",
            attributes=["weight"])


def test_requested_attribute_not_numeric(site_dir, data_config):
    refused(site_dir, data_config, "manifest.csv line 2", "attribute 'scanner' is 'ge'",
            "not a finite number", attributes=["scanner"])


# --- loading and preprocessing --------------------------------------------------------------

def test_load_site_items(site_dir, data_config, make_phantom):
    dataset = load_site(site_dir, data_config, attributes=["age", "sex"])
    assert isinstance(dataset, SiteDataset) and len(dataset) == 4
    assert dataset.patients == {"p0": [0, 1], "p1": [2], "p2": [3]}
    assert dataset.num_patients == 3 and dataset.attribute_names == ("age", "sex")
    assert all(isinstance(r, ScanRecord) for r in dataset.records)
    item = dataset[2]
    assert item["patient_id"] == "p1"
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (4, 16, 16, 16) and item["label"].dtype == torch.float32
    assert torch.equal(item["label"].sum(0), torch.ones(16, 16, 16))
    assert item["image"].min() == 0 and item["image"].max() == 1
    assert torch.equal(item["attributes"], torch.tensor([35.0, 1.0]))
    assert item["affine"].dtype == torch.float64
    # Already on the configured grid: the data and the affine come through unchanged.
    assert np.array_equal(item["label"].argmax(0).numpy(), make_phantom(2)[1])
    stored = nib.load(site_dir / "images/s2.nii.gz").affine
    assert np.allclose(item["affine"].numpy(), stored)


def test_items_without_attributes_and_batching(site_dir, data_config):
    dataset = load_site(site_dir, data_config)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["attributes"].shape == (4, 0)
    assert batch["image"].shape == (4, 1, 16, 16, 16) and type(batch["image"]) is torch.Tensor
    assert batch["affine"].shape == (4, 4, 4)


def test_volumes_are_cached_in_memory(site_dir, data_config):
    dataset = load_site(site_dir, data_config)
    first = dataset[3]["image"].clone()
    for path in (site_dir / "images").iterdir():
        path.unlink()
    assert torch.equal(dataset[3]["image"], first)


def test_robust_intensity_normalisation(site_dir, data_config, write_nifti, make_phantom):
    image, label = make_phantom(2)
    image[0, 0, 0] = 1e6  # one hot pixel must not squash the whole range
    write_nifti(site_dir / "images/s2.nii.gz", image)
    item = load_site(site_dir, data_config)[2]
    assert item["image"].max() == 1 and item["image"].min() == 0
    assert item["image"][0][torch.from_numpy(label == 3)].mean() > 0.8


def test_lps_volume_reoriented_to_ras(site_dir, site_rows, data_config, write_nifti,
                                      write_manifest, make_phantom):
    image, label = make_phantom(2)
    ras = nib.load(site_dir / "images/s2.nii.gz").affine
    # Same voxels in the world, stored with the first two axes flipped (LPS).
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = 15
    lps = ras @ flip
    assert "".join(nib.aff2axcodes(lps)) == "LPS"
    write_nifti(site_dir / "images/lps.nii.gz", image[::-1, ::-1].copy(), lps)
    write_nifti(site_dir / "labels/lps_label.nii.gz", label[::-1, ::-1].copy(), lps)
    write_manifest(site_dir, site_rows + [{**site_rows[2], "image": "images/lps.nii.gz",
                                           "label": "labels/lps_label.nii.gz"}])
    dataset = load_site(site_dir, data_config)
    stored_ras, stored_lps = dataset[2], dataset[4]
    for key in ("image", "label", "affine"):
        assert torch.allclose(stored_lps[key], stored_ras[key]), key


def test_resampled_to_configured_spacing(tmp_path, data_config, write_nifti, write_manifest,
                                         make_phantom):
    image, label = make_phantom(0, size=24)  # 24 x 8 mm: the same 192 mm field of view
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = -8.0 * 23 / 2
    write_nifti(tmp_path / "img.nii.gz", image, affine)
    write_nifti(tmp_path / "lab.nii.gz", label, affine)
    write_manifest(tmp_path, [{"patient_id": "a", "image": "img.nii.gz", "label": "lab.nii.gz"}])
    item = load_site(tmp_path, data_config)[0]
    assert item["image"].shape == (1, 16, 16, 16)
    assert np.allclose(item["affine"].diagonal()[:3].numpy(), 12.0)
    assert torch.equal(item["label"].sum(0), torch.ones(16, 16, 16))
    resampled = item["label"].mean((1, 2, 3)).numpy()
    original = np.bincount(label.ravel(), minlength=4) / label.size
    assert np.abs(resampled - original).max() < 0.03


def test_padded_and_cropped_to_configured_shape(site_dir, make_phantom):
    data = DataConfig(shape=(20, 20, 12), spacing=(12.0, 12.0, 12.0))
    item = load_site(site_dir, data)[2]
    assert item["image"].shape == (1, 20, 20, 12) and item["label"].shape == (4, 20, 20, 12)
    label = make_phantom(2)[1]
    # Symmetric: 2 voxels of background padding on the first two axes, 2 cropped off the third.
    assert np.array_equal(item["label"].argmax(0)[2:18, 2:18].numpy(), label[:, :, 2:14])
    assert item["label"][0, :2].eq(1).all() and item["image"][0, :2].eq(0).all()
    stored = nib.load(site_dir / "images/s2.nii.gz").affine
    world = item["affine"].numpy() @ np.array([2, 2, 0, 1])
    assert np.allclose(world, stored @ np.array([0, 0, 2, 1]))  # the affine follows the voxels


def test_check_site_reports_every_problem(site_dir, site_rows, data_config, write_manifest):
    _truncate(site_dir / "images/s1.nii.gz")
    (site_dir / "labels/s3_label.nii.gz").unlink()
    write_manifest(site_dir, site_rows + [site_rows[0]])
    report = check_site(site_dir, data_config, attributes=["scanner"])
    assert len(report.records) == 4
    assert [r.patient_id for r, _ in report.scans] == ["p0", "p1"]
    assert report.scans[0][1].orientation == "RAS" and report.scans[0][1].shape == (16, 16, 16)
    assert report.scans[0][1].spacing == (12.0, 12.0, 12.0)
    assert report.scans[0][1].label_counts.sum() == 16 ** 3
    problems = "\n".join(report.problems)
    assert len(report.problems) == 4 + 3, problems  # 4 rows x scanner, duplicate, 2 files
    assert "line 6: repeats line 2" in problems.replace(str(site_dir / "manifest.csv") + " ", "")
    assert "s1.nii.gz: truncated gzip" in problems
    assert "s3_label.nii.gz: label file not found" in problems


# --- patient identity -----------------------------------------------------------------------

def test_patient_ids_compare_without_case_and_spaces():
    from client.manifest import patient_key

    assert patient_key("P1") == patient_key("p1") == patient_key(" P 1 ") == patient_key("ｐ１")
    assert patient_key("P1") != patient_key("P11")


@pytest.mark.parametrize("spelling", ["P0", "p0 ", "p 0"])
def test_two_spellings_of_one_patient_are_refused_naming_both_rows(
        site_dir, site_rows, data_config, write_manifest, spelling):
    site_rows[1]["patient_id"] = spelling      # p0's second scan, spelt differently
    write_manifest(site_dir, site_rows)
    message = refused(site_dir, data_config, "manifest.csv line 3", repr(spelling),
                      "manifest.csv line 2", "'p0'", "same patient")
    assert message.count("line") == 2


def test_a_patient_spelt_one_way_is_one_group(site_dir, site_rows, data_config, write_manifest):
    for row in site_rows:
        row["patient_id"] = row["patient_id"].upper()
    write_manifest(site_dir, site_rows)
    dataset = load_site(site_dir, data_config)
    assert dataset.num_patients == 3 and dataset.patients == {"p0": [0, 1], "p1": [2], "p2": [3]}
