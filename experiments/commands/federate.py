"""``fedsynth federate``: DP federated fine-tuning of the pretrained model, simulated on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.device_option import add_device_option, checked_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "federate", help="federated DP fine-tuning across the sites (Flower simulation)",
        description="Run the federation of CONFIG with Flower's simulation engine: one simulated "
                    "SuperNode per entry of federation.sites, each fine-tuning the pretrained model "
                    "with DP-SGD under its own budget and ledger. Writes RUN_DIR/federation/ "
                    "(state.json, per-round checkpoints, consortium_ledger.jsonl, checkpoint.pt, "
                    "epsilon_by_site.json, previews) and logs to MLflow. --resume continues from the "
                    "last finished round. For a real deployment see `fedsynth deploy`.")
    parser.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                        help="experiment YAML config")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR",
                        help="run folder (default: the config's run_dir, else ./runs/<config name>)")
    parser.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="pretrained checkpoint to start from (default: RUN_DIR/checkpoint.pt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the federation saved in the run folder")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    add_device_option(parser)
    parser.set_defaults(handler=run)


def _preflight(args: argparse.Namespace) -> None:
    """Refuse bad input before Flower, Ray or torch start (and before anything is written)."""
    from configs import ConfigError, load_config
    from experiments.preflight import RUN_FOLDER_MARKERS, PreflightError, check_output_folder

    config = load_config(args.config)
    if not config.federation.sites:
        raise ConfigError(f"{args.config}: federation.sites is empty; simulation needs one entry "
                          f"per site (see configs/site.example.yaml)")
    run_dir = args.out or config.run_dir or Path("runs") / args.config.stem
    inputs = [args.config, config.data.public_dir, *(s.data_dir for s in config.federation.sites)]
    check_output_folder(run_dir, option="--out" if args.out else "run_dir",
                        own=RUN_FOLDER_MARKERS, inputs=inputs)
    state = Path(run_dir) / "federation" / "state.json"
    if args.resume and not state.exists():
        raise PreflightError(f"--resume: nothing to resume in {run_dir} (no federation/state.json);"
                             f" run without --resume to start a new federation")
    checkpoint = args.checkpoint or Path(run_dir) / "checkpoint.pt"
    if not args.resume and not Path(checkpoint).is_file():
        where = "--checkpoint" if args.checkpoint else "the run folder's checkpoint"
        raise PreflightError(f"{where} {checkpoint}: checkpoint not found; run "
                            f"`fedsynth pretrain` first or pass --checkpoint FILE")


def run(args: argparse.Namespace) -> int:
    _preflight(args)
    from experiments.federate import simulate
    from server.federation import FederationHalted

    try:
        result = simulate(args.config, args.out, checkpoint=args.checkpoint, resume=args.resume,
                          tracking=not args.no_tracking, device=checked_device(args.device))
    except FederationHalted as err:
        print(f"fedsynth federate: halted: {err}", file=sys.stderr)
        return 1
    for summary in result.rounds:
        line = f"round {summary.round}: trained {', '.join(summary.participants)}"
        if summary.declined:
            line += "; declined " + ", ".join(f"{k} ({v})" for k, v in summary.declined.items())
        if summary.failed:
            line += "; failed " + ", ".join(summary.failed)
        if "val/diffusion_loss" in summary.metrics:
            line += f"; public val loss {summary.metrics['val/diffusion_loss']:.4f}"
        print(line)
    print(f"stopped:    {result.stop_reason} ({result.rounds_completed} round(s))")
    if result.final_checkpoint:
        print(f"checkpoint: {result.final_checkpoint}")
    print(f"ledger:     {result.consortium_ledger}")
    if result.run_id:
        print(f"mlflow:     run {result.run_id} in {result.tracking_uri}")
    return 0
