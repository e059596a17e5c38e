"""``fedsynth evaluate``: quality of a synthetic dataset against real scans."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.device_option import add_device_option, checked_device


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
    add_device_option(parser)
    parser.set_defaults(handler=run)


def _preflight(args: argparse.Namespace) -> None:
    """Refuse bad paths and numbers before torch loads; the synthetic set is checked by
    :func:`experiments.evaluate.check_folders`."""
    from experiments.preflight import PreflightError, check_output_file

    for option, folder in (("--real", args.real), ("--synthetic", args.synthetic)):
        if not folder.is_dir():
            raise PreflightError(f"{option} {folder}: {option[2:]} folder not found; pass a "
                                 f"site-format folder (manifest.csv with patient_id,image,label)")
    if args.out is not None:
        check_output_file(args.out, inputs=(args.real, args.synthetic, args.config,
                                            args.medicalnet_weights))
    if args.seg_steps is not None and not 1 <= args.seg_steps <= 1_000_000:
        raise PreflightError(f"--seg-steps {args.seg_steps}: out of range; pass 1..1000000")
    if args.seed is not None and not 0 <= args.seed <= 2**32 - 1:
        raise PreflightError(f"--seed {args.seed}: out of range; pass 0..4294967295")


def run(args: argparse.Namespace) -> int:
    _preflight(args)
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
        cache_dir=args.cache,
        device=checked_device(args.device) or (config.device if config else None),
        precision=config.precision if config else "fp32")
    print(format_table(result))
    if args.out is not None:
        write_json_atomic(args.out, result.to_json_dict())
        print(f"report written to {args.out}")
    return 0
