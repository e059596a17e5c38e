"""``fedsynth sweep FILE``: a privacy/quality sweep, one nested MLflow run per setting."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="sweep privacy/quality settings as nested MLflow runs",
        description="Run every setting of a sweep file (a grid and/or a list over epsilon, "
                    "clipping norm, noise multiplicity, trainable subset, pretraining and model "
                    "size): public pretraining (shared where possible), federated fine-tuning in "
                    "simulation, then quality against a held-out reference. Each setting is a "
                    "nested MLflow run under one parent run; the parent gets summary.csv, "
                    "summary.md and tradeoff.png. Run again, it skips finished settings and "
                    "resumes an interrupted one. See experiments/sweep.py for the file format.")
    parser.add_argument("file", type=Path, metavar="SWEEP.yaml",
                        help="sweep file, e.g. experiments/sweeps/privacy_quality.yaml")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="sweep folder (default: the file's out, else runs/sweeps/<name>)")
    parser.add_argument("--list", action="store_true",
                        help="validate the file and list its settings without running them")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from experiments.sweep import format_summary, load_sweep, run_sweep

    if args.list:
        plan = load_sweep(args.file, args.out)
        print(f"sweep {plan.name}: {len(plan.settings)} settings -> {plan.out}")
        for number, setting in enumerate(plan.settings, 1):
            print(f"  [{number}] {setting.name}")
        return 0
    print(format_summary(run_sweep(args.file, out=args.out)))
    return 0
