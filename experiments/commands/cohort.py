"""``fedsynth cohort``: write the synthetic demo cohort (a public set and N sites)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cohort", help="write the synthetic demo cohort: a public set and one folder per site",
        description="Write a synthetic brain-MRI cohort built from the bundled MNI152 template: "
                    "DIR/public and DIR/site_<k>, each with images/, labels/ and manifest.csv "
                    "(patient_id,image,label,age,sex). Each subject is aged and deformed; each "
                    "site has its own contrast, bias field and noise. Deterministic for a seed; "
                    "rerunning with the same arguments does nothing.")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder to create (must be new, empty, or an earlier cohort)")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--patients", type=int, default=40,
                        help="patients per site; about 20%% have a follow-up scan (default 40)")
    parser.add_argument("--public-patients", type=int, default=None, metavar="N",
                        help="patients in the public cohort (default: --patients)")
    parser.add_argument("--size", type=int, default=32,
                        help="voxels per side, a multiple of 8 >= 16; spacing is 192/size mm "
                             "(default 32: 6 mm)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier cohort in DIR made with other arguments")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from experiments.cohort import generate_cohort

    summary = generate_cohort(args.out, sites=args.sites, patients=args.patients,
                              size=args.size, seed=args.seed,
                              public_patients=args.public_patients, force=args.force)
    print("\n".join(summary.lines()))
    return 0
