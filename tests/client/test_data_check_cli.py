"""``fedsynth data check``: the summary a site's IT team reads, and the exit codes 0 / 1 / 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from experiments.cli import main

REPO = Path(__file__).resolve().parents[2]


def check(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_site_summary(site_dir, capsys):
    code, out, _ = check(capsys, site_dir)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["patients"].split() == ["patients", "3"]
    assert "4 (2 patients with 1 scan, 1 patient with 2 scans)" in lines["scans"]
    assert "16x16x16 (4)" in lines["shapes"]
    assert "12x12x12 (4)" in out
    assert "RAS (4)" in lines["orientations"]
    # The phantoms' voxel fractions, per declared class name.
    assert "background 73.6%, csf 11.6%, grey_matter 12.0%, white_matter 2.8%" in lines["labels"]
    assert "age 35..77, scanner {ge, siemens}, sex 0..1" in lines["attributes"]
    assert out.rstrip().endswith("no problems found: the site is ready to join")


def test_orientations_are_reported(site_dir, site_rows, write_nifti, write_manifest, make_phantom,
                                   capsys):
    image, label = make_phantom(3)
    lps = np.diag([-12.0, -12.0, 12.0, 1.0])
    write_nifti(site_dir / "images/s3.nii.gz", image, lps)
    write_nifti(site_dir / "labels/s3_label.nii.gz", label, lps)
    code, out, _ = check(capsys, site_dir)
    assert code == 0 and "RAS (3), LPS (1)" in out


def test_one_broken_file_is_named(site_dir, capsys):
    broken = site_dir / "images/s3.nii.gz"
    broken.write_bytes(broken.read_bytes()[:500])
    code, out, _ = check(capsys, site_dir)
    assert code == 1
    assert f"1 problem found:\n  {broken}: truncated gzip" in out
    assert "shapes          16x16x16 (3)" in out  # the other scans are still summarised


def test_every_problem_is_reported(site_dir, site_rows, write_manifest, write_nifti, make_phantom,
                                   capsys):
    (site_dir / "images/s0.nii.gz").write_text("not an image")
    write_nifti(site_dir / "labels/s2_label.nii.gz", make_phantom(2)[1] + 4)
    write_manifest(site_dir, site_rows + [site_rows[3]])
    code, out, _ = check(capsys, site_dir)
    assert code == 1
    problems = out.split("3 problems found:\n")[1].splitlines()
    assert len(problems) == 3
    assert "s0.nii.gz: not a readable NIfTI file" in problems[1]
    assert "repeats" in problems[0] and "outside the declared classes" in problems[2]


def test_config_sets_classes_and_attributes(site_dir, tmp_path, capsys):
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"shape": [16, 16, 16], "spacing": [12, 12, 12],
                 "label_names": ["background", "csf", "tissue"]},
        "model": {"conditioning": {"attributes": ["age", "scanner"]}}}))
    code, out, _ = check(capsys, site_dir, "--config", config)
    assert code == 1
    assert "labels " not in out  # no scan passed: every label map holds class 3
    assert "conditioning    age, scanner" in out
    assert out.count("attribute 'scanner' is") == 4  # every row, each on its own line
    assert out.count("[3] outside the declared classes 0..2 (background, csf, tissue)") == 4


def test_yaml_manifest_option(site_dir, site_rows, write_manifest, capsys):
    write_manifest(site_dir, site_rows, "scans.yaml")
    (site_dir / "manifest.csv").unlink()
    code, out, _ = check(capsys, site_dir, "--manifest", "scans.yaml")
    assert code == 0 and "(scans.yaml)" in out


def test_missing_site_dir_exits_2(tmp_path, capsys):
    code, out, err = check(capsys, tmp_path / "nowhere")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"fedsynth data: error: {tmp_path / 'nowhere'}: site folder not found")


def test_missing_manifest_exits_2(site_dir, capsys):
    code, out, err = check(capsys, site_dir, "--manifest", "scans.csv")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"fedsynth data: error: {site_dir / 'scans.csv'}: manifest not found")


def test_bad_config_exits_2(site_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  spacing: [0, 1, 1]\n")
    code, out, err = check(capsys, site_dir, "--config", config)
    assert code == 2 and "data.spacing" in err and err.count("\n") == 1


def test_console_script(site_dir):
    """The installed ``fedsynth`` script (or ``python -m experiments.cli`` before install)."""
    script = shutil.which("fedsynth", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "experiments.cli"]
    broken = site_dir / "images/s1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16,) * 3, np.float32), np.eye(4)), broken)
    run = subprocess.run([*command, "data", "check", str(site_dir)], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "patients        3" in run.stdout and "RAS (3)" in run.stdout
    assert f"1 problem found:\n  {broken}: the image is all zeros" in run.stdout


def test_two_spellings_of_one_patient_are_one_problem_line(site_dir, site_rows, write_manifest,
                                                          capsys):
    site_rows[3]["patient_id"] = "P1"          # p1 and P1: one person, two "patients"
    write_manifest(site_dir, site_rows)
    code, out, _ = check(capsys, site_dir)
    assert code == 1
    [line] = [line for line in out.splitlines() if "same patient" in line]
    assert "line 5" in line and "'P1'" in line and "line 4" in line and "'p1'" in line
    assert "patients        2" in out
