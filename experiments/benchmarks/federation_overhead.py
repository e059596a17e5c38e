"""Framework overhead per federated round: (round wall time - slowest site's compute) / round wall time.

The same tiny federation (2 sites of 4 patients, 16^3 volumes, one DP-SGD step per round) runs
through three transports, side by side in one run:

- ``loopback``: the ServerApp's round loop calling the ClientApp in this process, one site after
  the other (:class:`experiments.loopback.LoopbackGrid`) - no Flower runtime at all;
- ``simulation``: Flower's simulation engine (Ray actors, one CPU each), as ``fedsynth federate``;
- ``deployment`` (full run only): a real ``flower-superlink`` and one ``flower-supernode`` per site
  on loopback, started with ``flwr run``. Flower 1.41 starts a fresh ``flwr-clientapp`` process for
  every message, so each round pays the Python/torch import of the ClientApp, and the SuperNodes and
  the ServerApp poll for messages every 3 s. Every round costs the same (~50 s on a busy 2-core
  machine), so the deployment runs 2 rounds (round 1 and one later round) and the others 3.

Round wall time is the server's, from sending the instructions to the aggregated weights (the
consortium ledger's ``round`` entries); a site's compute is the time its ClientApp spent on the
round, from the site's LOCAL activity log (``<ledger>.activity.jsonl``, never sent to the server).
Round 1 also pays start-up (Ray actors, imports, encoding each site's scans once), so the overhead
is reported for round 1 and for the later rounds separately. In loopback the sites run one after the
other, so the slowest site is not the bound there; the overhead against the SUM of the sites'
compute is reported too.

    python -m experiments.benchmarks.federation_overhead [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES, PATIENTS = 2, 4


def _site_compute(fed) -> dict[int, list[float]]:
    """Round -> each site's compute seconds (latest entry per site and round)."""
    from client.site_runtime import activity_log_path

    per_round: dict[int, dict[str, float]] = {}
    for site_id in fed.site_ids:
        path = activity_log_path(fed.ledger(site_id))
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            per_round.setdefault(int(entry["round"]), {})[site_id] = float(entry["compute_seconds"])
    return {r: list(sites.values()) for r, sites in per_round.items()}


def _round_walls(fed) -> dict[int, float]:
    from server.consortium_ledger import ROUND, read_consortium_ledger
    from server.federation import federation_dir

    view = read_consortium_ledger(federation_dir(fed.run_dir) / "consortium_ledger.jsonl")
    return {int(e.payload["round"]): float(e.payload["wall_seconds"]) for e in view.effective(ROUND)
            if e.payload["status"] == "aggregated"}


def _summary(fed) -> dict:
    walls, compute = _round_walls(fed), _site_compute(fed)
    rounds = sorted(r for r in walls if compute.get(r))
    overhead = {r: (walls[r] - max(compute[r])) / walls[r] for r in rounds}
    overhead_sum = {r: (walls[r] - sum(compute[r])) / walls[r] for r in rounds}
    later = [r for r in rounds if r > 1]
    return {
        "round_wall_seconds": [round(walls[r], 3) for r in rounds],
        "slowest_site_seconds": [round(max(compute[r]), 3) for r in rounds],
        "sum_site_seconds": [round(sum(compute[r]), 3) for r in rounds],
        "overhead_round_1": overhead[rounds[0]] if rounds else None,
        "overhead_vs_sum_round_1": overhead_sum[rounds[0]] if rounds else None,
        "overhead_later_rounds": statistics.mean(overhead[r] for r in later) if later else None,
        "overhead_vs_sum_later_rounds": statistics.mean(overhead_sum[r] for r in later) if later else None,
    }


def _loopback(fed) -> dict:
    from client.client_app import make_client_app
    from configs import load_config
    from experiments.loopback import LoopbackGrid
    from server.federation import FederationSettings, run_federation

    grid = LoopbackGrid(make_client_app(str(fed.config_path)),
                        [{"partition-id": k, "num-partitions": SITES} for k in range(SITES)])
    run_federation(grid, FederationSettings(load_config(fed.config_path), fed.run_dir, fed.checkpoint,
                                            tracking=False, evaluate=False))
    return _summary(fed)


def _simulation(fed) -> dict:
    from experiments.federate import simulate

    simulate(fed.config_path, fed.run_dir, checkpoint=fed.checkpoint, tracking=False)
    return _summary(fed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _deployment(fed, folder: Path, timeout: float = 1200.0) -> dict:
    from experiments.deployment import (flwr_run_command, run_config_argument, superlink_command,
                                        supernode_command, write_flower_config)
    from configs import load_config
    from experiments.federate import prepare_public_validation

    prepare_public_validation(load_config(fed.config_path), fed.run_dir)
    env = {**os.environ, "FLWR_HOME": str(folder / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    repo = Path(__file__).resolve().parents[2]
    port = _free_port()
    write_flower_config(folder / "flwr", f"127.0.0.1:{port}", None)
    started: list[subprocess.Popen] = []
    try:
        def start(command: list[str], name: str) -> subprocess.Popen:
            log = open(folder / f"{name}.log", "wb")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo,
                                       start_new_session=True)
            log.close()
            started.append(process)
            return process
        start(superlink_command(port, None, host="127.0.0.1"), "superlink")
        deadline = time.monotonic() + 60
        while not _listening(port):
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start")
            time.sleep(0.2)
        for site_id in fed.site_ids:
            start(supernode_command(f"127.0.0.1:{port}", fed.site_yaml(site_id), _free_port(), None, None),
                  site_id)
        run = start(flwr_run_command(repo, run_config_argument(fed.config_path, fed.run_dir,
                                                               fed.checkpoint)), "flwr-run")
        run.wait(timeout=timeout)
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
    return _summary(fed)


def run(quick: bool = False) -> dict:
    """Overhead per transport; ``quick`` runs 2 rounds and skips the deployment."""
    import torch

    from experiments.tiny_federation import write_tiny_federation

    torch.set_num_threads(1)
    rounds = 2 if quick else 3
    results: dict = {"sites": SITES, "patients_per_site": PATIENTS, "threads": 1}
    with tempfile.TemporaryDirectory(prefix="fedsynth-overhead-") as tmp:
        base = write_tiny_federation(Path(tmp) / "base", sites=SITES, patients=PATIENTS, rounds=rounds)
        modes = {"loopback": (_loopback, rounds), "simulation": (_simulation, rounds)}
        if not quick:
            modes["deployment"] = (lambda fed: _deployment(fed, Path(tmp) / "deployment"), 2)
        for name, (measure, count) in modes.items():
            fed = write_tiny_federation(Path(tmp) / name, sites=SITES, patients=PATIENTS, rounds=count,
                                        cohort=base.cohort, checkpoint=base.checkpoint, min_sites=SITES)
            try:
                results[name] = measure(fed)
            except Exception as err:  # noqa: BLE001 - one transport failing still reports the others
                results[name] = {"error": f"{type(err).__name__}: {err}"}
    return {"summary": _summary_line(results), **results}


def _summary_line(results: dict) -> str:
    """One line: each transport's overhead in the later rounds and in round 1."""
    def percent(value) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    parts = []
    for name in ("loopback", "simulation", "deployment"):
        found = results.get(name)
        if found is None:
            continue
        if "error" in found:
            parts.append(f"{name} failed")
            continue
        # Loopback runs the sites one after the other: its bound is their sum, not the slowest.
        against, key = (("the sites' summed compute", "overhead_vs_sum") if name == "loopback"
                        else ("the slowest site", "overhead"))
        parts.append(f"{name} {percent(found[key + '_later_rounds'])} beyond {against} "
                     f"(round 1, with start-up: {percent(found[key + '_round_1'])})")
    cause = (" Deployment pays a fresh ClientApp process per message and 3 s polling."
             if "deployment" in results and "error" not in results["deployment"] else "")
    return ("Share of a round's wall time spent outside site compute, later rounds: "
            + "; ".join(parts) + "." + cause)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, no deployment")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
