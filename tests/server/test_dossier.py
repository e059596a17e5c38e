"""The privacy officer's dossier (server.dossier, ``fedsynth dossier``), rendered in a real
headless browser (Debian's chromium)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from client.membership_audit import MembershipAudit, attack_metrics, write_membership_audit
from client.memorization import MemorizationAudit, write_audit
from experiments.cli import main
from privacy.budget import SiteBudget
from privacy.calibration import calibrate
from privacy.canary_audit import AuditedMechanism, run_canary_audit, write_canary_audit
from privacy.ledger import Ledger
from privacy.protocol import ReplyStatus, TrainReply
from privacy.report import build_report
from server.consortium_ledger import ConsortiumLedger
from server.release_report import ReleaseReport, SiteSpendRow, caveats, write_release_report


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _site_and_consortium(root: Path) -> tuple[Path, Path]:
    """A site ledger with two DP rounds, and the consortium ledger that mirrored them."""
    site = root / "site_0" / ".fedsynth" / "ledger.jsonl"
    site.parent.mkdir(parents=True)
    budget = SiteBudget.open(site, calibrate(target_epsilon=4.0, delta=1e-5, num_patients=40,
                                             expected_batch_size=8, rounds=3, local_epochs=1),
                             max_grad_norm=1.0)
    consortium = ConsortiumLedger(root / "consortium_ledger.jsonl")
    consortium.record_start(config_sha256="c" * 64, checkpoint_sha256="d" * 64, planned_rounds=3,
                            sites=["site_0"])
    for round in (1, 2):
        record = budget.charge(round, model_hash_before=f"{round - 1:064d}",
                               model_hash_after=f"{round:064d}")
        entries = Ledger(site).entries()
        consortium.record_site(round, 7, TrainReply(
            status=ReplyStatus.OK, site_id="site_0", round=round,
            num_patients=record.num_patients, epsilon=record.epsilon,
            target_epsilon=record.target_epsilon, delta=record.delta,
            noise_multiplier=record.noise_multiplier, sample_rate=record.sample_rate,
            steps=record.steps, ledger_seq=entries[-1].seq, ledger_head=entries[-1].hash,
            weights_sha256="e" * 64))
    return site, consortium.path


def _release(root: Path, epsilon: float) -> Path:
    out = root / "release"
    report = ReleaseReport(
        generated="2026-01-01T00:00:00Z", out=str(out), checkpoint="final.pt",
        model_sha256="ab" * 32, distance="latent", max_shift=1,
        threshold={"policy": "calibrated", "percentile": 5.0},
        threshold_description="5th percentile of each site's between-patient distances",
        dp_gate={"enabled": False, "epsilon_per_query": 1.0, "mechanism": None},
        counts={"requested": 8, "released": 6, "candidates": 9, "rejections": 3,
                "exhausted": 2, "gate_rounds": 2, "failed_at_site_0": 3},
        sites=[SiteSpendRow("site_0", epsilon, 0.0, epsilon, 1e-5, 4.0, "site ledger")],
        caveats=caveats(False, 0.0, "calibrated"))
    write_release_report(out, report)
    return out


def _audits(root: Path) -> Path:
    folder = root / "audits"
    mechanism = AuditedMechanism(3.0, 40, 8, 1, 2, "rdp", 1e-5, 1.0)
    write_canary_audit(run_canary_audit(mechanism, folder / "canary", canaries=200, seed=0),
                       folder, "site_0")
    rng = np.random.default_rng(0)
    attacks = {"loss": attack_metrics(rng.normal(0.2, 1, 30), rng.normal(0, 1, 10),
                                      bootstrap=100)}
    write_membership_audit(MembershipAudit("site_0", "ab" * 32, 30, 10, 0.25, attacks), folder)
    heldout, synthetic = rng.gamma(4, 1, 60), rng.gamma(4, 1, 20)
    write_audit(MemorizationAudit(
        site_id="site_0", distance="latent", max_shift=1, model_sha256="ab" * 32,
        num_synthetic=20, num_scans=60, num_patients=30, synthetic=synthetic.tolist(),
        heldout=heldout.tolist(), synthetic_summary={}, heldout_summary={},
        heldout_p5=float(np.percentile(heldout, 5)),
        fraction_below_heldout_p5=float(np.mean(synthetic < np.percentile(heldout, 5))),
        near_copies=[], mann_whitney_p=0.4), folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dossier")
    site, consortium = _site_and_consortium(root)
    spent = build_report(site).spent
    return {"root": root, "site": site, "consortium": consortium, "spent": spent,
            "release": _release(root, spent), "audits": _audits(root)}


def _run(world: dict, out: Path, site: Path | None = None) -> int:
    return main(["dossier", "--release", str(world["release"]),
                 "--site-ledger", f"site_0={site or world['site']}",
                 "--consortium-ledger", str(world["consortium"]),
                 "--audits", str(world["audits"]), "--out", str(out)])


def test_dossier_holds_every_section_and_its_own_hash(world, tmp_path) -> None:
    out = tmp_path / "dossier.html"
    assert _run(world, out) == 0
    page = out.read_bytes()
    twin = json.loads(out.with_suffix(".json").read_text())
    digest = hashlib.sha256(page).hexdigest()
    assert twin["dossier_sha256"] == digest
    assert (tmp_path / "dossier.html.sha256").read_text() == f"{digest}  dossier.html\n"
    site = twin["sites"][0]
    assert site["epsilon"] == pytest.approx(world["spent"], rel=1e-12)
    assert site["reconcile"]["ok"] is True and site["chain_intact"] and site["recheck_agrees"]
    assert site["rounds"] == 2 and site["gate_charges"] == 0
    assert site["ledger_head"] == Ledger(world["site"]).entries()[-1].hash
    assert twin["hashes"]["model_sha256"] == "ab" * 32 and len(twin["hashes"]["code_sha256"]) == 64
    assert set(twin["audits"]) == {"canary_audit", "membership_audit", "memorization_audit"}
    assert "synthetic" not in twin["audits"]["memorization_audit"][0]  # raw distances stay out
    text = page.decode()
    # Self-contained: every image is embedded, nothing is fetched.
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert text.count('src="data:image/png;base64,') == 3   # epsilon, canary chart, histogram
    for needle in (f"{world['spent']:.4g}", "consistent", "Caveat", "PRIVATE scans"):
        assert needle in text


def test_a_rolled_back_site_ledger_is_flagged(world, tmp_path, capsys) -> None:
    restored = tmp_path / "restored.jsonl"
    ledger = Ledger(restored)
    for entry in Ledger(world["site"]).entries()[:2]:      # plan + round 1: round 2 erased
        ledger.append(entry.kind, entry.payload)
    out = tmp_path / "dossier.html"
    assert _run(world, out, restored) == 1
    assert "PROBLEM: site_0" in capsys.readouterr().out
    assert "MISMATCH" in out.read_text()


def test_bad_input_is_one_line(world, tmp_path, capsys) -> None:
    assert main(["dossier", "--release", str(tmp_path), "--out",
                 str(tmp_path / "d.html")]) == 2
    assert "release_report.json: not found" in capsys.readouterr().err
    assert main(["dossier", "--release", str(world["release"]), "--site-ledger", "nope",
                 "--out", str(tmp_path / "d.html")]) == 2
    assert "expected SITE=PATH" in capsys.readouterr().err
    assert not (tmp_path / "d.html").exists()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed, so the dossier cannot be checked in a "
                        "browser; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); CI=true makes this fail")
    return found


def test_dossier_renders_in_a_headless_browser(world, tmp_path) -> None:
    browser = _chromium()
    out = tmp_path / "dossier.html"
    assert _run(world, out) == 0
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "dossier.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000",
                            out.as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run(flags + ["--dump-dom", out.as_uri()], check=True, capture_output=True,
                         timeout=120, text=True).stdout
    for section in ("sites", "audits", "gate", "memorization", "hashes", "integrity"):
        assert f'id="{section}"' in dom
    assert "Per-site privacy spend" in dom and "One-run canary audit" in dom
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200)
    dark = (pixels < 128).mean()
    assert pixels.std() > 20 and dark > 0.01, (pixels.std(), dark)   # text and plots, not blank
    shutil.copy(shot, Path(os.environ.get("DOSSIER_SCREENSHOT", tmp_path / "keep.png")))
