"""``fedsynth demo``: the whole pipeline on the demo cohort, reusing finished stages."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a generated demo cohort",
        description="Generate the demo cohort (public set + sites), check it, pretrain on the "
                    "public set, fine-tune with DP-SGD across the sites (Flower simulation), "
                    "release a synthetic set behind the sites' gate, evaluate its quality "
                    "and four baselines against held-out patients no site trained on, and "
                    "print where everything is. Run again, it reuses finished stages and "
                    "resumes an interrupted one.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="CONFIG",
                        help="demo config (default: configs/demo.yaml)")
    parser.add_argument("--patients", type=int, default=40,
                        help="patients per site in the generated cohort (default 40)")
    parser.add_argument("--public-patients", type=int, default=40,
                        help="patients in the public cohort (default 40)")
    parser.add_argument("--seg-steps", type=int, default=None,
                        help="most training steps of each quality segmenter (early stopping; "
                             "default 250, to fit the demo's time budget; fedsynth evaluate "
                             "defaults to 400)")
    parser.set_defaults(handler=run)


def _preflight(args: argparse.Namespace) -> None:
    """Refuse a bad config or number before torch, Flower or Ray load."""
    from configs import load_config
    from experiments.preflight import PreflightError

    load_config(args.config, check_paths=False)
    for option, value, low in (("--patients", args.patients, 2),
                               ("--public-patients", args.public_patients, 2),
                               ("--seg-steps", args.seg_steps, 1)):
        if value is not None and not low <= value <= 10_000:
            raise PreflightError(f"{option} {value}: out of range; pass {low}..10000")


def run(args: argparse.Namespace) -> int:
    _preflight(args)
    from experiments.demo import format_summary, run_demo

    summary = run_demo(args.config, patients=args.patients,
                       public_patients=args.public_patients, seg_steps=args.seg_steps)
    print(format_summary(summary))
    return 0
