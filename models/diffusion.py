"""Noise schedules, the per-sample training loss, guided sampling, and the two-stage model.

Two schedulers (``model.diffusion.scheduler``), both MONAI's:

* ``ddpm``: DDPM training (epsilon or v prediction) on scaled latents, deterministic DDIM sampling;
* ``rflow``: rectified flow (:class:`~monai.networks.schedulers.RFlowScheduler`, as MAISI):
  ``x_t = (1 - t/T) x_0 + (t/T) noise``, the UNet predicts the velocity ``x_0 - noise``, and
  sampling takes Euler steps from ``t = T`` (pure noise) to 0.

Both sample with classifier-free guidance. Every random draw takes an explicit
``torch.Generator``, so a seed fixes the result.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn
from tqdm.auto import tqdm

from models.autoencoder import (Autoencoder, decode_latents, decoder_map, downsampling_factor,
                                encode_latents)
from models.conditioning import draw_condition_mask
from models.latent_unet import LatentDenoiser
from models.memory import decode_tiled

# The Stable-Diffusion / MONAI latent-diffusion endpoints for the scaled linear schedule; the plain
# linear schedule keeps DDPM's 1e-4 .. 2e-2.
_BETAS = {"scaled_linear_beta": (0.0015, 0.0195), "linear_beta": (1e-4, 2e-2)}


def _field(cfg: Any, name: str) -> Any:
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


def _diffusion_cfg(cfg: Any) -> Any:
    """Accept a ModelConfig-like (with ``.diffusion``) or a DiffusionConfig-like directly."""
    has = (lambda k: k in cfg) if isinstance(cfg, Mapping) else (lambda k: hasattr(cfg, k))
    return _field(cfg, "diffusion") if has("diffusion") else cfg


def prediction_type(cfg: Any) -> str:
    """``epsilon`` or ``v_prediction`` (configs written before the field existed: epsilon)."""
    cfg = _diffusion_cfg(cfg)
    if isinstance(cfg, Mapping):
        return str(cfg.get("prediction_type", "epsilon"))
    return str(getattr(cfg, "prediction_type", "epsilon"))


def _schedule_args(cfg: Any) -> dict:
    cfg = _diffusion_cfg(cfg)
    schedule = _field(cfg, "beta_schedule")
    start, end = _BETAS[schedule]
    # Latents are not bounded to [-1, 1]: no clipping of the predicted sample.
    return dict(num_train_timesteps=int(_field(cfg, "train_timesteps")), schedule=schedule,
                beta_start=start, beta_end=end, clip_sample=False,
                prediction_type=prediction_type(cfg))


def scheduler_kind(cfg: Any) -> str:
    """``ddpm`` or ``rflow`` (configs written before the field existed: ddpm)."""
    cfg = _diffusion_cfg(cfg)
    if isinstance(cfg, Mapping):
        return str(cfg.get("scheduler", "ddpm"))
    return str(getattr(cfg, "scheduler", "ddpm"))


def _rflow(cfg: Any) -> RFlowScheduler:
    # Uniform discrete timesteps, no resolution-dependent shift: the same schedule at any grid.
    return RFlowScheduler(num_train_timesteps=int(_field(_diffusion_cfg(cfg), "train_timesteps")),
                          use_discrete_timesteps=True, sample_method="uniform",
                          use_timestep_transform=False)


def build_scheduler(cfg: Any) -> DDPMScheduler | RFlowScheduler:
    """The training (forward-process) scheduler: DDPM with the configured prediction target, or
    rectified flow."""
    if scheduler_kind(cfg) == "rflow":
        return _rflow(cfg)
    return DDPMScheduler(**_schedule_args(cfg))


def build_sampler(cfg: Any) -> DDIMScheduler | RFlowScheduler:
    """A fresh sampler on the training schedule (DDIM, or rectified flow's Euler steps); its
    timesteps are set per sampling call."""
    if scheduler_kind(cfg) == "rflow":
        return _rflow(cfg)
    return DDIMScheduler(**_schedule_args(cfg))


def sampling_steps(cfg: Any) -> int:
    return int(_field(_diffusion_cfg(cfg), "sampling_steps"))


def diffusion_loss(denoiser: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   label_onehot: torch.Tensor, attributes: torch.Tensor | None = None, *,
                   generator: torch.Generator | None = None, condition_dropout: float = 0.0,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """PER-SAMPLE diffusion loss (B,): the DP-SGD interface.

    The mean squared error between the denoiser's output and the scheduler's target: the noise
    (``epsilon``) or the velocity sqrt(a) * noise - sqrt(1 - a) * latents (``v_prediction``) for
    DDPM; the velocity latents - noise for rectified flow (timesteps drawn from 1..T there, T
    being pure noise, where its sampling starts).

    latents (B, Cz, d, h, w), already scaled; label_onehot (B, C, D, H, W) at image or latent
    resolution; attributes (B, A) or None. Noise, timesteps and the condition-dropout mask are
    drawn from ``generator`` unless given. Each value depends on its own sample only (no batch
    statistics), so Opacus can clip per sample.
    """
    batch = latents.shape[0]
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        noise = noise.to(latents.device)
    flow = isinstance(scheduler, RFlowScheduler)
    if timesteps is None:
        low = 1 if flow else 0
        timesteps = torch.randint(low, scheduler.num_train_timesteps + low, (batch,),
                                  generator=generator)
    timesteps = timesteps.to(latents.device)
    keep = draw_condition_mask(batch, condition_dropout, generator, latents.device)
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    prediction = denoiser(noisy, timesteps, label_onehot, attributes, keep)
    if flow:
        target = latents - noise
    elif scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def guided_prediction(denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                      label_onehot: torch.Tensor, attributes: torch.Tensor | None,
                      guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on the model output (noise or velocity, both linear in it):
    out_null + g * (out_cond - out_null), both from one batched pass.

    g = 1 is the plain conditional model (one pass); g = 0 the unconditional one.
    """
    batch = latents.shape[0]
    timesteps = torch.full((batch,), int(timestep), device=latents.device, dtype=torch.long)
    if guidance_scale == 1.0:
        return denoiser(latents, timesteps, label_onehot, attributes)
    keep = torch.cat([torch.ones(batch), torch.zeros(batch)]).to(latents.device)
    both = denoiser(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                    torch.cat([label_onehot, label_onehot]),
                    None if attributes is None else torch.cat([attributes, attributes]), keep)
    conditional, unconditional = both[:batch], both[batch:]
    return unconditional + guidance_scale * (conditional - unconditional)


def initial_noise(num: int, latent_shape: tuple[int, ...],
                  generator: torch.Generator) -> torch.Tensor:
    """(num, *latent_shape) standard normal, drawn one sample after another.

    Drawing per sample makes sample i the same whatever the batch size it is generated in.
    """
    return torch.stack([torch.randn(latent_shape, generator=generator) for _ in range(num)])


@torch.no_grad()
def sample_latents(denoiser: nn.Module, sampler: DDIMScheduler | RFlowScheduler,
                   noise: torch.Tensor, label_onehot: torch.Tensor,
                   attributes: torch.Tensor | None = None, *, steps: int,
                   guidance_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), or rectified flow's Euler steps, from ``noise``
    (B, Cz, d, h, w) to clean scaled latents."""
    sampler.set_timesteps(num_inference_steps=steps, device=noise.device)
    timesteps = [int(t) for t in sampler.timesteps]
    latents = noise
    for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step",
                               disable=None if progress else True, leave=False)):
        output = guided_prediction(denoiser, latents, t, label_onehot, attributes, guidance_scale)
        if isinstance(sampler, RFlowScheduler):
            following = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            latents, _ = sampler.step(output, t, latents, following)
        else:
            latents, _ = sampler.step(output, t, latents)
    return latents


class LatentDiffusion(nn.Module):
    """The two-stage model: a frozen autoencoder and the conditioned latent denoiser.

    ``latent_scale_factor`` (1 / std of public latents) brings latents to unit variance.
    """

    def __init__(self, autoencoder: Autoencoder, denoiser: LatentDenoiser, model_cfg: Any,
                 latent_scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.model_cfg = model_cfg
        self.latent_scale_factor = float(latent_scale_factor)
        self.downsampling = downsampling_factor(_field(model_cfg, "autoencoder"))
        self.latent_channels = int(_field(_field(model_cfg, "autoencoder"), "latent_channels"))
        self.guidance_scale = float(_field(_field(model_cfg, "conditioning"), "guidance_scale"))
        # Latent voxels per decoding tile (models.memory.decode_tiled); None: decode in one piece.
        self.decode_tile: tuple[int, int, int] | None = None

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """(Cz, d, h, w) for an image grid (D, H, W)."""
        return (self.latent_channels, *(int(s) // self.downsampling for s in image_shape))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, D, H, W) -> scaled latents (B, Cz, d, h, w)."""
        return encode_latents(self.autoencoder, images) * self.latent_scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, label_onehot: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Scaled latents (B, Cz, d, h, w) -> images (B, 1, D, H, W).

        ``label_onehot`` (B, C, D, H, W): the maps the images follow; needed when the decoder
        sees the map (``model.autoencoder.decoder_map_classes``), ignored otherwise.
        """
        latents = latents / self.latent_scale_factor
        grid = decoder_map(self.autoencoder, label_onehot)
        if grid is None:
            decode = lambda z: decode_latents(self.autoencoder, z)  # noqa: E731
        else:  # the map rides along as channels, so every tile gets its own part of it
            latents = torch.cat([latents, grid.to(latents.dtype)], dim=1)
            decode = lambda z: decode_latents(  # noqa: E731
                self.autoencoder, z[:, :self.latent_channels], z[:, self.latent_channels:])
        if self.decode_tile is not None:
            return decode_tiled(decode, latents, self.decode_tile)
        return decode(latents)

    @torch.no_grad()
    def sample(self, label_onehot: torch.Tensor, attributes: torch.Tensor | None = None, *,
               generator: torch.Generator, guidance_scale: float | None = None,
               steps: int | None = None, progress: bool = True) -> torch.Tensor:
        """Images (B, 1, D, H, W) following one-hot maps (B, C, D, H, W), seeded by generator."""
        was_training = self.training
        self.eval()
        try:
            shape = self.latent_shape(tuple(label_onehot.shape[2:]))
            noise = initial_noise(label_onehot.shape[0], shape, generator).to(label_onehot.device)
            latents = sample_latents(
                self.denoiser, build_sampler(self.model_cfg), noise, label_onehot, attributes,
                steps=steps or sampling_steps(self.model_cfg),
                guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
                progress=progress)
            return self.decode(latents, label_onehot)
        finally:
            self.train(was_training)
