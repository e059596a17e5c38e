"""Framework overhead per federated round: (round wall time - slowest site's compute) / round wall time.

The same federation runs through three transports, side by side in one run, at two scales:

- ``tiny``: 2 sites of 4 patients, 16^3 volumes, a few-channel model, one DP-SGD step per round
  (a fixed per-round cost dominates any compute here);
- ``realistic``: 2 sites of 40 patients, 32^3 volumes, the demo's model (configs/demo.yaml),
  expected batch 8 and one local epoch per round (5 DP-SGD steps), the scale at which the
  deployment's slowness was reported.

The transports:

- ``loopback``: the ServerApp's round loop calling the ClientApp in this process, one site after
  the other (:class:`experiments.loopback.LoopbackGrid`) - no Flower runtime at all;
- ``simulation``: Flower's simulation engine (Ray actors, one CPU each), as ``fedsynth federate``;
- ``deployment`` (full run only): a real ``flower-superlink`` and one ``flower-supernode`` per site
  on loopback, started with ``flwr run``. Flower 1.41 starts a fresh ``flwr-clientapp`` process for
  every message (no keep-alive), so each round pays starting Python and importing the ClientApp
  (torch, MONAI, Opacus, Flower); a SuperNode asks the SuperLink for messages every 3 s (fixed in
  Flower) and its SuperExec asks the SuperNode for tasks every
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (default 1; set to 0.1 here, as the README
  advises). The sites keep the public weights and their encoded scans on disk between rounds.
- ``deployment_site_exec`` (full run only): the same, but each SuperNode runs in
  ``--isolation process`` with the site's own ``fedsynth site-exec`` (:mod:`client.site_exec`):
  still a fresh process per message, forked from a warm parent that imported everything once.

Where a later round's time goes (``breakdown``, the slowest site, mean over later rounds, seconds):
``startup`` (process start and imports until the ClientApp's handler runs; deployment only),
``decode`` (records to tensors, rebuilding the global model), ``encode`` (loading or encoding the
scans), ``train``, and ``outside`` (deployment: the round's wall time not spent in the site's
process - message delivery, Flower's polling, the reply's way back). ``import_seconds``: a fresh
Python importing the ClientApp, measured alone.

Round wall time is the server's, from sending the instructions to the aggregated weights (the
consortium ledger's ``round`` entries); a site's compute is the time its ClientApp spent on the
round, from the site's LOCAL activity log (``<ledger>.activity.jsonl``, never sent to the server).
Round 1 also pays start-up (Ray actors, imports, encoding each site's scans once), so the overhead
is reported for round 1 and for the later rounds separately. In loopback the sites run one after the
other, so the slowest site is not the bound there; the overhead against the SUM of the sites'
compute is reported too.

Server memory (``memory``): a server process runs one round with 2 and with 20 sites (every site a
real ClientApp in that process, answering when the server pulls, one reply per pull), streaming
and, side by side, the non-streaming way (every reply held, then Flower's ``FedAvg``). ``held``:
how far resident memory rose above its level at the round's first pull, sampled before every pull
(what the server holds between replies); ``peak``: the process's peak RSS (set by transients such
as a site's training, the same at any site count). The denoiser is widened to ~7 MiB so that a
held reply shows.

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

DEMO_MODEL = {"autoencoder": {"kind": "kl", "channels": [8, 16], "latent_channels": 3},
              "unet": {"channels": [16, 32, 32], "attention_levels": [False, False, True],
                       "num_head_channels": 16},
              "conditioning": {"mode": "concat", "attributes": ["age", "sex"], "dropout": 0.1},
              "diffusion": {"train_timesteps": 1000, "sampling_steps": 25,
                            "prediction_type": "v_prediction"}}
# name -> (patients per site, volume size, model section (None: the tiny one), privacy keys)
SCALES = {"tiny": (PATIENTS, 16, None, None),
          "realistic": (40, 32, DEMO_MODEL, {"expected_batch_size": 8,
                                             "max_physical_batch_size": 8})}


def _site_activity(fed) -> dict[int, list[dict]]:
    """Round -> each site's activity-log entry (latest per site and round)."""
    from client.site_runtime import activity_log_path

    per_round: dict[int, dict[str, dict]] = {}
    for site_id in fed.site_ids:
        path = activity_log_path(fed.ledger(site_id))
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            per_round.setdefault(int(entry["round"]), {})[site_id] = entry
    return {r: list(sites.values()) for r, sites in per_round.items()}


def _breakdown(walls: dict[int, float], activity: dict[int, list[dict]], rounds: list[int],
               fresh_process: bool) -> dict:
    """Mean over ``rounds`` of the slowest site's phases (seconds); see the module docstring."""
    phases: dict[str, list[float]] = {}
    for r in rounds:
        slowest = max(activity[r], key=lambda e: e["compute_seconds"])
        found = {"decode": slowest.get("decode_seconds"), "encode": slowest.get("encode_seconds"),
                 "train": slowest.get("train_seconds"), "compute": slowest["compute_seconds"]}
        if fresh_process and "process_started" in slowest:
            found["startup"] = slowest["received"] - slowest["process_started"]
            found["outside"] = walls[r] - (slowest["finished"] - slowest["process_started"])
        for name, value in found.items():
            if value is not None:
                phases.setdefault(name, []).append(float(value))
    return {name: round(statistics.mean(values), 3) for name, values in phases.items()}


def _round_walls(fed) -> dict[int, float]:
    from server.consortium_ledger import ROUND, read_consortium_ledger
    from server.federation import federation_dir

    view = read_consortium_ledger(federation_dir(fed.run_dir) / "consortium_ledger.jsonl")
    return {int(e.payload["round"]): float(e.payload["wall_seconds"]) for e in view.effective(ROUND)
            if e.payload["status"] == "aggregated"}


def _summary(fed, fresh_process: bool = False) -> dict:
    walls, activity = _round_walls(fed), _site_activity(fed)
    compute = {r: [float(e["compute_seconds"]) for e in entries] for r, entries in activity.items()}
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
        "breakdown_later_rounds": _breakdown(walls, activity, later, fresh_process) if later else {},
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


def _deployment(fed, folder: Path, timeout: float = 1200.0, site_exec: bool = False) -> dict:
    """``site_exec``: SuperNodes in ``--isolation process``, each with ``fedsynth site-exec``
    (warm ClientApp processes, approving the FAB ``flwr run`` submits) instead of Flower's
    SuperExec."""
    from experiments.deployment import (app_fab_hash, flwr_run_command, run_config_argument,
                                        site_exec_command, superlink_command, supernode_command,
                                        write_flower_config)
    from configs import load_config
    from experiments.federate import prepare_public_validation

    prepare_public_validation(load_config(fed.config_path), fed.run_dir)
    env = {**os.environ, "FLWR_HOME": str(folder / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_SECONDS),
           # One thread per site, as the simulation's Ray actors (1 CPU each) and loopback.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
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
        approved = app_fab_hash(repo) if site_exec else None
        for site_id in fed.site_ids:
            runtime_port = _free_port()
            start(supernode_command(f"127.0.0.1:{port}", fed.site_yaml(site_id), runtime_port, None,
                                    None, site_exec=site_exec), site_id)
            if site_exec:
                while not _listening(runtime_port):
                    if time.monotonic() > deadline + 60:
                        raise RuntimeError(f"the SuperNode of {site_id} did not start")
                    time.sleep(0.2)
                start(site_exec_command(runtime_port, approved), f"{site_id}-exec")
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
    return _summary(fed, fresh_process=True)


SUPEREXEC_POLL_SECONDS = 0.1


def import_seconds() -> float:
    """Wall time of a fresh Python that imports Flower's ClientApp runtime and fedsynth's
    ClientApp: the fixed cost every deployment round pays once per site (the median of 3)."""
    command = [sys.executable, "-c", "import flwr.clientapp, client.client_app"]
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


MEMORY_UNET_CHANNELS = [32, 64]   # a ~7 MiB denoiser: big enough that a held reply shows


def record_replies(config_path: Path, checkpoint: Path, run_dir: Path, folder: Path) -> None:
    """Run round 1 of the federation with every site in this process; save each site's reply
    content to ``folder/<node>.pkl`` (the sites' real replies, replayed by :func:`memory_probe`)."""
    import pickle

    import torch

    from client.client_app import make_client_app
    from configs import load_config
    from experiments.loopback import LoopbackGrid
    from server.federation import FederationSettings, run_federation

    torch.set_num_threads(1)
    config = load_config(config_path)
    sites = len(config.federation.sites)
    folder.mkdir(parents=True, exist_ok=True)

    class Recording(LoopbackGrid):
        def deliver(self, message):
            reply = super().deliver(message)
            (folder / f"{message.metadata.dst_node_id}.pkl").write_bytes(pickle.dumps(reply.content))
            return reply

    grid = Recording(make_client_app(str(config_path)),
                     [{"partition-id": k, "num-partitions": sites} for k in range(sites)])
    run_federation(grid, FederationSettings(config, run_dir, checkpoint, tracking=False,
                                            evaluate=False))


class _ReplayGrid:
    """Mixin for :class:`experiments.loopback.LoopbackGrid`: each node answers with its recorded
    reply, read from disk when the server pulls, one per pull. No site code runs in the server's
    process, so its memory is the server's own."""

    replies: Path

    def push_messages(self, messages):
        import uuid
        ids = []
        self._pending = getattr(self, "_pending", {})
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        import pickle

        from flwr.app import Message
        for message_id in list(message_ids):
            if message_id in self._pending:
                message = self._pending.pop(message_id)
                path = self.replies / f"{message.metadata.dst_node_id}.pkl"
                return [Message(pickle.loads(path.read_bytes()), reply_to=message)]
        return []


def _hold_every_reply(grid, strategy, ledger, messages, server_round, timeout):
    """The baseline: hold every reply of the round, then aggregate with Flower's FedAvg."""
    from server.messaging import ReplyStream
    from server.strategy import RoundReplies

    replies = [reply for _, reply in ReplyStream(grid, messages, timeout)]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    outcome = strategy.last_round or RoundReplies(server_round)
    for node, reply in outcome.accepted + outcome.declined:
        ledger.record_site(server_round, node, reply)
    return outcome, None if aggregated is None else aggregated.to_torch_state_dict(), 0


def memory_probe(config_path: Path, checkpoint: Path, run_dir: Path, replies: Path,
                 mode: str) -> dict:
    """Round 1 of ``config_path`` served from ``replies``, in THIS process; its memory (MiB)."""
    import resource

    import torch

    from configs import load_config
    from experiments.loopback import LoopbackGrid
    from server import federation
    from server.federation import FederationSettings, run_federation

    torch.set_num_threads(1)
    config = load_config(config_path)
    sites = len(config.federation.sites)
    grid_class = type("ReplayGrid", (_ReplayGrid, LoopbackGrid), {"replies": replies})
    grid = grid_class(None, [{"partition-id": k} for k in range(sites)])
    if mode == "hold":
        federation._stream_round = _hold_every_reply
    # Resident memory right before each pull: what the server holds between replies.
    samples: list[float] = []
    pull = grid.pull_messages

    def sampled_pull(message_ids):
        samples.append(_current_rss_mib())
        return pull(message_ids)

    grid.pull_messages = sampled_pull
    result = run_federation(grid, FederationSettings(config, run_dir, checkpoint, tracking=False,
                                                     evaluate=False))
    assert result.rounds_completed == 1 and len(result.rounds[0].participants) == sites
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = sum(t.numel() * t.element_size()
                for t in torch.load(checkpoint, weights_only=False)["denoiser"].values())
    return {"sites": sites, "mode": mode, "peak_rss_mib": round(peak, 1),
            "held_rss_growth_mib": round(max(samples) - samples[0], 1),
            "denoiser_mib": round(model / 2 ** 20, 2)}


def _current_rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _python(*arguments: str) -> str:
    """``python -m experiments.benchmarks.federation_overhead ARGUMENTS`` in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "experiments.benchmarks.federation_overhead",
                           *arguments], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.stdout


def _memory(folder: Path, counts: tuple[int, ...] = (2, 20)) -> dict:
    """Server memory per (sites, mode), side by side, each in a fresh process."""
    from experiments.tiny_federation import write_tiny_federation

    big = write_tiny_federation(folder / "cohort", sites=max(counts), patients=PATIENTS, rounds=1,
                                unet_channels=MEMORY_UNET_CHANNELS)
    results: dict = {}
    for count in counts:
        recorded = write_tiny_federation(folder / f"recorded_{count}", sites=count,
                                         patients=PATIENTS, rounds=1, min_sites=count,
                                         cohort=big.cohort, checkpoint=big.checkpoint,
                                         unet_channels=MEMORY_UNET_CHANNELS)
        replies = folder / f"replies_{count}"
        _python("--record-replies", str(recorded.config_path), "--checkpoint",
                str(recorded.checkpoint), "--run-dir", str(recorded.run_dir), "--replies",
                str(replies))
        for mode in ("streaming", "hold"):
            run_dir = folder / f"{mode}_{count}"
            found = json.loads(_python(
                "--memory-probe", str(recorded.config_path), "--checkpoint",
                str(recorded.checkpoint), "--run-dir", str(run_dir), "--replies", str(replies),
                "--mode", mode).strip().splitlines()[-1])
            results[f"{mode}_{count}_sites_peak_rss_mib"] = found["peak_rss_mib"]
            results[f"{mode}_{count}_sites_held_mib"] = found["held_rss_growth_mib"]
            results["denoiser_mib"] = found["denoiser_mib"]
    return results


def run_scale(name: str, folder: Path, quick: bool = False) -> dict:
    """Overhead per transport at scale ``name`` (:data:`SCALES`), side by side."""
    from experiments.tiny_federation import write_tiny_federation

    patients, size, model, privacy = SCALES[name]
    rounds = 2 if quick else 3
    shape = {"patients": patients, "size": size, "model": model, "privacy": privacy}
    base = write_tiny_federation(folder / "base", sites=SITES, rounds=rounds, **shape)
    results: dict = {"sites": SITES, "patients_per_site": patients, "volume": f"{size}^3"}
    modes = {"loopback": _loopback, "simulation": _simulation}
    if not quick:
        modes["deployment"] = lambda fed: _deployment(fed, folder / "deployment")
        modes["deployment_site_exec"] = lambda fed: _deployment(fed, folder / "deployment_site_exec",
                                                                site_exec=True)
    for mode, measure in modes.items():
        fed = write_tiny_federation(folder / mode, sites=SITES, rounds=rounds, cohort=base.cohort,
                                    checkpoint=base.checkpoint, min_sites=SITES, **shape)
        try:
            results[mode] = measure(fed)
        except Exception as err:  # noqa: BLE001 - one transport failing still reports the others
            results[mode] = {"error": f"{type(err).__name__}: {err}"}
    return results


def run(quick: bool = False, scales: tuple[str, ...] = tuple(SCALES)) -> dict:
    """Overhead per transport at each scale and server memory; ``quick`` runs 2 rounds of the
    tiny scale only and skips the deployment and the memory measurement."""
    import torch

    torch.set_num_threads(1)
    scales = ("tiny",) if quick else scales
    results: dict = {"threads": 1, "import_seconds": import_seconds(),
                     "superexec_poll_seconds": SUPEREXEC_POLL_SECONDS}
    with tempfile.TemporaryDirectory(prefix="fedsynth-overhead-") as tmp:
        for name in scales:
            results[name] = run_scale(name, Path(tmp) / name, quick)
        if not quick:
            results["memory"] = _memory(Path(tmp) / "memory")
    return {"summary": _summary_line(results), **results}


def _summary_line(results: dict) -> str:
    """One line: per scale, each transport's overhead in the later rounds and in round 1."""
    def percent(value) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    lines = []
    for scale in SCALES:
        if scale not in results:
            continue
        parts = []
        for name in ("loopback", "simulation", "deployment", "deployment_site_exec"):
            found = results[scale].get(name)
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
        lines.append(f"{scale} ({results[scale]['patients_per_site']} patients per site, "
                     f"{results[scale]['volume']}): " + "; ".join(parts))
    fixed = (f" A fresh Python importing the ClientApp takes {results['import_seconds']:.1f} s: "
             "Flower 1.41 pays it once per site and round (a new process per message)."
             if "import_seconds" in results else "")
    memory = results.get("memory", {})
    peak = (f" Server memory held during a round ({memory.get('denoiser_mib')} MiB denoiser): "
            f"streaming {memory.get('streaming_2_sites_held_mib')} MiB with 2 sites, "
            f"{memory.get('streaming_20_sites_held_mib')} MiB with 20; holding every reply: "
            f"{memory.get('hold_2_sites_held_mib')} / {memory.get('hold_20_sites_held_mib')} MiB."
            ) if memory else ""
    return ("Share of a round's wall time spent outside site compute, later rounds. "
            + ". ".join(lines) + "." + fixed + peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, tiny scale, no deployment")
    parser.add_argument("--scale", choices=tuple(SCALES), action="append",
                        help="only this scale (repeatable); default: all")
    parser.add_argument("--memory", action="store_true",
                        help="only the server-memory measurement (2 vs 20 sites)")
    parser.add_argument("--memory-probe", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--record-replies", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--replies", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("streaming", "hold"), default="streaming",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record_replies:
        record_replies(args.record_replies, args.checkpoint, args.run_dir, args.replies)
        return
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.checkpoint, args.run_dir,
                                      args.replies, args.mode)))
        return
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="fedsynth-memory-") as tmp:
            print(json.dumps(_memory(Path(tmp)), indent=2))
        return
    print(json.dumps(run(args.quick, tuple(args.scale or SCALES)), indent=2))


if __name__ == "__main__":
    main()
