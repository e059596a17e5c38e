"""The autoencoder's SSIM term: MONAI's ``SSIMLoss`` (one convolution with the full 7^3
Gaussian window), the same window as three one-channel ``conv3d`` passes (the previous
implementation), and :class:`~models.autoencoder.SeparableSSIMLoss` (three passes of weighted
shifted slices), in one run.

Two measurements, each arm timed on the same inputs (median of the repeats): the SSIM term alone (forward
and backward, batch 2), and a whole autoencoder training step of the demo's recipe (MONAI
AutoencoderKL 8-16 channels, L1 + KL + SSIM + FFT, patch discriminator with feature matching
and its own step), which is where pretraining spends its time. Also reported: the largest
difference between MONAI's loss and either other arm's.

Run: ``python -m experiments.benchmarks.ssim_loss [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from monai.losses import SSIMLoss

from models.autoencoder import (AutoencoderLoss, SeparableSSIMLoss, build_autoencoder,
                                build_discriminator, reconstruct, ssim_window)

DEMO_AUTOENCODER = {"kind": "kl", "channels": [8, 16], "latent_channels": 3, "num_res_blocks": 1,
                    "attention_levels": [False, False], "norm_num_groups": 8}


class ConvPassesSSIMLoss(SeparableSSIMLoss):
    """:class:`SeparableSSIMLoss` with each 1-D pass as a one-channel ``conv3d`` (as before
    2026-12-03): the same sums, in oneDNN's convolution."""

    def _blur(self, volumes: torch.Tensor) -> torch.Tensor:
        window = self.window.to(volumes.dtype)
        side = self.win_size
        for shape in ((side, 1, 1), (1, side, 1), (1, 1, side)):
            volumes = torch.nn.functional.conv3d(volumes, window.view(1, 1, *shape))
        return volumes


def _best_of(function: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _training_step(ssim: torch.nn.Module, size: int,
                   layout: torch.memory_format = torch.contiguous_format) -> Callable[[], None]:
    """One training step of the demo's autoencoder and discriminator, in memory ``layout``."""
    torch.manual_seed(0)
    autoencoder = build_autoencoder(DEMO_AUTOENCODER).to(memory_format=layout)
    discriminator = build_discriminator(DEMO_AUTOENCODER, (size,) * 3,
                                        norm="instance").to(memory_format=layout)
    losses = AutoencoderLoss(0.02, 1e-6, feature_matching_weight=0.1, ssim_weight=0.3,
                             fft_weight=0.1, image_shape=(size,) * 3)
    losses.ssim = ssim
    optimizers = (torch.optim.Adam(autoencoder.parameters(), 2e-3),
                  torch.optim.Adam(discriminator.parameters(), 2e-3))
    images = torch.rand(2, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    images = images.contiguous(memory_format=layout)
    generator = torch.Generator().manual_seed(2)

    def step() -> None:
        reconstruction, regularisation = reconstruct(autoencoder, images, generator)
        loss, _ = losses.generator_loss(images, reconstruction, regularisation, discriminator)
        optimizers[0].zero_grad()
        loss.backward()
        optimizers[0].step()
        d_loss = losses.discriminator_loss(discriminator, images, reconstruction)
        optimizers[1].zero_grad()
        d_loss.backward()
        optimizers[1].step()
    return step


def run(quick: bool = False) -> dict:
    """Time both arms (16^3 and 3 repeats quick, the demo's 32^3 and 15 otherwise)."""
    size, repeats = (16, 3) if quick else (32, 15)
    window = ssim_window((size,) * 3)
    monai_ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=window)
    arms = {"monai": monai_ssim, "conv_passes": ConvPassesSSIMLoss(win_size=window),
            "separable": SeparableSSIMLoss(win_size=window)}
    x = torch.rand(2, 1, size, size, size, generator=torch.Generator().manual_seed(0),
                   requires_grad=True)
    y = torch.rand(2, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    difference = max(abs(monai_ssim(x, y).item() - loss(x, y).item()) for loss in arms.values())
    term = {name: _best_of(lambda loss=loss: loss(x, y).backward(), repeats)
            for name, loss in arms.items()}
    step = {name: _best_of(_training_step(loss, size), repeats) for name, loss in arms.items()}
    return {
        "summary": f"SSIM term {term['monai'] / term['separable']:.1f}x faster separable "
                   f"than MONAI's and {term['conv_passes'] / term['separable']:.1f}x faster than "
                   f"the same passes as conv3d ({term['separable'] * 1e3:.1f} ms against "
                   f"{term['monai'] * 1e3:.0f} ms and {term['conv_passes'] * 1e3:.0f} ms, "
                   f"forward + backward, batch 2, {size}^3); the demo's autoencoder training "
                   f"step {step['monai'] / step['separable']:.2f}x and "
                   f"{step['conv_passes'] / step['separable']:.2f}x faster "
                   f"({step['separable'] * 1e3:.0f} ms against {step['monai'] * 1e3:.0f} ms and "
                   f"{step['conv_passes'] * 1e3:.0f} ms).",
        "image_size": size, "batch": 2, "window": window, "threads": torch.get_num_threads(),
        "ssim_term_ms": {k: v * 1e3 for k, v in term.items()},
        "training_step_ms": {k: v * 1e3 for k, v in step.items()},
        "ssim_term_speedup": term["monai"] / term["separable"],
        "ssim_term_speedup_over_conv_passes": term["conv_passes"] / term["separable"],
        "training_step_speedup": step["monai"] / step["separable"],
        "training_step_speedup_over_conv_passes": step["conv_passes"] / step["separable"],
        "max_loss_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 volumes, 3 repeats")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
