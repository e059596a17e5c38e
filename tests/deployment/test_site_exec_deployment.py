"""``fedsynth site-exec`` with real processes: a SuperLink, two SuperNodes in
``--isolation process`` and one site-exec per hospital, federating through ``flwr run``."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from experiments.deployment import (app_fab_hash, flwr_run_command, run_config_argument,
                                    site_exec_command, supernode_command, write_superexec_secret)

from .conftest import REPO, free_port, wait_for_port
from .test_deployment import RUN_TIMEOUT, check_finished, gate_log_queries, site_rounds

UNAPPROVED = "0" * 64


def _start_site(deployment, fed, site_id: str, approved: str, secret: Path | None = None) -> int:
    """The site's SuperNode (process isolation) and its site-exec; returns the Runtime API port."""
    port = free_port()
    deployment.processes.start(site_id, supernode_command(
        deployment.address, fed.site_yaml(site_id), port, None, None, site_exec=True,
        superexec_secret=secret))
    wait_for_port(port)
    deployment.processes.start(f"{site_id}-exec", site_exec_command(port, approved, secret))
    return port


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_site_exec_runs_the_approved_fab_from_a_warm_parent_and_refuses_any_other(
        deployment, new_federation):
    fed = new_federation(sites=2, rounds=2, min_sites=1, federation={"round_timeout": 40.0},
                         release={"chunk_size": 2, "max_attempts": 2})
    deployment.start_superlink()
    approved = app_fab_hash(REPO)   # what `flwr run REPO` will submit
    secret_folder = fed.config_path.parent / "site_0_secret"
    secret_folder.mkdir()
    # site_0's SuperNode serves tasks only to a runner holding its secret.
    _start_site(deployment, fed, "site_0", approved, write_superexec_secret(secret_folder))
    site_1_port = _start_site(deployment, fed, "site_1", UNAPPROVED)   # this hospital approved another version

    done = deployment.run_app(fed.config_path, fed.run_dir, fed.checkpoint, RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    check_finished(fed, 2, ["site_0"])
    assert site_rounds(fed, "site_0") == [1, 2]
    assert site_rounds(fed, "site_1") == []   # never trained: no epsilon spent
    forked = deployment.processes.log("site_0-exec")
    assert forked.count("forked from the warm parent") == 2, forked[-3000:]
    refused = deployment.processes.log("site_1-exec")
    # One refusal per round at least (Flower may offer a refused task again before it expires).
    assert refused.count(f"FAB {approved} is not approved by this site") >= 2, refused[-3000:]
    assert "acquire-task" not in refused   # no log line per poll
    assert "forked from the warm parent" not in refused

    # site_1 approves this version: its runner restarts with the hash, and the release's gate
    # queries reach both hospitals through their runners.
    deployment.processes.kill("site_1-exec", signal.SIGTERM)
    deployment.processes.started["site_1-exec"].wait(timeout=30)
    deployment.processes.start("site_1-exec-approved", site_exec_command(site_1_port, approved))
    out = fed.config_path.parent / "release"
    release = deployment.processes.run(flwr_run_command(REPO, run_config_argument(
        fed.config_path, fed.run_dir, None, mode="release", release_num=4, release_out=out)),
        RUN_TIMEOUT)
    assert release.returncode == 0, release.stdout[-3000:]
    state = json.loads((out / "release_state.json").read_text())
    sent = [r["query_id"] for r in state["rounds"]]
    assert sent and all(s["status"] != "pending" for s in state["slots"]), state
    for site_id in fed.site_ids:
        assert sorted(set(gate_log_queries(fed, site_id))) == sorted(sent), site_id
    assert "forked from the warm parent" in deployment.processes.log("site_1-exec-approved")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_site_exec_ends_when_interrupted_and_takes_its_warm_parent_with_it(deployment):
    deployment.start_superlink()
    port = free_port()
    deployment.processes.start("site", ["flower-supernode", "--superlink", deployment.address,
                                        "--insecure", "--isolation", "process", "--port", str(port)])
    wait_for_port(port)
    runner = deployment.processes.start("site-exec", site_exec_command(port, None))
    deadline = time.monotonic() + 120
    while "asking 127.0.0.1" not in deployment.processes.log("site-exec"):
        assert runner.poll() is None and time.monotonic() < deadline, \
            deployment.processes.log("site-exec")[-2000:]
        time.sleep(0.2)
    children = Path(f"/proc/{runner.pid}/task/{runner.pid}/children")
    [warm_parent] = children.read_text().split()
    runner.send_signal(2)   # Ctrl-C
    runner.wait(timeout=60)
    assert runner.returncode == 130
    assert not Path(f"/proc/{warm_parent}").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_runner_without_the_supernodes_secret_stops_with_one_line(deployment, tmp_path):
    deployment.start_superlink()
    port = free_port()
    secret = write_superexec_secret(tmp_path)
    deployment.processes.start("site", ["flower-supernode", "--superlink", deployment.address,
                                        "--insecure", "--isolation", "process", "--port", str(port),
                                        "--superexec-auth-secret-file", str(secret)])
    wait_for_port(port)
    done = deployment.processes.run(site_exec_command(port, None), timeout=120)   # no secret
    assert done.returncode == 2, done.stdout[-2000:]
    assert "Traceback" not in done.stdout and "interrupted" not in done.stdout, done.stdout[-2000:]
    [error] = [line for line in done.stdout.splitlines() if line.startswith("fedsynth site-exec:")]
    assert "HTTP 401" in error and "; pass --superexec-auth-secret-file" in error, error
