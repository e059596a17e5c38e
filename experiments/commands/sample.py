"""``fedsynth sample``: synthetic volumes following given semantic maps, as a site-format folder.

The work is :func:`experiments.sampling.sample_folder` (its docstring describes the mask folder
and the output); this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.device_option import add_device_option, checked_device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value})")
    if value > 100_000:
        raise argparse.ArgumentTypeError(f"must be at most 100000 (got {value})")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (got {text!r})") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 100 (got {text})")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", help="generate synthetic volumes from a checkpoint and semantic maps",
        description="Generate NUM volumes with a checkpoint, each conditioned on a map from MASKS "
                    "(cycled in order). Writes NIfTI images carrying their map's affine, label "
                    "copies, a site-format manifest.csv and preview.png to OUT. Bad input exits 2.")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="CK",
                        help="model checkpoint (.pt)")
    parser.add_argument("--masks", type=Path, required=True, metavar="DIR",
                        help="site-format folder with a manifest (label column), or a folder of "
                             "label NIfTI files")
    parser.add_argument("--num", type=_positive_int, required=True, metavar="N",
                        help="volumes to generate")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="new (or empty) output folder")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--guidance", type=_non_negative_float, metavar="G",
                        help="classifier-free guidance scale (default: the checkpoint's; "
                             "1 = plain conditional)")
    parser.add_argument("--steps", type=_positive_int, metavar="K",
                        help="DDIM steps (default: the checkpoint's diffusion.sampling_steps)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, metavar="B",
                        help="volumes per forward pass (default 4); results do not depend on it")
    add_device_option(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) | bf16 autocast for sampling and decoding")
    parser.set_defaults(handler=run)


def _preflight(args: argparse.Namespace) -> None:
    """Refuse bad paths before torch loads (and before anything is written)."""
    from experiments.preflight import PreflightError, check_output_folder

    if not args.checkpoint.is_file():
        raise PreflightError(f"--checkpoint {args.checkpoint}: not found; pass the .pt file "
                             f"`fedsynth pretrain` or `fedsynth federate` wrote")
    if not args.masks.is_dir():
        raise PreflightError(f"--masks {args.masks}: folder not found; pass a site-format folder "
                             f"or a folder of label NIfTI files")
    if not 0 <= args.seed <= 2**32 - 1:
        raise PreflightError(f"--seed {args.seed}: out of range; pass 0..4294967295")
    check_output_folder(args.out, inputs=(args.checkpoint, args.masks))


def run(args: argparse.Namespace) -> int:
    _preflight(args)
    from experiments.sampling import SampleInputError, sample_folder

    try:
        result = sample_folder(args.checkpoint, args.masks, args.num, args.out, seed=args.seed,
                               guidance=args.guidance, steps=args.steps,
                               batch_size=args.batch_size, device=checked_device(args.device),
                               precision=args.precision)
    except SampleInputError as err:
        print(f"fedsynth sample: error: {err}", file=sys.stderr)
        return 2
    print(f"{result.num} volumes from {result.maps} map(s) -> {result.out}")
    print(f"model:    sha256 {result.checkpoint_sha256}")
    print(f"sampling: {result.steps} DDIM steps, guidance {result.guidance:g}, seed {result.seed}")
    print(f"manifest: {result.out / 'manifest.csv'}")
    print(f"preview:  {result.out / 'preview.png'}")
    return 0
