"""``fedsynth release``: sample a synthetic dataset, gate every candidate at every site, write the
passes; and ``fedsynth audit memorization`` (registered by ``experiments.commands.audit``).

The release runs :mod:`server.release` with Flower's simulation engine: one simulated SuperNode
per entry of ``federation.sites`` answers the gate queries with the real ClientApp. The conditions
are the PUBLIC cohort's label maps (``data.public_dir``, preprocessed like every site's data).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.device_option import add_device_option, with_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "release", help="sample, gate at every site, and write a synthetic dataset",
        description="Sample N synthetic volumes from the final global checkpoint, conditioned on "
                    "the public cohort's (deformed) label maps; send every candidate to every "
                    "site, which answers pass/fail by the distance to its nearest scan "
                    "(release.distance, release.threshold); keep only candidates that every site "
                    "passed, resampling rejected ones up to release.max_attempts. Writes "
                    "OUT/images, OUT/labels, OUT/manifest.csv, OUT/preview.png and "
                    "OUT/release_report.{json,md}. Running it again with the same OUT resumes an "
                    "interrupted release. Bad input exits 2; a site that fails or refuses exits 1.")
    parser.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                        help="experiment YAML config")
    parser.add_argument("--num", type=int, required=True, metavar="N",
                        help="samples to release (N > 0)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (new, or the folder of a release to resume)")
    parser.add_argument("--checkpoint", type=Path, metavar="CK",
                        help="model checkpoint (default: RUN_DIR/federation/checkpoint.pt, the "
                             "federation's final global model)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B",
                        help="volumes per sampling pass (default 4); results do not depend on it")
    add_device_option(parser)
    parser.set_defaults(handler=run)


def load_public_maps(config, grid):
    """The public cohort's label maps on ``config.data``'s grid, with the model's attributes."""
    import torch

    from client.site_data import load_site
    from server.release import PublicMaps, ReleaseError

    if config.data.public_dir is None:
        raise ReleaseError("data.public_dir: not set; the release conditions on the PUBLIC "
                           "cohort's label maps - point it at a site-format folder (e.g. "
                           "`fedsynth cohort` writes <out>/public)")
    dataset = load_site(Path(config.data.public_dir), config.data, config.data.manifest,
                        grid.attributes)
    items = [dataset[i] for i in range(len(dataset))]
    return PublicMaps(
        labels=torch.stack([item["label"].argmax(0).to(torch.uint8) for item in items]),
        affines=torch.stack([item["affine"].to(torch.float64) for item in items]),
        attributes=torch.stack([item["attributes"].float() for item in items]).reshape(
            len(items), -1),
        names=[f"{r.patient_id}:{r.label.name}" for r in dataset.records])


def simulate_release(config_path: Path, plan):
    """Run ``plan`` in Flower's simulation engine (one SuperNode per site); the ReleaseResult."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from experiments.federate import backend_config
    from models.device import resolve_device
    from server.release import make_release_app

    results, errors = [], []
    sites = len(plan.config.federation.sites)
    run_simulation(server_app=make_release_app(plan, results.append, errors.append),
                   client_app=make_client_app(str(Path(config_path).resolve()),
                                              device=plan.config.device),
                   num_supernodes=sites, backend_name="ray",
                   backend_config=backend_config(sites, resolve_device(plan.config.device).type
                                                 == "cuda"))
    if errors:
        raise errors[0]
    if not results:
        raise RuntimeError("the release simulation ended without a result; see the log above")
    return results[0]


def _preflight(args: argparse.Namespace) -> None:
    """Refuse bad input before torch, Flower or Ray load (and before anything is written)."""
    from configs import ConfigError, load_config
    from experiments.preflight import PreflightError, check_output_folder

    if args.num < 1 or args.num > 100_000:
        raise PreflightError(f"--num: must be a whole number > 0 and at most 100000 (got "
                             f"{args.num}); ask for at least one sample")
    if args.batch_size < 1 or args.batch_size > 4096:
        raise PreflightError(f"--batch-size {args.batch_size}: out of range; pass 1..4096")
    config = load_config(args.config)
    if not config.federation.sites:
        raise ConfigError(f"{args.config}: federation.sites is empty; every site must gate the "
                          f"release, list one entry per site")
    inputs = [args.config, config.data.public_dir, *(s.data_dir for s in config.federation.sites)]
    check_output_folder(args.out, own=("release_state.json",), inputs=inputs)
    run_dir = config.run_dir or Path("runs") / args.config.stem
    checkpoint = args.checkpoint or Path(run_dir) / "federation" / "checkpoint.pt"
    if not Path(checkpoint).is_file():
        where = "--checkpoint" if args.checkpoint else "the federation's final checkpoint"
        raise PreflightError(f"{where} {checkpoint}: checkpoint not found; run "
                            f"`fedsynth federate` first or pass --checkpoint FILE")


def run(args: argparse.Namespace) -> int:
    _preflight(args)
    from configs import load_config
    from models.checkpoint import CheckpointError, load_checkpoint
    from models.device import resolve_device
    from server.federation import FINAL_CHECKPOINT, federation_dir
    from server.release import ReleaseError, ReleaseHalted, check_num, prepare_release
    from server.server_app import default_run_dir

    check_num(args.num)
    config = with_device(load_config(args.config), args.device)
    resolve_device(config.device)  # a GPU run on a machine without one stops here
    if not config.federation.sites:
        raise ReleaseError(f"{args.config}: federation.sites is empty; every site must gate the "
                           f"release, list one entry per site")
    run_dir = default_run_dir(args.config, config.run_dir)
    checkpoint_path = args.checkpoint or federation_dir(run_dir) / FINAL_CHECKPOINT
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as err:
        raise ReleaseError(str(err)) from None
    maps = load_public_maps(config, checkpoint.data)
    plan = prepare_release(config, checkpoint, maps, args.num, args.out,
                           checkpoint_path=checkpoint_path, run_dir=run_dir,
                           batch_size=args.batch_size)
    try:
        result = simulate_release(args.config, plan)
    except ReleaseHalted as err:
        print(f"fedsynth release: halted: {err}", file=sys.stderr)
        return 1
    print(f"released:   {result.released} of {result.requested} ({result.candidates} "
          f"candidate(s) gated, {result.rejections} rejected, {result.exhausted} slot(s) out of "
          f"attempts)")
    print(f"model:      {checkpoint.content_hash}")
    print(f"manifest:   {result.manifest}")
    print(f"report:     {result.report_markdown}")
    return 0


def add_memorization_action(actions: argparse._SubParsersAction) -> None:
    """``fedsynth audit memorization`` (registered by ``experiments.commands.audit``)."""
    memorization = actions.add_parser(
        "memorization",
        help="at a site: are synthetic samples closer to its scans than new patients are?",
        description="Run AT a site, on its own data (DCR-style). Compares each synthetic "
                    "sample's distance to the site's nearest scan with each real patient's "
                    "distance to the nearest OTHER patient (every patient held out in turn), in "
                    "the gate's distance space. Writes memorization_audit.json and "
                    "memorization_audit.png to OUT (site-private: exact distances). Exit 1 when "
                    "the synthetic samples are significantly closer (one-sided Mann-Whitney "
                    "p < 0.01) or any sample is a near copy; 0 otherwise; 2 on bad input.")
    memorization.add_argument("--synthetic", type=Path, required=True, metavar="DIR",
                              help="a release folder (manifest.csv with an image column)")
    memorization.add_argument("--checkpoint", type=Path, required=True, metavar="CK",
                              help="the checkpoint the samples came from (grid, public encoder)")
    memorization.add_argument("--out", type=Path, required=True, metavar="DIR",
                              help="where to write the audit")
    where = memorization.add_mutually_exclusive_group(required=True)
    where.add_argument("--site-config", type=Path, metavar="FILE",
                       help="the site's own YAML (deployment)")
    where.add_argument("--config", type=Path, metavar="CONFIG",
                       help="an experiment config listing the site in federation.sites "
                            "(with --site)")
    memorization.add_argument("--site", metavar="SITE_ID", help="the site's id in --config")
    memorization.add_argument("--distance", choices=("latent", "nrmse", "ssim"),
                              help="distance space (default: release.distance of --config, "
                                   "else latent)")
    memorization.add_argument("--max-shift", type=int, metavar="K",
                              help="shift tolerance in voxels (default: release.max_shift, else 1)")
    memorization.set_defaults(handler=_memorization)


def _memorization(args: argparse.Namespace) -> int:
    from client.memorization import MemorizationAuditError, audit_memorization, write_audit
    from configs import load_config, load_site_config
    from configs.schema import DataConfig, ReleaseConfig
    from models.checkpoint import load_checkpoint

    if args.config is not None:
        config = load_config(args.config)
        matches = [s for s in config.federation.sites if s.site_id == args.site]
        if not matches:
            known = ", ".join(s.site_id for s in config.federation.sites) or "none"
            raise MemorizationAuditError(f"{args.config}: --site {args.site!r} is not in "
                                         f"federation.sites (known: {known}); pass one of them")
        site, release, data = matches[0], config.release, config.data
    else:
        site, release, data = load_site_config(args.site_config), ReleaseConfig(), DataConfig()
    max_shift = release.max_shift if args.max_shift is None else args.max_shift
    if not 0 <= max_shift <= 4:
        raise MemorizationAuditError(f"--max-shift: must be in 0..4 voxels (got {max_shift})")
    from experiments.preflight import check_output_folder

    check_output_folder(args.out, own=("memorization_audit.json",),
                        inputs=(args.synthetic, args.checkpoint, site.data_dir))
    audit = audit_memorization(site, args.synthetic, load_checkpoint(args.checkpoint),
                               distance=args.distance or release.distance, max_shift=max_shift,
                               chunk_size=release.chunk_size,
                               intensity_percentiles=tuple(data.intensity_percentiles))
    summary_path, histogram_path = write_audit(audit, args.out)
    synthetic, heldout = audit.synthetic_summary, audit.heldout_summary
    print(f"{audit.site_id}: {audit.num_synthetic} synthetic sample(s) vs {audit.num_scans} "
          f"scan(s) of {audit.num_patients} patient(s), {audit.distance} distance "
          f"(shift <= {audit.max_shift})")
    print(f"  synthetic -> nearest scan:  median {synthetic['median']:.4f}, "
          f"min {synthetic['min']:.4f}")
    print(f"  held-out -> other patients: median {heldout['median']:.4f}, "
          f"5th percentile {audit.heldout_p5:.4f}")
    print(f"  below the held-out 5th percentile: {audit.fraction_below_heldout_p5:.1%} of "
          f"synthetic samples; near copies: {', '.join(audit.near_copies) or 'none'}; "
          f"Mann-Whitney p = {audit.mann_whitney_p:.3g}")
    verdict = "PROBLEM: samples are closer to this site than its own patients are to each other" \
        if audit.problem else "ok"
    print(f"  {verdict}")
    print(f"summary:   {summary_path}")
    print(f"histogram: {histogram_path}")
    return 1 if audit.problem else 0
