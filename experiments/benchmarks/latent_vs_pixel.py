"""Latent DDIM sampling versus pixel-space DDPM sampling at the same image size, in one run.

The pixel baseline is Med-DDPM's setting: a DiffusionModelUNet on the image itself with the one-hot
map concatenated as channels, sampled with the full DDPM chain (``train_timesteps`` steps). The
latent model is fedsynth's: the same UNet widths on the autoencoder's latent grid, sampled with
DDIM (``sampling_steps`` steps) and decoded. Both are untrained: sampling cost does not depend on
the weights. Reported: volumes per second of each and their ratio; the ratio of one denoising step
(the grid-size effect alone, without the shorter chain); and the autoencoder's compression factor
(image voxels / latent elements).

Timing, on one torch thread (on a shared machine a second thread mostly waits for the busy core):
the latent chain is the best of 3 whole samples (decoding included); one denoising step of each
model is the best of 5, the two models alternating; the pixel chain (``train_timesteps`` steps) is
the median step of a 20-step prefix, scheduler included, times the chain length.

Run: ``python -m experiments.benchmarks.latent_vs_pixel [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     UNetConfig)
from models.autoencoder import build_autoencoder
from models.diffusion import LatentDiffusion
from models.latent_unet import build_latent_unet

CLASSES = 4


def _model_config(quick: bool) -> ModelConfig:
    """The demo's model sizes; ``quick`` shortens both chains."""
    return ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 16], latent_channels=3, norm_num_groups=8),
        unet=UNetConfig(channels=[16, 32, 32], attention_levels=[False, False, True],
                        num_head_channels=16, norm_num_groups=8),
        conditioning=ConditioningConfig(mode="concat"),
        diffusion=DiffusionConfig(train_timesteps=100 if quick else 1000,
                                  sampling_steps=10 if quick else 25))


def _maps(batch: int, size: int) -> torch.Tensor:
    classes = torch.randint(0, CLASSES, (batch, size, size, size),
                            generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.one_hot(classes, CLASSES).permute(0, 4, 1, 2, 3).float()


def _seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@torch.no_grad()
def _pixel_ddpm(unet: DiffusionModelUNet, scheduler: DDPMScheduler, maps: torch.Tensor,
                generator: torch.Generator) -> list[float]:
    """Ancestral DDPM over ``scheduler.timesteps`` in image space, map as channels (Med-DDPM);
    returns the seconds of each step."""
    image = torch.randn((maps.shape[0], 1, *maps.shape[2:]), generator=generator)
    seconds = []
    for t in scheduler.timesteps:
        started = time.perf_counter()
        timesteps = torch.full((maps.shape[0],), int(t), dtype=torch.long)
        eps = unet(torch.cat([image, maps], dim=1), timesteps)
        image, _ = scheduler.step(eps, int(t), image, generator=generator)
        seconds.append(time.perf_counter() - started)
    return seconds


def run(quick: bool = False) -> dict:
    """Time both samplers on the same maps (16^3 quick, 32^3 otherwise); a flat dict of results."""
    torch.set_num_threads(1)
    size, batch = (16, 2) if quick else (32, 2)
    cfg = _model_config(quick)
    torch.manual_seed(0)
    latent_model = LatentDiffusion(build_autoencoder(cfg.autoencoder),
                                   build_latent_unet(cfg, CLASSES, 0), cfg,
                                   latent_scale_factor=1.0).eval()
    pixel_unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=1 + CLASSES, out_channels=1, channels=cfg.unet.channels,
        attention_levels=cfg.unet.attention_levels, num_res_blocks=cfg.unet.num_res_blocks,
        num_head_channels=cfg.unet.num_head_channels,
        norm_num_groups=cfg.unet.norm_num_groups).eval()
    pixel_scheduler = DDPMScheduler(num_train_timesteps=cfg.diffusion.train_timesteps)
    maps = _maps(batch, size)
    latent = torch.randn((batch, *latent_model.latent_shape((size,) * 3)),
                         generator=torch.Generator().manual_seed(2))
    image = torch.randn((batch, 1, size, size, size), generator=torch.Generator().manual_seed(3))
    steps = torch.full((batch,), 10, dtype=torch.long)

    with torch.no_grad():  # warm-up passes keep one-off allocation costs out of the timings
        latent_model.sample(maps, generator=torch.Generator().manual_seed(0), steps=1,
                            progress=False)
        pixel_unet(torch.cat([image, maps], 1), steps)
        latent_seconds = min(_seconds(lambda: latent_model.sample(
            maps, generator=torch.Generator().manual_seed(1), progress=False)) for _ in range(3))
        latent_steps, pixel_steps = [], []
        for _ in range(5):  # alternating: both models see the same machine load
            latent_steps.append(_seconds(lambda: latent_model.denoiser(latent, steps, maps)))
            pixel_steps.append(_seconds(lambda: pixel_unet(torch.cat([image, maps], 1), steps)))
        latent_step, pixel_step = min(latent_steps), min(pixel_steps)

    # The full pixel chain is long: time a prefix and scale (every step costs the same).
    pixel_scheduler.set_timesteps(cfg.diffusion.train_timesteps)
    chain_length = len(pixel_scheduler.timesteps)
    timed_steps = min(chain_length, 20)
    pixel_scheduler.timesteps = pixel_scheduler.timesteps[:timed_steps]
    pixel_seconds = statistics.median(_pixel_ddpm(pixel_unet, pixel_scheduler, maps,
                                                  torch.Generator().manual_seed(1))) * chain_length

    latent_elements = cfg.autoencoder.latent_channels * (size // cfg.autoencoder.downsampling) ** 3
    speedup = pixel_seconds / latent_seconds
    return {
        "summary": f"Latent DDIM ({cfg.diffusion.sampling_steps} steps + decoding) samples a "
                   f"{size}^3 volume {speedup:.0f}x faster than pixel-space DDPM ({chain_length} "
                   f"steps); one latent denoising step alone is {pixel_step / latent_step:.1f}x "
                   f"cheaper than a pixel one.",
        "image_size": size, "batch": batch, "threads": torch.get_num_threads(),
        "latent_ddim_steps": cfg.diffusion.sampling_steps,
        "pixel_ddpm_steps": chain_length, "pixel_ddpm_steps_timed": timed_steps,
        "latent_volumes_per_second": batch / latent_seconds,
        "pixel_volumes_per_second": batch / pixel_seconds,
        "latent_speedup": speedup,
        "per_step_speedup": pixel_step / latent_step,
        "compression_factor": size ** 3 / latent_elements,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16^3 images and short chains")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
