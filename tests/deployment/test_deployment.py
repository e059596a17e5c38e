"""A real deployment on loopback: flower-superlink, one flower-supernode per hospital, `flwr run`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from configs import load_config
from experiments.deployment import (flwr_run_command, make_certificates, make_supernode_key,
                                    run_config_argument)
from experiments.federate import prepare_public_validation
from privacy.site_ledger import read_site_ledger
from server.consortium_ledger import ROUND, SITE_FAILURE, read_consortium_ledger
from server.federation import federation_dir
from server.reconcile import reconcile

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 600.0
REFUSAL_TIMEOUT = 120.0


def site_rounds(fed, site_id: str) -> list[int]:
    path = fed.ledger(site_id)
    return [r.round for r in read_site_ledger(path).rounds] if path.exists() else []


def federation_state(fed) -> dict:
    path = federation_dir(fed.run_dir) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"round": 0}


def consortium(fed):
    return read_consortium_ledger(federation_dir(fed.run_dir) / "consortium_ledger.jsonl")


def check_finished(fed, rounds: int, sites: list[str]) -> None:
    state = federation_state(fed)
    assert state["round"] == rounds and state["stop_reason"] == f"all {rounds} rounds done", state
    view = consortium(fed)
    assert view.completed_rounds() == list(range(1, rounds + 1))
    for site_id in sites:
        if not fed.ledger(site_id).exists():
            continue
        assert len(site_rounds(fed, site_id)) == len(set(site_rounds(fed, site_id)))
        report = reconcile(fed.ledger(site_id), federation_dir(fed.run_dir) / "consortium_ledger.jsonl",
                           site_id)
        assert report.ok, report.lines()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_insecure_deployment_runs_two_rounds(deployment, new_federation):
    fed = new_federation(sites=2, rounds=2, min_sites=2)
    prepare_public_validation(load_config(fed.config_path), fed.run_dir)
    deployment.start_superlink()
    for site_id in fed.site_ids:
        deployment.start_supernode(site_id, fed.site_yaml(site_id))
    done = deployment.run_app(fed.config_path, fed.run_dir, fed.checkpoint, RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    check_finished(fed, 2, fed.site_ids)
    assert all(site_rounds(fed, s) == [1, 2] for s in fed.site_ids)
    assert (federation_dir(fed.run_dir) / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tls_and_supernode_authentication_refuse_an_unregistered_supernode(deployment, new_federation,
                                                                           tmp_path):
    fed = new_federation(sites=2, rounds=2, min_sites=2)
    certificates = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    deployment.start_superlink(certificates)
    keys = {name: make_supernode_key(tmp_path / "keys" / name) for name in [*fed.site_ids, "intruder"]}
    for site_id in fed.site_ids:
        registered = deployment.flwr(["supernode", "register", str(keys[site_id][1]), "fedsynth",
                                      "--name", site_id])
        assert registered.returncode == 0 and "registered" in registered.stdout, registered.stdout
    for site_id in fed.site_ids:
        deployment.start_supernode(site_id, fed.site_yaml(site_id), private_key=keys[site_id][0])
    # A SuperNode with a valid TLS setup but an unregistered key, posing as a hospital.
    intruder_yaml = tmp_path / "intruder.yaml"
    entry = yaml.safe_load(fed.site_yaml("site_1").read_text())
    entry.update(site_id="intruder", ledger=str(tmp_path / "intruder_ledger.jsonl"))
    intruder_yaml.write_text(yaml.safe_dump(entry))
    intruder = deployment.start_supernode("intruder", intruder_yaml, private_key=keys["intruder"][0],
                                          extra=["--max-retries", "2"])
    deadline = time.monotonic() + REFUSAL_TIMEOUT
    while intruder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert intruder.poll() not in (None, 0), deployment.processes.log("intruder")[-2000:]
    assert "Failed to activate SuperNode" in deployment.processes.log("intruder")

    done = deployment.run_app(fed.config_path, fed.run_dir, fed.checkpoint, RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    check_finished(fed, 2, fed.site_ids)
    assert consortium(fed).site_ids() == ["site_0", "site_1"]
    assert not (tmp_path / "intruder_ledger.jsonl").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(deployment, new_federation):
    fed = new_federation(sites=3, rounds=1, min_sites=2)
    deployment.start_superlink()
    for site_id in fed.site_ids:
        deployment.start_supernode(site_id, fed.site_yaml(site_id))
    run_config = run_config_argument(fed.config_path, fed.run_dir, fed.checkpoint)
    run = deployment.processes.start("flwr-run", flwr_run_command(REPO, run_config))
    ledger = federation_dir(fed.run_dir) / "consortium_ledger.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT
    # The consortium ledger's first entry is written just before round 1's messages are sent.
    while not ledger.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger.exists(), deployment.processes.log("flwr-run")[-3000:]
    time.sleep(1.0)
    deployment.processes.kill("site_2", signal.SIGKILL)   # the SuperNode and its ClientApp, mid-round
    while run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.poll() == 0, deployment.processes.log("flwr-run")[-3000:]

    check_finished(fed, 1, fed.site_ids)
    view = consortium(fed)
    [round_one] = view.effective(ROUND)
    assert round_one.payload["participants"] == ["site_0", "site_1"]
    failures = [e.payload for e in view.effective(SITE_FAILURE)]
    assert [f["round"] for f in failures] == [1]
    assert site_rounds(fed, "site_0") == site_rounds(fed, "site_1") == [1]
    assert site_rounds(fed, "site_2") in ([], [1])   # it may have committed before it died ...
    assert view.site_reports("site_2") == []         # ... but nothing of it was counted


def gate_log_queries(fed, site_id: str) -> list[str]:
    path = fed.ledger(site_id).parent / "gate_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["query_id"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tls_deployment_federates_then_releases_through_the_gate_and_resumes_after_a_kill(
        deployment, new_federation, tmp_path):
    fed = new_federation(sites=2, rounds=2, min_sites=2,
                         release={"chunk_size": 2, "max_attempts": 2})
    certificates = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    deployment.start_superlink(certificates)
    keys = {site_id: make_supernode_key(tmp_path / "keys" / site_id) for site_id in fed.site_ids}
    for site_id in fed.site_ids:
        registered = deployment.flwr(["supernode", "register", str(keys[site_id][1]), "fedsynth"])
        assert registered.returncode == 0, registered.stdout
        deployment.start_supernode(site_id, fed.site_yaml(site_id), private_key=keys[site_id][0])
    done = deployment.run_app(fed.config_path, fed.run_dir, fed.checkpoint, RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    check_finished(fed, 2, fed.site_ids)
    # fedsynth's own lines reach `flwr run --stream` and each SuperNode's log.
    assert "round 2: 2 site(s) trained" in done.stdout, done.stdout[-3000:]
    assert "site_0: round 2 ok" in deployment.processes.log("site_0")

    # The release: the same ServerApp in mode "release", over the same SuperLink.
    out = tmp_path / "release"
    release_config = run_config_argument(fed.config_path, fed.run_dir, None, mode="release",
                                         release_num=6, release_out=out)
    run = deployment.processes.start("release-1", flwr_run_command(REPO, release_config))
    state_path = out / "release_state.json"
    deadline = time.monotonic() + RUN_TIMEOUT

    def state() -> dict:
        try:
            return json.loads(state_path.read_text())
        except (OSError, ValueError):
            return {"rounds": [], "slots": []}

    while run.poll() is None and time.monotonic() < deadline and \
            not any(r["stage"] == "written" for r in state()["rounds"]):
        time.sleep(0.2)
    assert any(r["stage"] == "written" for r in state()["rounds"]), \
        deployment.processes.log("release-1")[-3000:]
    deployment.processes.kill("site_1", signal.SIGKILL)   # a hospital goes down mid-release
    while run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    halted = state()
    assert any(s["status"] == "pending" for s in halted["slots"]), halted   # state kept, unfinished
    first_log = deployment.processes.log("release-1")
    assert "fedsynth: " in first_log and "site_1" in first_log, first_log[-3000:]

    # The hospital comes back; the same command resumes the release.
    deployment.start_supernode("site_1-again", fed.site_yaml("site_1"), private_key=keys["site_1"][0])
    resumed = deployment.processes.run(flwr_run_command(REPO, release_config), RUN_TIMEOUT)
    final = state()
    assert final["slots"] and all(s["status"] != "pending" for s in final["slots"]), \
        resumed.stdout[-3000:]
    assert final["release_id"] == halted["release_id"]
    sent = [r["query_id"] for r in final["rounds"]]
    for site_id in fed.site_ids:
        answered = gate_log_queries(fed, site_id)
        assert sorted(set(answered)) == sorted(sent), (site_id, answered, sent)
        assert len(answered) == len(set(answered))   # a resumed query is replayed, not recomputed
    released = [s for s in final["slots"] if s["status"] == "released"]
    assert len(list((out / "images").glob("*.nii.gz"))) == len(released)
    assert (out / "release_report.json").exists() and (out / "manifest.csv").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_serverapp_ends_as_failed_in_flwr_ls(deployment, new_federation, tmp_path):
    """`flwr run` exits 0 once the run was submitted; the failure shows in `flwr ls`."""
    fed = new_federation(sites=2, rounds=1, min_sites=2)
    deployment.start_superlink()
    missing = tmp_path / "no_such_checkpoint.pt"
    done = deployment.run_app(fed.config_path, fed.run_dir, missing, RUN_TIMEOUT)
    assert "fedsynth pretrain" in done.stdout, done.stdout[-3000:]
    listed = deployment.flwr(["ls", "fedsynth", "--format", "json"])
    assert listed.returncode == 0, listed.stdout
    runs = json.loads(listed.stdout)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "finished:failed", runs
