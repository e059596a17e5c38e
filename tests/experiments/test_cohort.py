"""The demo cohort: layout, validity, determinism, disjointness, site looks, CLI behaviour."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments import cohort
from experiments.cli import main

SMALL = dict(sites=2, patients=4, size=16, public_patients=3)
SMALL_ARGS = ["--sites", "2", "--patients", "4", "--size", "16", "--public-patients", "3"]
FOLDERS = ("public", "site_0", "site_1")


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _volumes(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every NIfTI under root, by relative path: (data, affine)."""
    out = {}
    for path in sorted(root.rglob("*.nii.gz")):
        img = nib.load(path)
        out[str(path.relative_to(root))] = (np.asarray(img.dataobj), img.affine)
    return out


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """Seed 0 twice (the template rebuilt in between) and seed 1 once."""
    base = tmp_path_factory.mktemp("cohorts")
    paths = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        if name == "b":
            cohort.template_grid.cache_clear()
        summary = cohort.generate_cohort(base / name, seed=seed, **SMALL)
        assert not summary.reused
        paths[name] = summary.out
    return paths


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(cohorts):
    a, b, c = cohorts["a"], cohorts["b"], cohorts["c"]
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    vol_a, vol_c = _volumes(a), _volumes(c)
    shared = set(vol_a) & set(vol_c)
    assert shared, "the same scan ids should exist for another seed"
    for rel in shared:
        np.testing.assert_array_equal(vol_a[rel][1], vol_c[rel][1])   # same grid
    images = [rel for rel in shared if rel.endswith(".nii.gz") and "/images/" in rel]
    assert all(not np.array_equal(vol_a[rel][0], vol_c[rel][0]) for rel in images)
    assert [r["age"] for r in _rows(a / "site_0")] != [r["age"] for r in _rows(c / "site_0")]


def test_every_manifest_row_is_a_valid_scan(cohorts):
    root = cohorts["a"]
    summary = json.loads((root / "cohort.json").read_text())
    assert summary["arguments"] == {**SMALL, "seed": 0}
    assert set(summary["counts"]) == set(FOLDERS)
    labels_seen: set[int] = set()
    for name in FOLDERS:
        folder = root / name
        with (folder / "manifest.csv").open(newline="") as handle:
            assert next(csv.reader(handle)) == list(cohort.MANIFEST_COLUMNS)
        rows = _rows(folder)
        assert summary["counts"][name] == {
            "patients": len({r["patient_id"] for r in rows}), "scans": len(rows)}
        assert len({r["image"] for r in rows}) == len(rows)          # scan ids unique
        listed = {r["image"] for r in rows} | {r["label"] for r in rows}
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*.nii.gz")}
        assert listed == on_disk
        for row in rows:
            assert 20 <= float(row["age"]) <= 95 and row["sex"] in ("0", "1")
            image, label = nib.load(folder / row["image"]), nib.load(folder / row["label"])
            for img in (image, label):
                assert img.shape == (16, 16, 16)
                assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
                np.testing.assert_allclose(img.header.get_zooms(), (12.0, 12.0, 12.0))
                np.testing.assert_allclose(img.affine, image.affine)
            assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
            data = np.asarray(label.dataobj)
            assert set(np.unique(data)) <= {0, 1, 2, 3}
            labels_seen |= set(np.unique(data).tolist())
            pixels = np.asarray(image.dataobj)
            assert np.isfinite(pixels).all() and pixels.min() >= 0
            assert pixels[data == 3].mean() > pixels[data == 0].mean()   # brain brighter than air
    assert labels_seen == {0, 1, 2, 3}


def test_follow_up_scans_share_the_patient_and_are_older(cohorts):
    follow_ups = 0
    for name in FOLDERS:
        by_patient: dict[str, list[dict[str, str]]] = {}
        for row in _rows(cohorts["a"] / name):
            by_patient.setdefault(row["patient_id"], []).append(row)
        for rows in by_patient.values():
            assert len(rows) in (1, 2)
            if len(rows) == 2:
                follow_ups += 1
                baseline, later = rows
                assert float(later["age"]) > float(baseline["age"])
                assert later["sex"] == baseline["sex"] and later["image"] != baseline["image"]
    assert follow_ups >= 1


def test_follow_up_keeps_the_deformation_and_adds_atrophy():
    grid = cohort.template_grid(16)
    subject = next(s for s in cohort.draw_subjects(3, 1, "s0", 40) if len(s.visits) == 2)
    look = cohort.draw_looks(3, 1)["site_0"]
    (image_1, label_1), (image_2, label_2) = (cohort.render_scan(grid, subject, v, look)
                                              for v in subject.visits)
    head_1, head_2 = label_1 > 0, label_2 > 0
    assert (head_1 == head_2).mean() > 0.99                      # same deformation
    assert (label_2 == 1).sum() >= (label_1 == 1).sum()          # more CSF when older
    assert not np.array_equal(image_1, image_2)


def test_follow_up_fraction_is_about_a_fifth():
    subjects = cohort.draw_subjects(0, 1, "s0", 1000)
    fraction = np.mean([len(s.visits) == 2 for s in subjects])
    assert 0.15 < fraction < 0.25
    ages = [s.visits[0].age for s in subjects]
    assert 20 <= min(ages) and max(ages) <= 90
    assert {s.sex for s in subjects} == {0, 1}


def test_public_and_site_subjects_are_disjoint(cohorts):
    root = cohorts["a"]
    ids = {name: {r["patient_id"] for r in _rows(root / name)} for name in FOLDERS}
    assert all(i.startswith("pub-") for i in ids["public"])
    assert not ids["public"] & (ids["site_0"] | ids["site_1"])
    assert not ids["site_0"] & ids["site_1"]
    public = [np.asarray(nib.load(root / "public" / r["label"]).dataobj)
              for r in _rows(root / "public")]
    for name in ("site_0", "site_1"):
        for row in _rows(root / name):
            label = np.asarray(nib.load(root / name / row["label"]).dataobj)
            assert not any(np.array_equal(label, p) for p in public)


def test_holdout_holds_new_patients_of_every_site_with_the_site_look(cohorts, tmp_path):
    root = cohorts["a"]
    out = cohort.generate_holdout(root, tmp_path / "reference", patients_per_site=2)
    pooled = _rows(out)
    for k, name in enumerate(("site_0", "site_1")):
        trained = {r["patient_id"] for r in _rows(root / name)}
        held = [r for r in pooled if r["image"].startswith(f"{name}/")]
        assert {r["patient_id"] for r in held} == {f"s{k}-0005", f"s{k}-0006"}
        assert not trained & {r["patient_id"] for r in held}
        # Same scanner look as the site: the same generator drew these patients' intensities.
        site_mean = np.mean([np.asarray(nib.load(root / name / r["image"]).dataobj).mean()
                             for r in _rows(root / name)])
        held_mean = np.mean([np.asarray(nib.load(out / r["image"]).dataobj).mean() for r in held])
        assert abs(held_mean - site_mean) < 0.2 * site_mean
    before = (out / "manifest.csv").stat().st_mtime_ns
    assert cohort.generate_holdout(root, out, patients_per_site=2) == out    # reused
    assert (out / "manifest.csv").stat().st_mtime_ns == before
    with pytest.raises(cohort.CohortError, match="no demo cohort"):
        cohort.generate_holdout(tmp_path / "nothing", tmp_path / "r2", patients_per_site=1)


def test_subject_draws_do_not_depend_on_cohort_size():
    few, many = cohort.draw_subjects(5, 2, "s1", 3), cohort.draw_subjects(5, 2, "s1", 30)
    assert few == many[:3]


def test_site_looks_differ(cohorts):
    root = cohorts["a"]
    contrasts = {}
    for name in FOLDERS:
        pixels = {k: [] for k in range(4)}
        for row in _rows(root / name):
            image = np.asarray(nib.load(root / name / row["image"]).dataobj)
            label = np.asarray(nib.load(root / name / row["label"]).dataobj)
            for k in range(4):
                pixels[k].append(image[label == k])
        means = [np.concatenate(pixels[k]).mean() for k in range(4)]
        # Relative to white matter, so the gain alone does not count as a different look.
        contrasts[name] = np.array([means[1] / means[3], means[2] / means[3]])
    for i, first in enumerate(FOLDERS):
        for second in FOLDERS[i + 1:]:
            assert np.abs(contrasts[first] - contrasts[second]).max() > 0.01, (first, second)


@pytest.mark.parametrize("seed", range(5))
def test_look_gammas_are_stratified(seed):
    looks = cohort.draw_looks(seed, 4)
    gammas = sorted(look.gamma for look in looks.values())
    low, high = cohort.GAMMA_RANGE
    assert low <= gammas[0] and gammas[-1] <= high
    assert min(np.diff(gammas)) > 0.3 * (high - low) / len(looks)


def test_age_turns_parenchyma_into_csf():
    grid = cohort.template_grid(16)
    young, old = cohort.aged_fractions(grid, 20.0), cohort.aged_fractions(grid, 90.0)
    for fractions in (young, old):
        np.testing.assert_allclose(fractions.sum(0), 1.0, atol=1e-5)
        assert fractions.min() >= 0
    np.testing.assert_allclose(young, grid.fractions, atol=1e-6)
    np.testing.assert_array_equal(old[0], young[0])              # the head does not shrink
    assert old[1].sum() > 1.2 * young[1].sum()
    assert old[2:].sum() < young[2:].sum()


def test_sex_one_heads_are_larger_on_average():
    grid = cohort.template_grid(16)
    look = cohort.draw_looks(0, 1)["public"]
    sizes = {0: [], 1: []}
    for subject in cohort.draw_subjects(0, 0, "pub", 6):
        for sex in (0, 1):
            _, label = cohort.render_scan(grid, dataclasses.replace(subject, sex=sex),
                                          subject.visits[0], look)
            sizes[sex].append((label > 0).sum())
    assert np.mean(sizes[1]) > 1.05 * np.mean(sizes[0])


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_cli_writes_reuses_refuses_and_forces(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["cohort", "--out", str(out), *SMALL_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "public" in printed and "site_1" in printed and "16x16x16 at 12 mm" in printed
    written = (out / "cohort.json").stat().st_mtime_ns

    assert main(["cohort", "--out", str(out), *SMALL_ARGS]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert (out / "cohort.json").stat().st_mtime_ns == written

    assert main(["cohort", "--out", str(out), *SMALL_ARGS, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and "seed=0 (now 1)" in err
    assert json.loads((out / "cohort.json").read_text())["arguments"]["seed"] == 0

    assert main(["cohort", "--out", str(out), *SMALL_ARGS, "--seed", "1", "--force"]) == 0
    assert json.loads((out / "cohort.json").read_text())["arguments"]["seed"] == 1
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("extra, complaint", [
    (["--size", "20"], "--size 20"), (["--size", "8"], "--size 8"),
    (["--sites", "0"], "--sites 0"), (["--patients", "1"], "--patients 1"),
    (["--public-patients", "1"], "--public-patients 1"), (["--seed", "-1"], "--seed -1")])
def test_cli_refuses_bad_numbers_in_one_line(tmp_path, capsys, extra, complaint):
    out = tmp_path / "demo"
    assert main(["cohort", "--out", str(out), *SMALL_ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and complaint in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_cli_refuses_a_folder_that_is_not_a_cohort(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert main(["cohort", "--out", str(out), *SMALL_ARGS, *force]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a fedsynth cohort" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["cohort", "--out", str(a_file), *SMALL_ARGS]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_rejects_non_numbers_through_argparse():
    with pytest.raises(SystemExit) as exit_info:
        main(["cohort", "--out", "x", "--size", "big"])
    assert exit_info.value.code == 2


def test_empty_out_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    summary = cohort.generate_cohort(out, seed=0, **SMALL)
    assert (out / "cohort.json").is_file() and not summary.reused


def test_interrupted_run_leaves_nothing_and_keeps_the_old_cohort(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    cohort.generate_cohort(out, seed=0, **SMALL)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real_render = cohort.render_scan

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(cohort, "render_scan", failing_render)
    with pytest.raises(KeyboardInterrupt):
        cohort.generate_cohort(out, seed=1, force=True, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        cohort.generate_cohort(tmp_path / "fresh", seed=0, **SMALL)
    assert not (tmp_path / "fresh").exists()
    assert _leftovers(tmp_path) == []
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_labels_are_the_largest_deformed_fraction_as_the_image_is_deformed():
    import torch
    from monai.transforms import Rand3DElasticd

    grid = cohort.template_grid(16)
    subject = cohort.draw_subjects(4, 1, "s0", 1)[0]
    visit = subject.visits[0]
    _, label = cohort.render_scan(grid, subject, visit, cohort.draw_looks(4, 1)["site_0"])
    fractions = cohort.aged_fractions(grid, visit.age).astype(np.float32)
    moved = cohort._deformation(subject, grid.spacing_mm)(
        {"image": torch.zeros((1,) + fractions.shape[1:]),
         "fractions": torch.from_numpy(fractions)})["fractions"].numpy()
    assert np.array_equal(label, moved.argmax(0))
    # Format 1 moved the argmax map by nearest neighbour: a different label on this subject.
    elastic = cohort._deformation(subject, grid.spacing_mm)
    nearest = Rand3DElasticd(keys=("label",), mode="nearest", padding_mode="zeros", prob=1.0,
                             sigma_range=elastic.rand_3d_elastic.sigma_range,
                             magnitude_range=elastic.rand_3d_elastic.magnitude_range,
                             rotate_range=elastic.rand_3d_elastic.rand_affine_grid.rotate_range,
                             scale_range=elastic.rand_3d_elastic.rand_affine_grid.scale_range,
                             translate_range=elastic.rand_3d_elastic.rand_affine_grid
                             .translate_range).set_random_state(seed=subject.deformation_seed)
    old = nearest({"label": torch.from_numpy(fractions.argmax(0).astype(np.float32))[None]})
    assert not np.array_equal(label, np.rint(np.asarray(old["label"])[0]).astype(np.uint8))
