"""SIGKILL the `fedsynth federate` process in the middle of a round, then `--resume` it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from experiments.cli import main
from privacy.site_ledger import read_site_ledger
from server.consortium_ledger import read_consortium_ledger
from server.federation import federation_dir
from server.reconcile import reconcile
from server.tracking import default_tracking_uri

KILL_DEADLINE_SECONDS = 300


def _rounds(path) -> list[int]:
    try:
        return [r.round for r in read_site_ledger(path).rounds]
    except Exception:  # noqa: BLE001 - a ledger being written is read again on the next poll
        return []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_server_resumes_without_counting_a_round_twice(new_federation, capsys):
    fed = new_federation(rounds=3, min_sites=2)
    state_file = federation_dir(fed.run_dir) / "state.json"
    command = [sys.executable, "-m", "experiments.cli", "federate", "--config", str(fed.config_path),
               "--out", str(fed.run_dir), "--checkpoint", str(fed.checkpoint)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + KILL_DEADLINE_SECONDS
        # Kill once round 1 is checkpointed and a site has committed round 2: mid-round 2.
        while time.monotonic() < deadline and server.poll() is None:
            finished = json.loads(state_file.read_text())["round"] if state_file.exists() else 0
            if finished >= 1 and 2 in _rounds(fed.ledger("site_0")):
                break
            time.sleep(0.05)
        assert server.poll() is None, "the federation ended before it could be killed"
        os.killpg(server.pid, signal.SIGKILL)   # the server and its Ray workers
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    killed_at = json.loads(state_file.read_text())["round"]
    assert killed_at in (1, 2)

    code = main(["federate", "--config", str(fed.config_path), "--out", str(fed.run_dir), "--resume"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(state_file.read_text())["round"] == 3
    ledger_path = federation_dir(fed.run_dir) / "consortium_ledger.jsonl"
    assert read_consortium_ledger(ledger_path).completed_rounds() == [1, 2, 3]
    for site_id in fed.site_ids:
        assert _rounds(fed.ledger(site_id)) == [1, 2, 3]        # none counted twice, none lost
        assert reconcile(fed.ledger(site_id), ledger_path).ok
    client = MlflowClient(default_tracking_uri(fed.run_dir))
    [run] = client.search_runs([client.get_experiment_by_name("fedsynth-tiny").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "round/sites")]
    assert 3 in steps and len(steps) == len(set(steps))
    assert run.info.status == "FINISHED"
