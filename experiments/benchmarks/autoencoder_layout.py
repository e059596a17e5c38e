"""The autoencoder's training step in PyTorch's default (channels-first) memory layout against
``channels_last_3d``, the layout pretraining uses on the CPU, in one run.

The step is the demo's recipe (:func:`experiments.benchmarks.ssim_loss._training_step`: MONAI
AutoencoderKL 8-16 channels, L1 + KL + SSIM + FFT, patch discriminator with feature matching
and its own step), batch 2, the same inputs and starting weights in both layouts; median step
time of each.

Run: ``python -m experiments.benchmarks.autoencoder_layout [--quick]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from experiments.benchmarks.ssim_loss import _best_of, _training_step
from models.autoencoder import SeparableSSIMLoss, ssim_window

LAYOUTS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def run(quick: bool = False) -> dict:
    """Time both layouts (16^3 and 3 repeats quick, the demo's 32^3 and 15 otherwise)."""
    size, repeats = (16, 3) if quick else (32, 15)
    ssim = SeparableSSIMLoss(win_size=ssim_window((size,) * 3))
    step = {name: _best_of(_training_step(ssim, size, layout), repeats)
            for name, layout in LAYOUTS.items()}
    first, last = step["channels_first"], step["channels_last"]
    return {
        "summary": f"the demo's autoencoder training step {first / last:.2f}x faster "
                   f"channels-last ({last * 1e3:.0f} ms against {first * 1e3:.0f} ms, batch 2, "
                   f"{size}^3, {torch.get_num_threads()} thread(s)).",
        "image_size": size, "batch": 2, "threads": torch.get_num_threads(),
        "training_step_ms": {name: seconds * 1e3 for name, seconds in step.items()},
        "speedup": first / last,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes, 3 repeats")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
