"""``fedsynth pretrain``: train the autoencoder and the latent UNet on the PUBLIC cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.device_option import add_device_option, with_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain the autoencoder and latent UNet on the public cohort",
        description="Train the autoencoder (always, public data only), compute the latent "
                    "scale factor, then train the latent UNet (unless pretrain.enabled is false) "
                    "on data.public_dir. Each epoch is saved to the run folder, so --resume "
                    "continues an interrupted run. Writes RUN_DIR/checkpoint.pt, previews in "
                    "RUN_DIR/previews, and logs to MLflow (default: sqlite:///RUN_DIR/mlflow.db).")
    parser.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                        help="experiment YAML config")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR",
                        help="run folder (default: the config's run_dir, "
                             "else ./runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the pretraining state saved in the run folder")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    add_device_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from configs import ConfigError, load_config
    from experiments.preflight import (RUN_FOLDER_MARKERS, PreflightError, check_output_folder,
                                       removed_if_failed)

    config = with_device(load_config(args.config), args.device)
    if config.data.public_dir is None:
        raise ConfigError(f"{args.config}: data.public_dir: not set; pretraining needs a public "
                          f"cohort in site format (e.g. `fedsynth cohort` writes <out>/public)")
    run_dir = args.out or config.run_dir or Path("runs") / args.config.stem
    option = "--out" if args.out else "run_dir"
    check_output_folder(run_dir, option=option, own=RUN_FOLDER_MARKERS,
                        inputs=(args.config, config.data.public_dir))
    if args.resume and not (Path(run_dir) / "pretrain_state.pt").exists():
        raise PreflightError(f"--resume: nothing to resume in {run_dir} (no pretrain_state.pt); "
                             f"run without --resume to start pretraining")
    from experiments.pretrain import STATE_FILE, pretrain

    with removed_if_failed(run_dir, keep=(STATE_FILE,)):
        result = pretrain(config, run_dir, resume=args.resume, tracking=not args.no_tracking)
    print(f"checkpoint: {result.checkpoint_path}")
    print(f"sha256:     {result.checkpoint.content_hash}")
    print(f"scale:      {result.checkpoint.latent_scale_factor:.4g} (1 / std of public latents)")
    for preview in result.previews:
        print(f"preview:    {preview}")
    if result.run_id:
        print(f"mlflow:     run {result.run_id} in {result.tracking_uri}")
    return 0
