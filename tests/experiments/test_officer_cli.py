"""The privacy officer's commands: ``budget plan``, ``audit verify`` and ``report``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from experiments import cli
from privacy.budget import SiteBudget
from privacy.calibration import SchedulePlan, calibrate

HASH = "0" * 64


def write_site(folder: Path, patients: dict[str, int]) -> Path:
    """A manifest with ``patients[pid]`` scans per patient (files need not exist for planning)."""
    folder.mkdir(parents=True)
    lines = ["patient_id,image,label"]
    for pid, scans in patients.items():
        lines += [f"{pid},images/{pid}_{i}.nii.gz,labels/{pid}_{i}_label.nii.gz"
                  for i in range(scans)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_site(tmp_path / "site_a", {f"a{i}": 1 + i % 2 for i in range(20)})  # 30 scans
    write_site(tmp_path / "site_b", {f"b{i}": 1 for i in range(25)})
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "federation": {"rounds": 3, "local_epochs": 1, "sites": [
            {"site_id": "site_a", "data_dir": "site_a"},
            {"site_id": "site_b", "data_dir": "site_b",
             "budget": {"target_epsilon": 2.0, "delta": 1.0e-3}}]},
        "privacy": {"target_epsilon": 6.0, "delta": 1.0e-3, "expected_batch_size": 5,
                    "accountant": "rdp"}}))
    return path


def _site_block(out: str, site: str) -> str:
    return out.split(f"site {site}:")[1].split("\nsite ")[0]


def test_budget_plan_prints_each_sites_sigma_and_rounds(config: Path, capsys):
    # site_a's patients come from --patients, site_b's from its manifest (25 distinct patient_id).
    assert cli.main(["budget", "plan", "--config", str(config), "--patients", "site_a=50"]) == 0
    out = capsys.readouterr().out
    site_a = _site_block(out, "site_a")
    plan = calibrate(target_epsilon=6.0, delta=1e-3, num_patients=50, expected_batch_size=5,
                     rounds=3, local_epochs=1)
    assert "N=50 patients, q=0.1" in site_a and f"sigma={plan.noise_multiplier:.4f}" in site_a
    rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)$", site_a, flags=re.M)
    assert [int(r) for r, _ in rows] == [1, 2, 3]
    assert [float(e) for _, e in rows] == [round(e, 4) for e in plan.epsilon_curve()]
    assert f"total  {plan.epsilon_curve()[-1]:.4f} of 6" in site_a
    site_b = _site_block(out, "site_b")
    assert "N=25 patients" in site_b and "budget epsilon 2 at delta 0.001" in site_b


def test_manifest_patients_are_distinct_patient_ids(config: Path):
    from configs import load_config
    from experiments.commands.budget import _count_patients

    sites = load_config(config, check_paths=False).federation.sites
    assert [_count_patients(site) for site in sites] == [20, 25]  # site_a: 20 patients, 30 scans


def test_budget_plan_refuses_delta_not_below_one_over_n(config: Path, capsys):
    code = cli.main(["budget", "plan", "--config", str(config), "--patients", "site_a=1000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "site site_a: delta=0.001 must be below 1/N = 1/1000" in err


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    plan = SchedulePlan(target_epsilon=3.0, delta=1e-3, accountant="rdp", noise_multiplier=1.3,
                        sample_rate=0.2, num_patients=20, expected_batch_size=4, local_epochs=1,
                        steps_per_round=5, planned_rounds=3)
    budget = SiteBudget.open(tmp_path / "site" / "ledger.jsonl", plan, max_grad_norm=1.0)
    for number in (1, 2, 3):
        budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)
    return budget.path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_audit_verify_intact(ledger: Path, capsys):
    assert cli.main(["audit", "verify", "--ledger", str(ledger)]) == 0
    assert "intact, 4 entries (1 plan, 3 round)" in capsys.readouterr().out


def _edit(path):
    lines = _lines(path)
    lines[2] = re.sub(rb'"steps":(\d+)', lambda m: b'"steps":' + str(int(m[1]) + 1).encode(),
                      lines[2])
    _rewrite(path, lines)


def _delete(path):
    lines = _lines(path)
    _rewrite(path, lines[:2] + lines[3:])


def _reorder(path):
    lines = _lines(path)
    _rewrite(path, [lines[0], lines[2], lines[1], lines[3]])


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _drop_last(path):
    _rewrite(path, _lines(path)[:-1])


@pytest.mark.parametrize("tamper, where", [
    (_edit, "line 3 (seq 3): its content does not match its hash"),
    (_delete, "line 3 (seq 4): seq is 4 where 3 was expected"),
    (_reorder, "line 2 (seq 3)"),
    (_truncate, "line 4: cut short"),
    (_drop_last, "line 4 (seq 4): missing"),
])
def test_audit_verify_names_the_first_bad_entry(ledger: Path, capsys, tamper, where):
    tamper(ledger)
    assert cli.main(["audit", "verify", "--ledger", str(ledger)]) == 1
    assert where in capsys.readouterr().out


def test_audit_verify_missing_file_is_bad_input(tmp_path: Path, capsys):
    assert cli.main(["audit", "verify", "--ledger", str(tmp_path / "none.jsonl")]) == 2
    assert "no such ledger" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["md", "json", "html"])
def test_report_writes_each_format_with_its_plot(ledger: Path, tmp_path: Path, capsys, fmt):
    out = tmp_path / f"report.{fmt}"
    assert cli.main(["report", "--ledger", str(ledger), "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text()
    plot = tmp_path / "report.epsilon.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    if fmt == "json":
        data = json.loads(text)
        assert len(data["rows"]) == 3 and data["all_agree"] and data["accountant"] == "rdp"
        assert data["remaining"] == pytest.approx(data["cap"] - data["spent"])
    elif fmt == "md":
        assert "## What it does not cover" in text and "report.epsilon.png" in text
    else:
        assert text.startswith("<!DOCTYPE html>") and "base64," in text


def test_report_to_stdout_and_refusal_of_a_broken_ledger(ledger: Path, capsys):
    assert cli.main(["report", "--ledger", str(ledger)]) == 0
    assert "# Privacy report" in capsys.readouterr().out
    _edit(ledger)
    assert cli.main(["report", "--ledger", str(ledger)]) == 1
    assert "hash chain is broken at line 3" in capsys.readouterr().err
