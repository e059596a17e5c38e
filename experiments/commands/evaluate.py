"""``fedsynth evaluate``: quality of a synthetic dataset against real scans."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="measure a synthetic dataset's quality against real scans",
        description="Measure a synthetic site-format folder and four baselines (real held-out "
                    "scans, collapse = mean scan repeated, copy = nearest training scans, "
                    "pretrained-only samples) the same way against held-out real patients: "
                    "feature KID on the encoder of a segmenter trained on the public cohort "
                    "(cached), conditional Dice (that segmenter on each volume vs its map), "
                    "utility Dice (a segmenter trained on the set, tested on the reference), "
                    "MS-SSIM diversity, and random-feature FID as a secondary figure. Optional "
                    "3D FID on MedicalNet features from a local weights file. Prints a table and "
                    "writes JSON. Nothing is downloaded.")
    parser.add_argument("--real", required=True, type=Path, metavar="DIR",
                        help="real site-format folder of patients no site trained on "
                             "(manifest.csv: patient_id,image,label); split by patient into the "
                             "reference and the real baseline")
    parser.add_argument("--synthetic", required=True, type=Path, metavar="DIR",
                        help="synthetic site-format folder (e.g. a release)")
    parser.add_argument("--public", type=Path, metavar="DIR",
                        help="public cohort (site format) the feature/conditional-Dice segmenter "
                             "is trained on (default: the config's data.public_dir)")
    parser.add_argument("--train", type=Path, action="append", default=[], metavar="DIR",
                        help="a training site folder for the collapse and copy baselines "
                             "(repeat per site; default: the real baseline half)")
    parser.add_argument("--pretrained-samples", type=Path, metavar="DIR",
                        help="samples of the pretrained-only model (fedsynth sample) for that "
                             "baseline (default: not measured)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="where the public segmenter is cached (default ~/.cache/fedsynth)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the JSON report here (default: only print the table)")
    parser.add_argument("--seg-steps", type=int, default=None, metavar="N",
                        help="most training steps of each segmenter (early stopping; default "
                             "400)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed of the patient split, segmenters and KID subsets "
                             "(default: the config's seed, else 0)")
    parser.add_argument("--medicalnet-weights", type=Path, metavar="PATH",
                        help="local MedicalNet .pth file: adds medicalnet_fid (never downloaded)")
    parser.add_argument("--config", type=Path, metavar="CONFIG",
                        help="experiment config: label names, data.shape and data.spacing to "
                             "resample both folders to (default: the real folder's own grid)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from configs import load_config
    from experiments.evaluate import (DEFAULT_SEG_STEPS, evaluate_folders, format_table,
                                      write_json_atomic)

    config = load_config(args.config, check_paths=False) if args.config is not None else None
    seed = args.seed if args.seed is not None else (config.seed if config else 0)
    result = evaluate_folders(
        args.real, args.synthetic, config.data if config else None,
        seg_steps=args.seg_steps if args.seg_steps is not None else DEFAULT_SEG_STEPS,
        seed=seed, medicalnet_weights=args.medicalnet_weights, public_dir=args.public,
        train_dirs=tuple(args.train), pretrained_dir=args.pretrained_samples,
        cache_dir=args.cache)
    print(format_table(result))
    if args.out is not None:
        write_json_atomic(args.out, result.to_json_dict())
        print(f"report written to {args.out}")
    return 0
