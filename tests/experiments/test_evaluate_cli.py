"""``fedsynth evaluate`` on tiny NIfTI site folders written here with nibabel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments.cli import main
from experiments.evaluate import split_by_patient

SIZE = 16
SPACING = 12.0
SET_METRICS = {"kid", "kid_std", "conditional_dice", "utility_dice", "ms_ssim_diversity",
               "intensity_dice", "sharpness", "rf_fid", "count"}
METRICS = SET_METRICS | {"conditional_dice_ratio", "utility_dice_ratio", "diversity_ratio",
                         "intensity_dice_ratio", "sharpness_ratio", "medicalnet_fid"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ras_affine(spacing: float, size: int) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2  # centred on the origin, RAS
    return affine


def write_site(folder: Path, scans: list[str], seed: int, size: int = SIZE,
               spacing: float = SPACING) -> Path:
    """A site-format folder: manifest.csv, images/<scan>.nii.gz, labels/<scan>_label.nii.gz.

    ``scans`` are patient ids, one per scan (repeat an id for a follow-up scan). Each scan
    holds nested shells (labels 1..3, uint8) of random size with a noisy intensity per class.
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    axis = np.linspace(-1, 1, size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    radius = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    rows = ["patient_id,image,label"]
    for index, patient in enumerate(scans):
        scale = rng.uniform(0.75, 0.95)
        label = np.zeros((size, size, size), np.uint8)
        for cls, r in ((1, 0.95), (2, 0.7), (3, 0.4)):
            label[radius < r * scale] = cls
        image = (np.array([0.0, 300.0, 600.0, 900.0])[label]
                 + rng.normal(0, 40, label.shape)).astype(np.float32)
        name = f"{patient}_{index}"
        affine = ras_affine(spacing, size)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"{name}_label.nii.gz")
        rows.append(f"{patient},images/{name}.nii.gz,labels/{name}_label.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    real = write_site(root / "real", ["p0", "p0", "p1", "p2", "p3", "p4", "p5"], seed=0)
    synthetic = write_site(root / "synthetic", ["s0", "s1", "s2", "s3"], seed=1)
    write_site(root / "public", [f"q{i}" for i in range(6)], seed=5)
    return real, synthetic


def public_of(real: Path) -> list[str]:
    return ["--public", str(real.parent / "public")]


def test_evaluate_prints_a_table_and_writes_the_json_report(folders, tmp_path, capsys):
    real, synthetic = folders
    train = write_site(tmp_path / "train", ["t0", "t1", "t2"], seed=6)
    pretrained = write_site(tmp_path / "pretrained", ["u0", "u1", "u2"], seed=7)
    out = tmp_path / "reports" / "report.json"
    code = main(["evaluate", "--real", str(real), "--synthetic", str(synthetic),
                 *public_of(real), "--train", str(train), "--pretrained-samples",
                 str(pretrained), "--out", str(out), "--seg-steps", "4", "--seed", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in SET_METRICS | {"real", "collapse", "copy", "pretrained_only", "bar "}:
        assert name in printed
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert set(metrics) == METRICS
    assert metrics["medicalnet_fid"] is None
    assert all(math.isfinite(metrics[k]) for k in METRICS - {"medicalnet_fid"})
    baselines = report["baselines"]
    assert set(baselines) == {"real", "collapse", "copy", "pretrained_only"}
    assert all(set(b) == SET_METRICS for b in baselines.values())
    assert baselines["pretrained_only"]["count"] == 3
    assert baselines["collapse"]["count"] == baselines["copy"]["count"] == 4
    assert baselines["collapse"]["ms_ssim_diversity"] < 1e-6  # one training set: one mean scan
    assert metrics["utility_dice_ratio"] == pytest.approx(
        metrics["utility_dice"] / baselines["real"]["utility_dice"])
    assert set(report["bars"]) >= {"beats_collapse_kid", "utility_dice_at_least_0_9_real"}
    assert len(report["public_segmenter"]["sha256"]) == 64
    assert report["real"]["scans"] == 7 and report["real"]["patients"] == 6
    assert report["real"]["reference_patients"] == 3  # round(0.5 * 6)
    assert report["real"]["reference_scans"] + report["real"]["real_baseline_scans"] == 7
    assert report["synthetic"]["scans"] == 4 and report["training"]["scans"] == 3
    assert report["grid"]["shape"] == [SIZE] * 3 and report["grid"]["spacing_mm"] == [SPACING] * 3
    assert report["settings"]["seed"] == 1 and report["settings"]["seg_steps"] == 4
    assert report["settings"]["ms_ssim"]["scales"] == 3
    assert len(report["settings"]["rf_fid_feature_net_sha256"]) == 64
    assert "p0" not in out.read_text()  # no patient ids in the report
    assert not [p for p in out.parent.iterdir() if p.name != "report.json"]  # no temp files


def test_without_baseline_folders_the_real_half_stands_in_and_pretrained_is_null(folders,
                                                                                 tmp_path):
    real, synthetic = folders
    out = tmp_path / "plain.json"
    assert main(["evaluate", "--real", str(real), "--synthetic", str(synthetic),
                 *public_of(real), "--out", str(out), "--seg-steps", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["baselines"]["pretrained_only"] is None
    assert report["training"]["folders"] == ["(real baseline half)"]
    assert report["baselines"]["copy"]["kid"] is not None


def test_split_keeps_every_patient_on_one_side_and_is_seeded():
    patients = ["a", "a", "b", "c", "c", "c", "d", "e"]
    train, heldout = split_by_patient(patients, holdout_fraction=0.4, seed=3)
    assert sorted(train + heldout) == list(range(len(patients)))
    assert not {patients[i] for i in train} & {patients[i] for i in heldout}
    assert len({patients[i] for i in heldout}) == 2
    assert split_by_patient(patients, 0.4, seed=3) == (train, heldout)
    assert split_by_patient(["a", "b"], 0.9, seed=0)[0]  # one patient always left to train on


def bad_input(capsys, *args: str) -> str:
    code = main(["evaluate", *args, "--seg-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(folders, tmp_path, capsys):
    real, synthetic = folders
    no_public = bad_input(capsys, "--real", str(real), "--synthetic", str(synthetic))
    assert "pass --public DIR" in no_public

    missing = bad_input(capsys, "--real", str(tmp_path / "absent"), "--synthetic", str(synthetic),
                        *public_of(real))
    assert "real folder not found" in missing

    (tmp_path / "empty").mkdir()
    empty = bad_input(capsys, "--real", str(real), "--synthetic", str(tmp_path / "empty"),
                      *public_of(real))
    assert "synthetic folder is empty" in empty

    small = write_site(tmp_path / "small", ["s0", "s1"], seed=2, size=8, spacing=24.0)
    mismatch = bad_input(capsys, "--real", str(real), "--synthetic", str(small), *public_of(real))
    assert "synthetic grid 8x8x8" in mismatch and "16x16x16" in mismatch

    weights = bad_input(capsys, "--real", str(real), "--synthetic", str(synthetic),
                        *public_of(real), "--medicalnet-weights", str(tmp_path / "resnet_10.pth"))
    assert "MedicalNet weights file not found" in weights

    lonely = write_site(tmp_path / "lonely", ["only", "only"], seed=3)
    patients = bad_input(capsys, "--real", str(lonely), "--synthetic", str(synthetic),
                         *public_of(real))
    assert "at least 2" in patients


def test_a_config_resamples_both_folders_to_its_grid(folders, tmp_path, capsys):
    real, _ = folders
    coarse = write_site(tmp_path / "coarse", ["s0", "s1", "s2"], seed=4, size=8, spacing=24.0)
    config = tmp_path / "eval.yaml"
    config.write_text("seed: 2\ndata:\n  shape: [16, 16, 16]\n  spacing: [12.0, 12.0, 12.0]\n")
    out = tmp_path / "resampled.json"
    assert main(["evaluate", "--real", str(real), "--synthetic", str(coarse), *public_of(real),
                 "--config", str(config), "--out", str(out), "--seg-steps", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["seed"] == 2  # from the config
    assert report["synthetic"]["scans"] == 3


def test_medicalnet_weights_add_a_medicalnet_fid(folders, tmp_path):
    from monai.networks.nets import resnet10

    real, synthetic = folders
    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                   feed_forward=False)  # MONAI's MedicalNet layout for depth 10
    weights = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, weights)
    out = tmp_path / "medicalnet.json"
    assert main(["evaluate", "--real", str(real), "--synthetic", str(synthetic), *public_of(real),
                 "--out", str(out), "--seg-steps", "1", "--medicalnet-weights", str(weights)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["medicalnet_fid"] > 0
    assert report["settings"]["medicalnet_weights"] == str(weights)


def test_the_real_side_prepared_beforehand_is_read_back_not_trained_again(folders, tmp_path,
                                                                          monkeypatch):
    from configs.schema import DataConfig
    from experiments.evaluate import data_config_from_folder, evaluate_folders, prepare_real_side
    from models.metrics import SegmenterPool

    real, synthetic = folders
    public = real.parent / "public"
    data = data_config_from_folder(real, DataConfig())
    prepared = tmp_path / "prepared"
    prepare_real_side(real, data, public_dir=public, seed=1, seg_steps=4, cache_dir=prepared)
    assert len(list(prepared.glob("public_segmenter_*.pt"))) == 1
    assert len(list((prepared / "sets").glob("*.json"))) == 1  # the real baseline's figures

    trained: list[str] = []
    submit = SegmenterPool.submit

    def recording(self, *args):  # (images, labels, num_classes, seed, settings, description)
        trained.append(args[5])
        return submit(self, *args)

    monkeypatch.setattr(SegmenterPool, "submit", recording)
    kwargs = dict(public_dir=public, seed=1, seg_steps=4)
    after = evaluate_folders(real, synthetic, data, cache_dir=prepared, **kwargs)
    assert sorted(trained) == ["segmenter on collapse", "segmenter on copy",
                               "segmenter on synthetic"]
    trained.clear()
    fresh = evaluate_folders(real, synthetic, data, cache_dir=tmp_path / "fresh", **kwargs)
    assert "public segmenter" in trained and "segmenter on real" in trained
    # The same figures as an evaluation that trains everything itself.
    assert after.report.public_segmenter_sha256 == fresh.report.public_segmenter_sha256
    for name, value in after.report.baselines["real"].to_json_dict().items():
        assert value == pytest.approx(fresh.report.baselines["real"].to_json_dict()[name],
                                      rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("planned_as", ["the synthetic maps", "other maps"])
def test_baselines_on_planned_maps_are_read_back_only_for_exactly_those_maps(folders, tmp_path,
                                                                             monkeypatch,
                                                                             planned_as):
    from configs.schema import DataConfig
    from experiments.evaluate import (data_config_from_folder, evaluate_folders,
                                      load_volume_set, prepare_real_side)
    from models.metrics import SegmenterPool

    real, synthetic = folders
    public = real.parent / "public"
    data = data_config_from_folder(real, DataConfig())
    maps = load_volume_set(synthetic, data).labels
    if planned_as == "other maps":
        maps = maps.clone()  # one voxel off, as if a first attempt had been rejected
        maps[0, 0, 0, 0, 0] = (int(maps[0, 0, 0, 0, 0]) + 1) % data.num_classes
    public_labels = load_volume_set(public, data).labels

    def planned(labels: torch.Tensor) -> torch.Tensor:
        assert torch.equal(labels, public_labels)  # planned from the public maps
        return maps

    prepare_real_side(real, data, public_dir=public, seed=1, seg_steps=4, cache_dir=tmp_path,
                      planned_maps=planned)
    assert len(list((tmp_path / "sets").glob("*.json"))) == 3  # real, collapse, copy

    trained: list[str] = []
    submit = SegmenterPool.submit

    def recording(self, *args):  # (images, labels, num_classes, seed, settings, description)
        trained.append(args[5])
        return submit(self, *args)

    monkeypatch.setattr(SegmenterPool, "submit", recording)
    evaluate_folders(real, synthetic, data, cache_dir=tmp_path, public_dir=public, seed=1,
                     seg_steps=4)
    expected = ["segmenter on synthetic"] if planned_as == "the synthetic maps" else \
        ["segmenter on collapse", "segmenter on copy", "segmenter on synthetic"]
    assert sorted(trained) == expected
