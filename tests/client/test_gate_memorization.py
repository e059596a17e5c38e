"""The site's memorization audit (client.memorization, ``fedsynth audit memorization``)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from client.memorization import MemorizationAuditError, audit_memorization, read_synthetic
from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     SiteConfig, UNetConfig, config_to_dict)
from experiments.cli import main
from experiments.cohort import generate_cohort
from models.autoencoder import build_autoencoder
from models.checkpoint import DataGrid, save_checkpoint
from models.latent_unet import build_latent_unet

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memorization")
    generate_cohort(root / "cohort", sites=1, patients=6, size=SIZE, seed=21, public_patients=6)
    model = ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(), diffusion=DiffusionConfig(train_timesteps=20))
    grid = DataGrid((SIZE,) * 3, (192 / SIZE,) * 3,
                    ("background", "csf", "grey_matter", "white_matter"))
    torch.manual_seed(0)
    checkpoint = root / "checkpoint.pt"
    save_checkpoint(checkpoint, autoencoder=build_autoencoder(model.autoencoder),
                    denoiser=build_latent_unet(model, 4, 0), model_config=config_to_dict(model),
                    data=grid, latent_scale_factor=1.0)
    return {"root": root, "cohort": root / "cohort", "checkpoint": checkpoint}


def fake_release(source: Path, out: Path, count: int, roll: bool = False) -> Path:
    """A release-like folder whose images are the first ``count`` scans of a site-format folder."""
    import nibabel as nib
    import numpy as np

    rows = list(csv.DictReader((source / "manifest.csv").open()))[:count]
    (out / "images").mkdir(parents=True)
    for row in rows:
        image = nib.load(str(source / row["image"]))
        data = np.asarray(image.dataobj, dtype=np.float32)
        data = (data - data.min()) / (np.percentile(data, 99.5) - data.min())  # site-like scale
        if roll:
            data = np.roll(data, 1, axis=0)
        nib.save(nib.Nifti1Image(np.clip(data, 0, 1), image.affine), str(out / row["image"]))
    with (out / "manifest.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["patient_id", "image"])
        writer.writeheader()
        writer.writerows({"patient_id": f"synth_{i:04d}", "image": row["image"]}
                         for i, row in enumerate(rows))
    return out


def test_copies_of_the_site_are_flagged_and_new_patients_are_not(world, tmp_path) -> None:
    from models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(world["checkpoint"])
    site = SiteConfig(site_id="site_0", data_dir=world["cohort"] / "site_0")
    copies_dir = fake_release(site.data_dir, tmp_path / "copies", 5, roll=True)
    copies = audit_memorization(site, copies_dir, checkpoint, distance="nrmse")
    assert copies.problem and len(copies.near_copies) == 5
    assert copies.fraction_below_heldout_p5 == 1.0 and copies.mann_whitney_p < 0.01
    assert max(copies.synthetic) < 0.05 < min(copies.heldout)
    fresh_dir = fake_release(world["cohort"] / "public", tmp_path / "fresh", 6)
    fresh = audit_memorization(site, fresh_dir, checkpoint, distance="nrmse")
    assert not fresh.problem and not fresh.near_copies and fresh.fraction_below_heldout_p5 < 0.5
    assert fresh.num_scans == copies.num_scans and len(fresh.heldout) == fresh.num_scans


def test_cli_writes_the_audit_and_exits_1_on_memorised_samples(world, tmp_path, capsys) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site_id": "site_0",
                                         "data_dir": str(world["cohort"] / "site_0")}))
    synthetic = fake_release(world["cohort"] / "site_0", tmp_path / "copies", 4)
    code = main(["audit", "memorization", "--synthetic", str(synthetic),
                 "--checkpoint", str(world["checkpoint"]), "--site-config", str(site_yaml),
                 "--out", str(tmp_path / "audit"), "--distance", "latent"])
    printed = capsys.readouterr().out
    assert code == 1 and "PROBLEM" in printed
    summary = json.loads((tmp_path / "audit" / "memorization_audit.json").read_text())
    assert summary["problem"] and summary["distance"] == "latent" and len(summary["synthetic"]) == 4
    assert (tmp_path / "audit" / "memorization_audit.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_synthetic_folders_are_one_line_errors(world, tmp_path, capsys) -> None:
    with pytest.raises(MemorizationAuditError, match="manifest.csv: not found"):
        read_synthetic(tmp_path, (SIZE,) * 3)
    odd = fake_release(world["cohort"] / "site_0", tmp_path / "odd", 2)
    with pytest.raises(MemorizationAuditError, match="differs from the model's"):
        read_synthetic(odd, (8, 8, 8))
    shutil.rmtree(odd / "images")
    code = main(["audit", "memorization", "--synthetic", str(odd),
                 "--checkpoint", str(world["checkpoint"]),
                 "--config", str(tmp_path / "missing.yaml"),
                 "--site", "x", "--out", str(tmp_path / "a")])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
