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


def run(args: argparse.Namespace) -> int:
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
