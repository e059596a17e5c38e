"""Run the federation on one machine with Flower's simulation engine (Ray backend).

Each site of ``federation.sites`` becomes one simulated SuperNode (``partition-id`` = its index)
running the real ClientApp (:mod:`client.client_app`); the real ServerApp (:mod:`server.server_app`)
drives the rounds. Ray runs one ClientApp at a time per CPU core (``client_resources.num_cpus = 1``),
so a 2-core machine trains two sites at once; torch uses one thread per ClientApp.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from configs import Config, load_config
from models.device import resolve_device

log = logging.getLogger(__name__)

# Public scans kept for the server's per-round evaluation.
VALIDATION_SCANS = 4


def prepare_public_validation(config: Config, run_dir: Path) -> Path | None:
    """Write ``<run_dir>/federation/public_validation.pt`` from ``data.public_dir`` (public data only).

    Returns its path, or None when the config names no public cohort.
    """
    from experiments.pretrain import load_public_cohort
    from server.federation import federation_dir
    from server.public_validation import FILE_NAME, PublicValidationSet, save_validation_set

    if config.data.public_dir is None:
        log.warning("data.public_dir is not set: the server will not evaluate the global model")
        return None
    path = federation_dir(run_dir) / FILE_NAME
    if path.exists():
        return path
    cohort = load_public_cohort(config)
    keep = slice(max(0, len(cohort) - VALIDATION_SCANS), len(cohort))
    return save_validation_set(path, PublicValidationSet(cohort.images[keep], cohort.labels[keep],
                                                         cohort.attributes[keep]))


def backend_config(num_sites: int, gpu: bool = False) -> dict:
    """Ray settings for a small machine: one CPU per ClientApp, no dashboard.

    ``gpu``: the simulated sites share this machine's GPU (Ray hides the GPU from an actor that
    asks for none, so each asks for an equal share).
    """
    cpus = max(1, min(os.cpu_count() or 1, num_sites))
    init_args = {"num_cpus": cpus, "include_dashboard": False}
    if gpu:
        init_args["num_gpus"] = 1
    return {"client_resources": {"num_cpus": 1, "num_gpus": 1.0 / num_sites if gpu else 0.0},
            "init_args": init_args}


def simulate(config_path: Path, run_dir: Path | None = None, *, checkpoint: Path | None = None,
             resume: bool = False, tracking: bool = True, run_tags: dict[str, str] | None = None,
             device: str | None = None):
    """Run (or resume) the federation of ``config_path`` in simulation; returns the FederationResult.

    ``run_tags`` are set on a new MLflow run (a sweep nests the federation under its parent run).
    ``device`` overrides the config's device for the server and the simulated sites.

    Raises ``server.federation.FederationError`` (bad input) or ``FederationHalted`` (a round below
    ``federation.min_sites``).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals' machines do not phone home
    from client.client_app import make_client_app
    from flwr.simulation import run_simulation
    from server.federation import FederationError, FederationSettings, preflight
    from server.server_app import default_run_dir, make_server_app

    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    if device is not None:
        config = replace(config, device=device)
    # A GPU run on a machine without one stops here, before Ray starts.
    gpu = resolve_device(config.device).type == "cuda"
    if not config.federation.sites:
        raise FederationError(f"{config_path}: federation.sites is empty; simulation needs one entry per "
                              f"site (see configs/site.example.yaml)")
    run_dir = Path(run_dir) if run_dir else default_run_dir(config_path, config.run_dir)
    settings = FederationSettings(config=config, run_dir=run_dir,
                                  checkpoint=Path(checkpoint) if checkpoint else run_dir / "checkpoint.pt",
                                  resume=resume, tracking=tracking, config_file=config_path,
                                  run_tags=dict(run_tags or {}))
    preflight(settings)   # fail fast, before Ray starts
    prepare_public_validation(config, run_dir)
    results: list = []
    run_simulation(server_app=make_server_app(settings, results.append),
                   client_app=make_client_app(str(config_path), device=device),
                   num_supernodes=len(config.federation.sites), backend_name="ray",
                   backend_config=backend_config(len(config.federation.sites), gpu))
    if not results:
        raise RuntimeError("the simulation ended without a federation result; see the log above")
    result = results[0]
    write_site_reports(config, run_dir, result.run_id, result.tracking_uri)
    return result


def write_site_reports(config: Config, run_dir: Path, run_id: str | None,
                       tracking_uri: str | None) -> list[Path]:
    """Each site's epsilon report (:mod:`privacy.report`, from its OWN ledger) under
    ``federation/reports``, logged to the federation's MLflow run.

    Only possible in simulation, where this process can read every site's ledger; in a deployment each
    site writes its own report (``fedsynth report``).
    """
    from privacy.ledger import LedgerError
    from privacy.report import build_report, plot_png, render_json, render_markdown
    from server.federation import federation_dir

    folder = federation_dir(run_dir) / "reports"
    written: list[Path] = []
    for site in config.federation.sites:
        if not site.ledger_path.exists():
            continue
        try:
            report = build_report(site.ledger_path)
        except LedgerError as err:
            log.warning("%s: no epsilon report (%s)", site.site_id, err)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        plot = folder / f"{site.site_id}_epsilon.png"
        plot.write_bytes(plot_png(report))
        markdown = folder / f"{site.site_id}.md"
        markdown.write_text(render_markdown(report, plot.name))
        data = folder / f"{site.site_id}.json"
        data.write_text(render_json(report))
        written += [markdown, data, plot]
    if run_id and tracking_uri and written:
        from mlflow import MlflowClient
        client = MlflowClient(tracking_uri)
        for path in written:
            client.log_artifact(run_id, str(path), artifact_path="privacy/sites")
    return written
