"""Bad input, as users type it, across every ``fedsynth`` command.

Each case runs the ``fedsynth`` console script in a subprocess on real files in a temporary folder
and checks the contract of every refusal: a non-zero exit; exactly one error line (``fedsynth
COMMAND: error: ...``) that names what is wrong and where, with the fix after a ``;``; no traceback;
every input file byte-identical afterwards; nothing left behind (no output folder, no half-written
file). ``data check`` reports problems in scans or rows on stdout and exits 1 (``stream="stdout"``).

To add a case: append a :class:`Case` to ``CASES``. ``{in}`` in the arguments is the inputs folder
(see :func:`make_inputs` for what it holds); ``setup`` may add or change files there first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import yaml

# Over a hundred subprocesses (a dozen import torch to check scans): minutes on a shared 2-core box.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FEDSYNTH = Path(sys.executable).with_name("fedsynth")
SIZE = 8
HASH = "0" * 64


# --- the inputs every case starts from ----------------------------------------------------------

def _write_site(folder: Path, patients: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rows = ["patient_id,image,label,age"]
    for index, patient in enumerate(patients):
        label = rng.integers(0, 4, (SIZE, SIZE, SIZE)).astype(np.uint8)
        image = (label * 100.0 + rng.normal(0, 10, label.shape)).astype(np.float32)
        affine = np.diag([6.0, 6.0, 6.0, 1.0])
        name = f"{patient}_{index}"
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"{name}_label.nii.gz")
        rows.append(f"{patient},images/{name}.nii.gz,labels/{name}_label.nii.gz,{50 + index}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


def make_inputs(root: Path) -> None:
    """``root`` gets: site_0, site_1, public (site folders with real NIfTI), experiment.yaml (both
    sites, public_dir), ledger/ledger.jsonl (+ .head: a real site ledger, 2 rounds),
    consortium.jsonl (a real consortium ledger naming site_0 and site_1), release/ (a release
    manifest beside its report), foreign/ (someone else's files), garbage.pt (random bytes)."""
    from privacy.budget import SiteBudget
    from privacy.calibration import SchedulePlan
    from server.consortium_ledger import ConsortiumLedger

    for seed, name in enumerate(("site_0", "site_1", "public")):
        _write_site(root / name, ["p1", "p2", "p3"], seed)
    (root / "experiment.yaml").write_text(yaml.safe_dump({
        "data": {"public_dir": "public", "shape": [16, 16, 16]},
        "federation": {"rounds": 2, "sites": [{"site_id": "site_0", "data_dir": "site_0"},
                                              {"site_id": "site_1", "data_dir": "site_1"}]},
        "privacy": {"target_epsilon": 10.0, "delta": 1.0e-3, "expected_batch_size": 2}}))
    plan = SchedulePlan(target_epsilon=3.0, delta=1e-3, accountant="rdp", noise_multiplier=1.3,
                        sample_rate=0.2, num_patients=20, expected_batch_size=4, local_epochs=1,
                        steps_per_round=5, planned_rounds=3)
    budget = SiteBudget.open(root / "ledger" / "ledger.jsonl", plan, max_grad_norm=1.0)
    for number in (1, 2):
        budget.charge(number, model_hash_before=HASH, model_hash_after=HASH)
    ConsortiumLedger(root / "consortium.jsonl").record_start(
        config_sha256=HASH, checkpoint_sha256=HASH, planned_rounds=2, sites=["site_0", "site_1"])
    (root / "release").mkdir()
    (root / "release" / "manifest.csv").write_text("patient_id,image,label,gate\ns0,a,b,pass\n")
    (root / "release" / "release_report.json").write_text(json.dumps({"released": 1}))
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.docx").write_bytes(b"someone else's work")
    (root / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))


# --- setups: small changes to the inputs ---------------------------------------------------------

Setup = Callable[[Path], None]


def write(rel: str, content: str | bytes) -> Setup:
    def apply(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return apply


def yaml_config(rel: str, data: dict) -> Setup:
    return write(rel, yaml.safe_dump(data))


def symlink(rel: str, target: str) -> Setup:
    def apply(root: Path) -> None:
        (root / rel).symlink_to(target)
    return apply


def truncate(rel: str, keep: int) -> Setup:
    def apply(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[:keep])
    return apply


def both(*setups: Setup) -> Setup:
    def apply(root: Path) -> None:
        for setup in setups:
            setup(root)
    return apply


def manifest(site: str, *rows: str, header: str = "patient_id,image,label") -> Setup:
    return write(f"{site}/manifest.csv", "\n".join((header, *rows)) + "\n")


SITES = [{"site_id": "site_0", "data_dir": "site_0"}, {"site_id": "site_1", "data_dir": "site_1"}]
ROW = "p1,images/p1_0.nii.gz,labels/p1_0_label.nii.gz"


def with_sites(**sections) -> dict:
    data = {"data": {"public_dir": "public", "shape": [16, 16, 16]},
            "federation": {"rounds": 2, "sites": SITES}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]              # substrings of the error line: what and where
    setup: Setup | None = None
    code: int = 2
    stream: str = "stderr"                # "stdout": a check that lists the problem, exit 1


C = Case
CASES = [
    # config check / show
    C("config-missing", ("config", "check", "{in}/nope.yaml"), ("nope.yaml", "not found")),
    C("config-empty", ("config", "check", "{in}/c.yaml"), ("c.yaml", "empty"), write("c.yaml", "")),
    C("config-only-comments", ("config", "check", "{in}/c.yaml"), ("c.yaml", "empty"),
      write("c.yaml", "# nothing here\n")),
    C("config-duplicate-section", ("config", "check", "{in}/c.yaml"),
      ("c.yaml", "line 3", "'privacy' appears twice"),
      write("c.yaml", "privacy:\n  target_epsilon: 1\nprivacy:\n  delta: 0.1\n")),
    C("config-duplicate-nested", ("config", "check", "{in}/c.yaml"), ("'delta' appears twice",),
      write("c.yaml", "privacy:\n  delta: 1.0e-5\n  delta: 0.1\n")),
    C("config-duplicate-flow", ("config", "check", "{in}/c.yaml"), ("'seed' appears twice",),
      write("c.yaml", "{seed: 1, seed: 2}\n")),
    C("config-binary", ("config", "check", "{in}/c.yaml"), ("c.yaml", "binary"),
      write("c.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
    C("config-latin1", ("config", "check", "{in}/c.yaml"), ("c.yaml", "not UTF-8", "line 2"),
      write("c.yaml", "seed: 1\n# caf\xe9\n".encode("latin-1"))),
    C("config-rounds-1e30", ("config", "check", "{in}/c.yaml"), ("federation.rounds", "<= 10000"),
      write("c.yaml", f"federation:\n  rounds: {10**30}\n")),
    C("config-seed-2**70", ("config", "check", "{in}/c.yaml"), ("seed", "<= 4294967295"),
      write("c.yaml", f"seed: {2**70}\n")),
    C("config-seed-negative", ("config", "check", "{in}/c.yaml"), ("seed", ">= 0"),
      write("c.yaml", "seed: -1\n")),
    C("config-epsilon-inf", ("config", "check", "{in}/c.yaml"),
      ("privacy.target_epsilon", "finite"), write("c.yaml", "privacy:\n  target_epsilon: .inf\n")),
    C("config-epsilon-nan", ("config", "check", "{in}/c.yaml"),
      ("privacy.target_epsilon", "finite"), write("c.yaml", "privacy:\n  target_epsilon: .nan\n")),
    C("config-epsilon-huge-int", ("config", "check", "{in}/c.yaml"), ("privacy.target_epsilon",),
      write("c.yaml", f"privacy:\n  target_epsilon: {10**400}\n")),
    C("config-delta-quoted", ("config", "check", "{in}/c.yaml"),
      ("privacy.delta", "write it unquoted"), write("c.yaml", "privacy:\n  delta: '1e-5'\n")),
    C("config-shape-huge", ("config", "check", "{in}/c.yaml"), ("data.shape", "<= 512"),
      write("c.yaml", "data:\n  shape: [100000, 100000, 100000]\n")),
    C("config-batch-huge", ("config", "check", "{in}/c.yaml"),
      ("privacy.max_physical_batch_size",),
      write("c.yaml", f"privacy:\n  max_physical_batch_size: {10**12}\n")),
    C("config-epochs-huge", ("config", "check", "{in}/c.yaml"), ("pretrain.unet.epochs",),
      write("c.yaml", f"pretrain:\n  unet:\n    epochs: {10**9}\n")),
    C("config-a-list", ("config", "check", "{in}/c.yaml"), ("c.yaml", "mapping"),
      write("c.yaml", "- seed\n- 1\n")),
    C("config-two-documents", ("config", "check", "{in}/c.yaml"), ("c.yaml", "documents"),
      write("c.yaml", "seed: 1\n---\nseed: 2\n")),
    C("config-syntax", ("config", "check", "{in}/c.yaml"), ("c.yaml", "line"),
      write("c.yaml", "privacy: [1, 2\n")),
    C("config-a-folder", ("config", "check", "{in}/site_0"), ("site_0", "folder")),
    C("config-unknown-key", ("config", "show", "{in}/c.yaml"), ("privacy.epsilon", "did you mean"),
      write("c.yaml", "privacy:\n  epsilon: 3\n")),
    C("site-config-duplicate", ("config", "check", "--site", "{in}/s.yaml"),
      ("s.yaml", "'site_id' appears twice"),
      write("s.yaml", "site_id: a\ndata_dir: site_0\nsite_id: b\n")),
    C("site-config-empty", ("config", "check", "--site", "{in}/s.yaml"), ("s.yaml", "empty"),
      write("s.yaml", "\n")),
    # data check
    C("data-no-folder", ("data", "check", "{in}/nowhere"), ("nowhere", "not found")),
    C("data-semicolons", ("data", "check", "{in}/site_0"), ("manifest.csv", "semicolons"),
      manifest("site_0", ROW.replace(",", ";"), header="patient_id;image;label")),
    C("data-tabs", ("data", "check", "{in}/site_0"), ("manifest.csv", "tabs"),
      manifest("site_0", ROW.replace(",", "\t"), header="patient_id\timage\tlabel")),
    C("data-manifest-binary", ("data", "check", "{in}/site_0"), ("manifest.csv", "binary"),
      write("site_0/manifest.csv", b"PK\x03\x04\x00\x00garbage")),
    C("data-manifest-latin1", ("data", "check", "{in}/site_0"), ("manifest.csv", "not UTF-8"),
      write("site_0/manifest.csv", "patient_id,image,label\nJos\xe9,a,b\n".encode("latin-1"))),
    C("data-yaml-manifest-duplicate", ("data", "check", "{in}/site_0", "--manifest", "m.yaml"),
      ("m.yaml", "'image' appears twice"),
      write("site_0/m.yaml", "- patient_id: p1\n  image: images/p1_0.nii.gz\n"
                             "  image: images/p2_1.nii.gz\n  label: labels/p1_0_label.nii.gz\n")),
    C("data-outside-dotdot", ("data", "check", "{in}/site_0"),
      ("'../site_1/images/p1_0.nii.gz'", "outside the site folder", "allow_outside_paths"),
      manifest("site_0", "p1,../site_1/images/p1_0.nii.gz,labels/p1_0_label.nii.gz"),
      code=1, stream="stdout"),
    C("data-outside-absolute", ("data", "check", "{in}/site_0"),
      ("'/etc/hostname'", "outside the site folder"),
      manifest("site_0", "p1,/etc/hostname,labels/p1_0_label.nii.gz"), code=1, stream="stdout"),
    C("data-outside-symlink", ("data", "check", "{in}/site_0"),
      ("'images/link.nii.gz'", "outside the site folder"),
      both(symlink("site_0/images/link.nii.gz", "../../site_1/images/p1_0.nii.gz"),
           manifest("site_0", "p1,images/link.nii.gz,labels/p1_0_label.nii.gz")),
      code=1, stream="stdout"),
    C("data-image-is-label", ("data", "check", "{in}/site_0"), ("same file",),
      manifest("site_0", "p1,labels/p1_0_label.nii.gz,labels/p1_0_label.nii.gz"),
      code=1, stream="stdout"),
    C("data-symlink-loop", ("data", "check", "{in}/site_0"), ("loop.nii.gz", "symbolic link loop"),
      both(symlink("site_0/images/loop.nii.gz", "loop.nii.gz"),
           manifest("site_0", "p1,images/loop.nii.gz,labels/p1_0_label.nii.gz")),
      code=1, stream="stdout"),
    C("data-truncated-scan", ("data", "check", "{in}/site_0"), ("p1_0.nii.gz", "truncated"),
      truncate("site_0/images/p1_0.nii.gz", 100), code=1, stream="stdout"),
    C("data-config-duplicate", ("data", "check", "{in}/site_0", "--config", "{in}/c.yaml"),
      ("c.yaml", "appears twice"),
      write("c.yaml", "data:\n  shape: [16,16,16]\ndata:\n  shape: [8,8,8]\n")),
    # cohort
    C("cohort-size-100000", ("cohort", "--out", "{in}/new", "--size", "100000"), ("--size",)),
    C("cohort-size-odd", ("cohort", "--out", "{in}/new", "--size", "7"), ("--size",)),
    C("cohort-sites-0", ("cohort", "--out", "{in}/new", "--sites", "0"), ("--sites",)),
    C("cohort-patients-huge", ("cohort", "--out", "{in}/new", "--patients", "1000000000"),
      ("--patients",)),
    C("cohort-seed-huge", ("cohort", "--out", "{in}/new", "--seed", str(2**70)), ("--seed",)),
    C("cohort-out-file", ("cohort", "--out", "{in}/garbage.pt"), ("garbage.pt", "file")),
    C("cohort-out-foreign", ("cohort", "--out", "{in}/foreign"),
      ("foreign", "not a fedsynth cohort")),
    C("cohort-size-word", ("cohort", "--out", "{in}/new", "--size", "big"), ("--size", "big")),
    # pretrain
    C("pretrain-empty-config", ("pretrain", "--config", "{in}/c.yaml"), ("c.yaml", "empty"),
      write("c.yaml", "")),
    C("pretrain-missing-config", ("pretrain", "--config", "{in}/nope.yaml"), ("nope.yaml",)),
    C("pretrain-out-foreign", ("pretrain", "--config", "{in}/experiment.yaml", "--out",
                               "{in}/foreign"), ("foreign", "did not write")),
    C("pretrain-out-file", ("pretrain", "--config", "{in}/experiment.yaml", "--out",
                            "{in}/garbage.pt"), ("garbage.pt", "is a file")),
    C("pretrain-out-is-site", ("pretrain", "--config", "{in}/experiment.yaml", "--out",
                               "{in}/public"), ("public", "input")),
    C("pretrain-no-public", ("pretrain", "--config", "{in}/c.yaml"), ("data.public_dir",),
      yaml_config("c.yaml", {"data": {"shape": [16, 16, 16]}})),
    # sample
    C("sample-garbage-checkpoint", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks",
                                    "{in}/public", "--num", "1", "--out", "{in}/new"),
      ("garbage.pt",)),
    C("sample-num-0", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks", "{in}/public",
                       "--num", "0", "--out", "{in}/new"), ("--num",)),
    C("sample-out-foreign", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks",
                             "{in}/public", "--num", "1", "--out", "{in}/foreign"), ("foreign",)),
    C("sample-out-is-masks", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks",
                              "{in}/public", "--num", "1", "--out", "{in}/public"), ("public",)),
    C("sample-guidance-inf", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks",
                              "{in}/public", "--num", "1", "--out", "{in}/new", "--guidance",
                              "inf"), ("--guidance", "inf")),
    C("sample-missing-masks", ("sample", "--checkpoint", "{in}/garbage.pt", "--masks",
                               "{in}/nowhere", "--num", "1", "--out", "{in}/new"), ("nowhere",)),
    # evaluate
    C("evaluate-out-release-manifest", ("evaluate", "--real", "{in}/site_0", "--synthetic",
                                        "{in}/site_1", "--out", "{in}/release/manifest.csv"),
      ("manifest.csv", "release manifest")),
    C("evaluate-out-is-input", ("evaluate", "--real", "{in}/site_0", "--synthetic", "{in}/site_1",
                                "--out", "{in}/site_0/manifest.csv"), ("manifest.csv", "input")),
    C("evaluate-out-ledger", ("evaluate", "--real", "{in}/site_0", "--synthetic", "{in}/site_1",
                              "--out", "{in}/ledger/ledger.jsonl"), ("ledger.jsonl", "ledger")),
    C("evaluate-out-folder", ("evaluate", "--real", "{in}/site_0", "--synthetic", "{in}/site_1",
                              "--out", "{in}/foreign"), ("foreign", "folder")),
    C("evaluate-garbage-synthetic", ("evaluate", "--real", "{in}/site_0", "--synthetic",
                                     "{in}/site_1", "--public", "{in}/public"),
      ("manifest.csv", "binary"),
      write("site_1/manifest.csv", b"\x00\x01\x02garbage\xff")),
    C("evaluate-truncated-synthetic", ("evaluate", "--real", "{in}/site_0", "--synthetic",
                                       "{in}/site_1", "--public", "{in}/public"), ("p1_0.nii.gz",),
      truncate("site_1/images/p1_0.nii.gz", 200)),
    C("evaluate-garbage-scan", ("evaluate", "--real", "{in}/site_0", "--synthetic",
                                "{in}/site_1", "--public", "{in}/public"), ("p2_1.nii.gz",),
      write("site_1/images/p2_1.nii.gz", b"not a nifti at all")),
    C("evaluate-no-public", ("evaluate", "--real", "{in}/site_0", "--synthetic", "{in}/site_1"),
      ("--public",)),
    C("evaluate-missing-synthetic", ("evaluate", "--real", "{in}/site_0", "--synthetic",
                                     "{in}/nowhere"), ("nowhere",)),
    # budget plan
    C("budget-rounds-million", ("budget", "plan", "--config", "{in}/c.yaml"),
      ("federation.rounds", "<= 10000"),
      yaml_config("c.yaml", with_sites(federation={"rounds": 1000000}))),
    C("budget-patients-word", ("budget", "plan", "--config", "{in}/experiment.yaml",
                               "--patients", "many"), ("--patients many",)),
    C("budget-patients-unknown-site", ("budget", "plan", "--config", "{in}/experiment.yaml",
                                       "--patients", "site_9=5"), ("site_9",)),
    C("budget-epsilon-inf", ("budget", "plan", "--config", "{in}/c.yaml"),
      ("privacy.target_epsilon", "finite"),
      write("c.yaml", "privacy:\n  target_epsilon: .inf\n")),
    # audit
    C("audit-verify-missing", ("audit", "verify", "--ledger", "{in}/nope.jsonl"), ("nope.jsonl",)),
    C("audit-verify-folder", ("audit", "verify", "--ledger", "{in}/ledger"), ("ledger",)),
    C("audit-reconcile-unknown-site", ("audit", "reconcile", "--site-ledger",
                                       "{in}/ledger/ledger.jsonl", "--consortium-ledger",
                                       "{in}/consortium.jsonl", "--site", "site_9"),
      ("site_9", "site_0")),
    C("audit-reconcile-missing", ("audit", "reconcile", "--site-ledger", "{in}/ledger/ledger.jsonl",
                                  "--consortium-ledger", "{in}/nope.jsonl"), ("nope.jsonl",)),
    C("audit-memorization-out-foreign", ("audit", "memorization", "--synthetic", "{in}/site_1",
                                         "--checkpoint", "{in}/garbage.pt", "--out",
                                         "{in}/foreign", "--config", "{in}/experiment.yaml",
                                         "--site", "site_0"), ("foreign", "did not write")),
    # report
    C("report-out-is-ledger", ("report", "--ledger", "{in}/ledger/ledger.jsonl", "--out",
                               "{in}/ledger/ledger.jsonl"), ("ledger.jsonl", "input")),
    C("report-out-head", ("report", "--ledger", "{in}/ledger/ledger.jsonl", "--out",
                          "{in}/ledger/ledger.jsonl.head"), ("ledger.jsonl.head", "head")),
    C("report-out-other-ledger", ("report", "--ledger", "{in}/ledger/ledger.jsonl", "--out",
                                  "{in}/consortium.jsonl"), ("consortium.jsonl", "ledger")),
    C("report-out-folder", ("report", "--ledger", "{in}/ledger/ledger.jsonl", "--out",
                            "{in}/foreign"), ("foreign", "folder")),
    C("report-missing-ledger", ("report", "--ledger", "{in}/nope.jsonl"), ("nope.jsonl",)),
    # dossier
    C("dossier-out-release-manifest", ("dossier", "--release", "{in}/release", "--out",
                                       "{in}/release/manifest.csv"), ("manifest.csv", "input")),
    C("dossier-twin-is-release-report", ("dossier", "--release", "{in}/release", "--out",
                                         "{in}/release/release_report.html"),
      ("release_report.json", "input")),
    C("dossier-out-ledger", ("dossier", "--release", "{in}/release", "--out",
                             "{in}/ledger/ledger.jsonl"), ("ledger.jsonl",)),
    C("dossier-site-ledger-format", ("dossier", "--release", "{in}/release", "--site-ledger",
                                     "ledger.jsonl", "--out", "{in}/d.html"), ("SITE=PATH",)),
    # federate
    C("federate-resume-nothing", ("federate", "--config", "{in}/experiment.yaml", "--out",
                                  "{in}/new", "--resume"), ("--resume", "nothing to resume")),
    C("federate-no-sites", ("federate", "--config", "{in}/c.yaml"), ("federation.sites",),
      yaml_config("c.yaml", {"seed": 1})),
    C("federate-missing-checkpoint", ("federate", "--config", "{in}/experiment.yaml", "--out",
                                      "{in}/new"), ("checkpoint.pt",)),
    C("federate-out-foreign", ("federate", "--config", "{in}/experiment.yaml", "--out",
                               "{in}/foreign"), ("foreign", "did not write")),
    C("federate-out-file", ("federate", "--config", "{in}/experiment.yaml", "--out",
                            "{in}/garbage.pt"), ("garbage.pt", "is a file")),
    # deploy
    C("deploy-host-slash", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/new",
                            "--host", "example.org/path"), ("--host", "example.org/path")),
    C("deploy-host-empty", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/new",
                            "--host", ""), ("--host", "empty")),
    C("deploy-host-label-64", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/new",
                               "--host", "a" * 64 + ".org"), ("--host", "63")),
    C("deploy-host-254", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/new",
                          "--host", ".".join(["a" * 60] * 5)), ("--host", "253")),
    C("deploy-missing-checkpoint", ("deploy", "--config", "{in}/experiment.yaml", "--out",
                                    "{in}/new", "--checkpoint", "{in}/nope.pt"), ("nope.pt",)),
    C("deploy-out-foreign", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/foreign",
                             "--checkpoint", "{in}/garbage.pt"), ("foreign", "did not write")),
    C("deploy-port-0", ("deploy", "--config", "{in}/experiment.yaml", "--out", "{in}/new",
                        "--port", "0"), ("--port",)),
    # site-exec
    C("site-exec-no-approval", ("site-exec", "--runtime-api-address", "127.0.0.1:9094",
                                "--insecure"), ("--approve-fab", "neither or both")),
    C("site-exec-bad-hash", ("site-exec", "--runtime-api-address", "127.0.0.1:9094", "--insecure",
                             "--approve-fab", "abc"), ("--approve-fab", "not a FAB hash")),
    C("site-exec-no-transport", ("site-exec", "--runtime-api-address", "127.0.0.1:9094",
                                 "--approve-any-fab"), ("--insecure", "--root-certificates")),
    C("site-exec-address", ("site-exec", "--runtime-api-address", "9094", "--insecure",
                            "--approve-any-fab"), ("--runtime-api-address", "not HOST:PORT")),
    C("site-exec-missing-secret", ("site-exec", "--runtime-api-address", "127.0.0.1:9094",
                                   "--insecure", "--approve-any-fab",
                                   "--superexec-auth-secret-file", "{in}/nope.secret"),
      ("nope.secret", "not found")),
    # release
    C("release-num-0", ("release", "--config", "{in}/experiment.yaml", "--num", "0", "--out",
                        "{in}/new"), ("--num",)),
    C("release-out-foreign", ("release", "--config", "{in}/experiment.yaml", "--num", "1",
                              "--out", "{in}/foreign"), ("foreign",)),
    C("release-out-is-site", ("release", "--config", "{in}/experiment.yaml", "--num", "1",
                              "--out", "{in}/site_0"), ("site_0", "input")),
    C("release-missing-checkpoint", ("release", "--config", "{in}/experiment.yaml", "--num", "1",
                                     "--out", "{in}/new"), ("checkpoint.pt",)),
    C("release-garbage-checkpoint", ("release", "--config", "{in}/experiment.yaml", "--num", "1",
                                     "--out", "{in}/new", "--checkpoint", "{in}/garbage.pt"),
      ("garbage.pt",)),
    # sweep
    C("sweep-missing", ("sweep", "{in}/nope.yaml", "--list"), ("nope.yaml",)),
    C("sweep-binary", ("sweep", "{in}/s.yaml", "--list"), ("s.yaml", "binary"),
      write("s.yaml", b"\x00\x9f\x92\x96binary")),
    C("sweep-latin1", ("sweep", "{in}/s.yaml", "--list"), ("s.yaml", "not UTF-8"),
      write("s.yaml", "name: caf\xe9\n".encode("latin-1"))),
    C("sweep-duplicate", ("sweep", "{in}/s.yaml", "--list"), ("s.yaml", "appears twice"),
      write("s.yaml", "name: a\nname: b\n")),
    C("sweep-empty", ("sweep", "{in}/s.yaml", "--list"), ("s.yaml", "empty"), write("s.yaml", "")),
    C("sweep-out-foreign", ("sweep", "{repo}/experiments/sweeps/privacy_quality.yaml", "--out",
                            "{in}/foreign"), ("foreign",)),
    # demo
    C("demo-missing-config", ("demo", "--config", "{in}/nope.yaml"), ("nope.yaml",)),
    C("demo-duplicate-config", ("demo", "--config", "{in}/c.yaml"), ("c.yaml", "appears twice"),
      write("c.yaml", "seed: 1\nseed: 2\n")),
    C("demo-patients-0", ("demo", "--patients", "0"), ("--patients",)),
    # benchmark
    C("benchmark-only-unknown", ("benchmark", "--only", "nosuch", "--out", "{in}/b.md"),
      ("nosuch",)),
    C("benchmark-out-folder", ("benchmark", "--quick", "--out", "{in}/foreign"),
      ("foreign", "folder")),
    C("benchmark-out-ledger", ("benchmark", "--quick", "--out", "{in}/ledger/ledger.jsonl"),
      ("ledger.jsonl", "ledger")),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input_template") / "in"
    root.mkdir()
    make_inputs(root)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (no link followed) with its content hash or kind."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _command(argv: tuple[str, ...], inputs: Path) -> list[str]:
    args = [a.replace("{in}", str(inputs)).replace("{repo}", str(REPO)) for a in argv]
    if FEDSYNTH.exists():
        return [str(FEDSYNTH), *args]
    return [sys.executable, "-m", "experiments.cli", *args]


def test_the_corpus_is_large_and_covers_every_command():
    from experiments.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    covered = {case.argv[0] for case in CASES}
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert commands <= covered, f"no bad-input case for {sorted(commands - covered)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, template: Path, tmp_path: Path):
    inputs, work = tmp_path / "in", tmp_path / "work"
    shutil.copytree(template, inputs, symlinks=True)
    work.mkdir()
    if case.setup is not None:
        case.setup(inputs)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "COLUMNS": "200"}
    # Default output folders (runs/<config name>) would land in work/, inside the snapshot.
    result = subprocess.run(_command(case.argv, inputs), cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.code, output
    if case.stream == "stderr":
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
        line = lines[0]
        assert line.startswith(f"fedsynth {case.argv[0]}: error: ") or \
            line.startswith("fedsynth: error: "), line
        assert "; " in line, f"no fix after '; ': {line}"
    else:
        problems = [line for line in result.stdout.splitlines() if line.startswith("  ")]
        line = next((p for p in problems if all(e in p for e in case.expect)), "")
        assert line, result.stdout
    for expected in case.expect:
        assert expected in line, f"{expected!r} not in: {line}"
    assert _snapshot(tmp_path) == before, "an input changed or an output was left behind"


HEAVY = ("torch", "monai", "flwr", "mlflow", "ray", "opacus")
# Refusals decided by the config, the command line or a file's bytes: no heavy library may load.
LIGHT_CASES = ["config-missing", "config-duplicate-section", "config-epsilon-inf", "data-no-folder",
               "data-semicolons", "cohort-size-100000", "pretrain-empty-config",
               "pretrain-out-foreign", "sample-out-foreign", "evaluate-out-release-manifest",
               "budget-rounds-million", "report-out-is-ledger", "federate-resume-nothing",
               "deploy-host-slash", "deploy-out-foreign", "release-out-foreign", "sweep-binary",
               "demo-duplicate-config", "benchmark-out-ledger", "site-exec-no-approval",
               "site-exec-bad-hash"]


@pytest.mark.parametrize("case_id", LIGHT_CASES)
def test_refusal_loads_no_heavy_library(case_id: str, template: Path, tmp_path: Path):
    case = next(c for c in CASES if c.id == case_id)
    inputs = tmp_path / "in"
    shutil.copytree(template, inputs, symlinks=True)
    if case.setup is not None:
        case.setup(inputs)
    args = _command(case.argv, inputs)[-len(case.argv):]
    probe = ("import sys\nfrom experiments.cli import main\n"
             f"code = main({args!r})\n"
             f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"{case.code} []", result.stdout + result.stderr
