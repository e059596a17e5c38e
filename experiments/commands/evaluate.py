"""``fedsynth evaluate``: quality of a synthetic dataset against real scans."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.device_option import add_device_option, checked_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="measure a synthetic dataset's quality against real scans",
        description="Compare a synthetic site-format folder with a real one: random-feature FID "
                    "(rf_fid; a seeded random 3D network, not comparable with Inception FID), "
                    "MMD on the volumes, MS-SSIM diversity of the synthetic set, and the "
                    "segmentation utility (a UNet trained on synthetic versus on real pairs, "
                    "both scored by Dice on held-out real patients). Optional 3D FID on "
                    "MedicalNet features from a local weights file. Prints a table and writes "
                    "JSON. Nothing is downloaded.")
    parser.add_argument("--real", required=True, type=Path, metavar="DIR",
                        help="real site-format folder (manifest.csv: patient_id,image,label); "
                             "split by patient into segmenter-train and held-out parts")
    parser.add_argument("--synthetic", required=True, type=Path, metavar="DIR",
                        help="synthetic site-format folder (e.g. a release)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the JSON report here (default: only print the table)")
    parser.add_argument("--seg-steps", type=int, default=None, metavar="N",
                        help="training steps of each segmenter (default 300)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed of the patient split, segmenters and MMD chunking "
                             "(default: the config's seed, else 0)")
    parser.add_argument("--medicalnet-weights", type=Path, metavar="PATH",
                        help="local MedicalNet .pth file: adds medicalnet_fid (never downloaded)")
    parser.add_argument("--config", type=Path, metavar="CONFIG",
                        help="experiment config: label names, data.shape and data.spacing to "
                             "resample both folders to (default: the real folder's own grid)")
    add_device_option(parser)
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
        seed=seed, medicalnet_weights=args.medicalnet_weights,
        device=checked_device(args.device) or (config.device if config else None),
        precision=config.precision if config else "fp32")
    print(format_table(result))
    if args.out is not None:
        write_json_atomic(args.out, result.to_json_dict())
        print(f"report written to {args.out}")
    return 0
