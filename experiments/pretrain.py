"""Pretraining on the PUBLIC cohort: the autoencoder, the latent scale factor, then the latent UNet.

Stages, resumable at epoch granularity (``run_dir/pretrain_state.pt`` is rewritten atomically after
every epoch; ``resume=True`` continues from the last finished one, bit for bit):

1. autoencoder: L1 + KL (kl) or VQ commitment (vq) + SSIM / FFT structural terms +
   PatchDiscriminator adversarial and feature-matching losses (after ``warmup_epochs``) + a
   perceptual loss when local weights are configured; then its reconstruction PSNR and SSIM on
   the ``pretrain.holdout_fraction`` of public patients that no stage trains on (logged, stored
   in the checkpoint's metadata, previewed);
2. the latent scale factor 1 / std of the public latents (and the public attribute statistics);
3. the latent UNet: DDPM loss with condition dropout, and an EMA of its weights
   (``pretrain.unet.ema_decay``) that the checkpoint keeps.

``pretrain.enabled: false`` (a sweep's "no pretraining" arm) skips stage 3 only: the UNet keeps its
random initialisation, but the autoencoder is still trained on public data, because federation
keeps it frozen and never shows it private data, so it must already work.

The result is ``run_dir/checkpoint.pt`` (see :mod:`models.checkpoint`). Losses per epoch, the
flattened config and PNG previews go to MLflow (:mod:`server.tracking`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from client.site_data import load_site
from client.streaming import affine_stack, image_stack, iterate_batches, label_stack, stream_site
from configs import Config, config_to_dict, flatten_config
from models.autoencoder import (AutoencoderLoss, PerceptualWeightsError, build_autoencoder,
                                build_discriminator, decode_latents, decoder_map, encode_latents,
                                narrow_posterior, reconstruct, reconstruction_quality)
from models.checkpoint import Checkpoint, DataGrid, atomic_torch_save, save_checkpoint
from models.conditioning import compact_latent_map
from models.device import autocast, check_precision, cpu_state_dict, module_device, resolve_device
from models.memory import configure, random_crop
from models.diffusion import LatentDiffusion, build_scheduler, diffusion_loss
from models.latent_unet import build_latent_unet
from models.previews import save_preview
from server.tracking import StageRun

log = logging.getLogger(__name__)

STATE_FILE = "pretrain_state.pt"
CHECKPOINT_FILE = "checkpoint.pt"
RECONSTRUCTION_PREVIEW = "autoencoder_reconstruction.png"
SAMPLE_PREVIEW = "pretrain_samples.png"
_STATE_FORMAT = "fedsynth-pretrain-state/1"
# The config sections that define a pretraining run; resuming under other values is refused.
_RUN_DEFINING = ("data.", "model.", "pretrain.")


class PretrainError(ValueError):
    """Pretraining cannot start or resume. One line naming the problem and the fix."""


@dataclass(frozen=True)
class PublicCohort:
    """The public cohort in memory: images (N, 1, D, H, W) in [0, 1], labels (N, D, H, W) uint8,
    attributes (N, A) float32, affines (N, 4, 4) float64, and each scan's patient id."""

    images: torch.Tensor
    labels: torch.Tensor
    attributes: torch.Tensor
    affines: torch.Tensor
    patient_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    def onehot(self, index: torch.Tensor, num_classes: int) -> torch.Tensor:
        """One-hot maps (B, C, D, H, W) float32 of the given scans."""
        classes = self.labels[index].long()
        return torch.nn.functional.one_hot(classes, num_classes).permute(0, 4, 1, 2, 3).float()

    def subset(self, index: torch.Tensor) -> "PublicCohort":
        """The scans at ``index`` (a 1-D long tensor), in that order."""
        ids = tuple(self.patient_ids[i] for i in index.tolist()) if self.patient_ids else ()
        return PublicCohort(self.images[index], self.labels[index], self.attributes[index],
                            self.affines[index], ids)


def split_holdout(cohort: PublicCohort, fraction: float,
                  seed: int) -> tuple[PublicCohort, PublicCohort]:
    """(training scans, held-out scans): ``floor(fraction * patients)`` whole patients drawn from
    ``seed`` are held out (all their scans), so no follow-up of a held-out patient is trained on."""
    # A cohort loaded without patient ids: every scan counts as its own patient.
    ids = cohort.patient_ids or tuple(f"scan-{i}" for i in range(len(cohort)))
    names = sorted(set(ids))
    patients = int(fraction * len(names))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {names[i] for i in order[:patients]}
    is_held = torch.tensor([p in held for p in ids], dtype=torch.bool)
    return (cohort.subset(torch.nonzero(~is_held).flatten()),
            cohort.subset(torch.nonzero(is_held).flatten()))


@dataclass(frozen=True)
class PretrainResult:
    checkpoint_path: Path
    checkpoint: Checkpoint
    run_id: str | None
    tracking_uri: str | None
    previews: list[Path]


def load_public_cohort(config: Config) -> PublicCohort:
    """Load ``data.public_dir`` through the site loader (the same preprocessing as every site)."""
    if config.data.public_dir is None:
        raise PretrainError("data.public_dir: not set; pretraining needs a public cohort in site "
                            "format (e.g. `fedsynth cohort` writes one to <out>/public)")
    if config.memory.stream_from_disk:  # read per batch from disk, nothing held (client.streaming)
        scans = stream_site(Path(config.data.public_dir), config.data, config.data.manifest,
                            config.model.conditioning.attributes)
        if len(scans) == 0:
            raise PretrainError(f"{config.data.public_dir}: the public manifest lists no scans; "
                                f"add scans")
        return PublicCohort(images=image_stack(scans), labels=label_stack(scans),
                            attributes=scans.attributes, affines=affine_stack(scans))
    dataset = load_site(Path(config.data.public_dir), config.data, config.data.manifest,
                        config.model.conditioning.attributes)
    if len(dataset) == 0:
        raise PretrainError(f"{config.data.public_dir}: the public manifest lists no scans; "
                            f"add scans")
    items = [dataset[i] for i in range(len(dataset))]
    return PublicCohort(
        images=torch.stack([item["image"].float() for item in items]),
        labels=torch.stack([item["label"].argmax(0).to(torch.uint8) for item in items]),
        attributes=torch.stack([item["attributes"].float() for item in items]),
        affines=torch.stack([item["affine"].to(torch.float64) for item in items]),
        patient_ids=tuple(str(item["patient_id"]) for item in items))


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def _run_definition(config: Config) -> dict[str, str]:
    return {k: v for k, v in flatten_config(config).items()
            if k == "seed" or k.startswith(_RUN_DEFINING)}


class _Training:
    """Everything pretraining updates, built deterministically from the config.

    The networks are initialised from ``seed`` (autoencoder and discriminator) and ``seed + 1``
    (UNet), so a resumed run rebuilds the same starting point before loading its saved state.
    """

    def __init__(self, config: Config):
        settings = config.pretrain
        self.device = resolve_device(config.device)
        self.precision = check_precision(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.autoencoder = build_autoencoder(config.model.autoencoder)
        if settings.autoencoder.initial_log_variance is not None:
            narrow_posterior(self.autoencoder, settings.autoencoder.initial_log_variance)
        self.autoencoder = configure(self.autoencoder, config.memory,
                                     training=True).to(self.device)
        # Sized for what it sees: the autoencoder's training crops when configured.
        self.discriminator = build_discriminator(
            config.model.autoencoder, config.memory.autoencoder_crop or config.data.shape,
            norm=settings.autoencoder.discriminator_norm).to(self.device)
        if self.device.type == "cpu":
            # oneDNN's 3D convolutions of 8-16 channels train faster channels-last: the demo's
            # step 1.06x on one thread, 1.08-1.35x on two (experiments/benchmarks/
            # autoencoder_layout.py). On a GPU the layout stays as built.
            self.autoencoder = self.autoencoder.to(memory_format=torch.channels_last_3d)
            self.discriminator = self.discriminator.to(memory_format=torch.channels_last_3d)
        self.autoencoder_optimizer = torch.optim.Adam(
            self.autoencoder.parameters(), lr=settings.autoencoder.learning_rate)
        self.discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=settings.autoencoder.learning_rate)
        torch.manual_seed(config.seed + 1)
        self.denoiser = configure(build_latent_unet(config.model, config.data.num_classes,
                                                    len(config.model.conditioning.attributes)),
                                  config.memory, training=True).to(self.device)
        self.unet_optimizer = torch.optim.AdamW(self.denoiser.parameters(),
                                                lr=settings.unet.learning_rate)
        self.ema = (AveragedModel(self.denoiser, avg_fn=ema_with_warmup(settings.unet.ema_decay),
                                  use_buffers=True)
                    if settings.unet.ema_decay is not None else None)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.autoencoder_epochs = 0
        self.unet_epochs = 0
        self.latent_scale_factor: float | None = None
        self.reconstruction: dict[str, float] | None = None

    def autoencoder_layout(self, volumes: torch.Tensor) -> torch.Tensor:
        """A (B, C, D, H, W) batch in the autoencoder's memory layout."""
        if self.device.type != "cpu":
            return volumes
        return volumes.contiguous(memory_format=torch.channels_last_3d)

    def _modules(self) -> tuple[str, ...]:
        base = ("autoencoder", "discriminator", "autoencoder_optimizer",
                "discriminator_optimizer", "denoiser", "unet_optimizer")
        return base + (("ema",) if self.ema is not None else ())

    def released_denoiser(self) -> torch.nn.Module:
        """The weights the checkpoint keeps: the EMA's when configured, else the trained ones."""
        return self.ema.module if self.ema is not None else self.denoiser

    def state_dict(self) -> dict[str, Any]:
        state = {name: cpu_state_dict(getattr(self, name).state_dict())
                 for name in self._modules()}
        return {**state, "generator": self.generator.get_state(),
                "autoencoder_epochs": self.autoencoder_epochs, "unet_epochs": self.unet_epochs,
                "latent_scale_factor": self.latent_scale_factor,
                "reconstruction": self.reconstruction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._modules():
            getattr(self, name).load_state_dict(state[name])
        self.generator.set_state(state["generator"])
        self.autoencoder_epochs = int(state["autoencoder_epochs"])
        self.unet_epochs = int(state["unet_epochs"])
        self.latent_scale_factor = state["latent_scale_factor"]
        self.reconstruction = state.get("reconstruction")


def ema_with_warmup(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                              torch.Tensor]:
    """AveragedModel's ``avg_fn`` for an EMA whose decay ramps up as min(decay, (1 + n) / (10 + n))
    over the n updates so far, so a short pretraining is not dominated by its random start."""
    def average(averaged: torch.Tensor, current: torch.Tensor,
                num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return rate * averaged + (1.0 - rate) * current
    return average


def _load_state(path: Path, config: Config) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged state file is one user-facing problem
        raise PretrainError(f"{path}: unreadable pretraining state ({type(err).__name__}); "
                            f"delete it and start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise PretrainError(f"{path}: not a fedsynth pretraining state; delete it or use "
                            f"another run folder")
    stored, current = state["run_definition"], _run_definition(config)
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            raise PretrainError(f"{key}: is {current.get(key)} but the run being resumed used "
                                f"{stored.get(key)}; restore the config or start a new run folder")
    return state


def autoencoder_learning_rate(settings: Any, progress: float) -> float:
    """The autoencoder's (and discriminator's) learning rate ``progress`` (0..1) of the way
    through its training: constant, or cosine-annealed to 0. A function of the step alone, so a
    resumed run continues the schedule with no state of its own."""
    if settings.lr_schedule == "cosine":
        return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.learning_rate


def _autoencoder_epoch(training: _Training, losses: AutoencoderLoss, cohort: PublicCohort,
                       config: Config, epoch: int) -> dict[str, float]:
    """One pass over the public scans; returns the epoch's mean losses."""
    settings = config.pretrain.autoencoder
    warmup = settings.epochs // 4 if settings.warmup_epochs is None else settings.warmup_epochs
    uses_discriminator = settings.adversarial_weight > 0 or settings.feature_matching_weight > 0
    adversarial = uses_discriminator and epoch >= warmup
    training.autoencoder.train()
    training.discriminator.train()
    sums: dict[str, float] = {}
    batches = _batches(len(cohort), settings.batch_size, training.generator)
    stream = iterate_batches(cohort.images, batches, config.memory.num_workers)
    for step, index in enumerate(tqdm(batches, desc=f"autoencoder epoch {epoch + 1}/"
                                      f"{settings.epochs}", unit="batch", disable=None,
                                      leave=False)):
        rate = autoencoder_learning_rate(settings, (epoch + step / len(batches)) / settings.epochs)
        for optimizer in (training.autoencoder_optimizer, training.discriminator_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = rate
        images = next(stream)
        if config.model.autoencoder.decoder_map_classes:  # crop scan and map as one
            images = torch.cat([images, cohort.onehot(index, config.data.num_classes)], dim=1)
        cropped = training.autoencoder_layout(random_crop(images, config.memory.autoencoder_crop,
                                                          training.generator).to(training.device))
        images, maps = cropped[:, :1], (cropped[:, 1:] if cropped.shape[1] > 1 else None)
        with autocast(training.device, training.precision):
            reconstruction, regularisation = reconstruct(
                training.autoencoder, images, training.generator,
                decoder_map(training.autoencoder, maps))
            loss, parts = losses.generator_loss(images, reconstruction, regularisation,
                                                training.discriminator if adversarial else None)
        training.autoencoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.autoencoder_optimizer.step()
        if adversarial:
            with autocast(training.device, training.precision):
                d_loss = losses.discriminator_loss(training.discriminator, images, reconstruction)
            training.discriminator_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            training.discriminator_optimizer.step()
            parts["discriminator"] = d_loss.item()
        parts["loss"] = loss.item()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * len(index)
    return {f"autoencoder/{k}": v / len(cohort) for k, v in sums.items()}


def _unet_epoch(training: _Training, scheduler, latents: torch.Tensor, label_grid: torch.Tensor,
                attributes: torch.Tensor, config: Config, epoch: int) -> dict[str, float]:
    """One pass over the public scans, latents (V, N, Cz, d, h, w) in V versions (the scans as
    they are, then one per ``contrast_gammas`` entry) or (N, Cz, d, h, w); each scan is shown in
    one random version. Returns the epoch's mean loss."""
    settings = config.pretrain.unet
    if latents.ndim == 5:
        latents = latents.unsqueeze(0)
    training.denoiser.train()
    total = 0.0
    versions, count = latents.shape[0], latents.shape[1]
    batches = _batches(count, settings.batch_size, training.generator)
    for index in tqdm(batches, desc=f"UNet epoch {epoch + 1}/{settings.epochs}", unit="batch",
                      disable=None, leave=False):
        version = (torch.randint(versions, (len(index),), generator=training.generator)
                   if versions > 1 else torch.zeros(len(index), dtype=torch.long))
        with autocast(training.device, training.precision):
            loss = diffusion_loss(training.denoiser, scheduler,
                                  latents[version.to(latents.device), index.to(latents.device)],
                                  label_grid[index],
                                  attributes[index] if attributes.shape[1] else None,
                                  generator=training.generator,
                                  condition_dropout=config.model.conditioning.dropout)
            loss = loss.float().mean()
        training.unet_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.unet_optimizer.step()
        if training.ema is not None:
            training.ema.update_parameters(training.denoiser)
        total += loss.item() * len(index)
    return {"unet/loss": total / count}


@torch.no_grad()
def _public_latents(autoencoder, cohort: PublicCohort, batch_size: int,
                    num_workers: int = 0, gamma: float = 1.0) -> torch.Tensor:
    """Unscaled latents (N, Cz, d, h, w) of every public scan, its [0, 1] intensities raised to
    ``gamma`` first, on the autoencoder's device."""
    autoencoder.eval()
    device = module_device(autoencoder)
    batches = torch.arange(len(cohort)).split(batch_size)
    return torch.cat([encode_latents(autoencoder, _gamma(images.to(device), gamma))
                      for images in iterate_batches(cohort.images, batches, num_workers)])


def _gamma(images: torch.Tensor, gamma: float) -> torch.Tensor:
    return images if gamma == 1.0 else images.clamp(0, 1) ** gamma


def _attribute_statistics(attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if attributes.shape[0] < 2:
        return attributes.mean(0), torch.ones(attributes.shape[1])
    return attributes.mean(0), attributes.std(0)


def pretrain(config: Config, run_dir: Path, *, resume: bool = False, tracking: bool = True,
             on_epoch_end: Callable[[str, int], None] | None = None,
             on_epoch_start: Callable[[str, int], None] | None = None,
             run_tags: dict[str, str] | None = None) -> PretrainResult:
    """Train both stages on ``config.data.public_dir``; write ``run_dir/checkpoint.pt``.

    ``resume`` continues the state saved in ``run_dir``; without it an existing state is refused
    rather than overwritten. ``on_epoch_end(stage, epoch)`` runs after each saved epoch,
    ``on_epoch_start(stage, epoch)`` before each epoch (stage ``autoencoder`` or ``unet``).
    ``run_tags`` are set on a new MLflow run (a sweep nests pretraining under its parent run).
    """
    run_dir = Path(run_dir)
    check_precision(config.precision, resolve_device(config.device))  # fail before any work
    state_path, checkpoint_path = run_dir / STATE_FILE, run_dir / CHECKPOINT_FILE
    if state_path.exists() and not resume:
        raise PretrainError(f"{state_path}: a pretraining run already exists here; pass --resume "
                            f"to continue it or choose another run folder (--out)")
    state = _load_state(state_path, config) if resume and state_path.exists() else None
    if resume and state is None:
        log.info("%s: nothing to resume; starting a new pretraining run", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    public = load_public_cohort(config)
    cohort, holdout = split_holdout(public, config.pretrain.holdout_fraction, config.seed)
    ae_settings = config.pretrain.autoencoder
    regularisation_weight = ae_settings.kl_weight if config.model.autoencoder.kind == "kl" else 1.0
    try:
        losses = AutoencoderLoss(ae_settings.adversarial_weight, regularisation_weight,
                                 ae_settings.perceptual_weights,
                                 feature_matching_weight=ae_settings.feature_matching_weight,
                                 ssim_weight=ae_settings.ssim_weight,
                                 fft_weight=ae_settings.fft_weight,
                                 image_shape=tuple(config.data.shape))
    except PerceptualWeightsError as err:
        raise PretrainError(f"pretrain.autoencoder.perceptual_weights: {err}") from None
    training = _Training(config)
    if state is not None:
        training.load_state_dict(state)
        log.info("resuming pretraining after %d autoencoder and %d UNet epochs",
                 training.autoencoder_epochs, training.unet_epochs)
    tracker = StageRun(config.tracking, run_dir, flatten_config(config), stage="pretrain",
                       enabled=tracking, run_id=state["mlflow_run_id"] if state else None,
                       tags=run_tags)

    def save(stage: str, epoch: int) -> None:
        atomic_torch_save({"format": _STATE_FORMAT, "run_definition": _run_definition(config),
                           "mlflow_run_id": tracker.run_id, **training.state_dict()}, state_path)
        if on_epoch_end is not None:
            on_epoch_end(stage, epoch)

    with tracker:
        previews = _train_stages(training, losses, cohort, holdout, config, run_dir, tracker,
                                 save, on_epoch_start or (lambda _stage, _epoch: None))
        checkpoint = save_checkpoint(
            checkpoint_path, autoencoder=training.autoencoder,
            denoiser=training.released_denoiser(),
            model_config=config_to_dict(config.model),
            data=DataGrid(tuple(config.data.shape), tuple(config.data.spacing),
                          tuple(config.data.label_names),
                          tuple(config.model.conditioning.attributes)),
            latent_scale_factor=training.latent_scale_factor,
            metadata={"stage": "pretrain", "unet_pretrained": bool(config.pretrain.enabled),
                      "autoencoder_epochs": training.autoencoder_epochs,
                      "unet_epochs": training.unet_epochs,
                      "public_dir": str(config.data.public_dir), "public_scans": len(cohort),
                      "unet_ema_decay": config.pretrain.unet.ema_decay,
                      "autoencoder_reconstruction": training.reconstruction,
                      "seed": config.seed, "mlflow_run_id": tracker.run_id})
        previews.append(_sample_preview(checkpoint, cohort, run_dir, config))
        tracker.artifact(previews[-1], "previews")
        tracker.tags({"checkpoint": str(checkpoint_path),
                      "checkpoint_sha256": checkpoint.content_hash})
        tracker.finish()
    return PretrainResult(checkpoint_path, checkpoint, tracker.run_id, tracker.uri, previews)


def _train_stages(training: _Training, losses: AutoencoderLoss, cohort: PublicCohort,
                  holdout: PublicCohort, config: Config, run_dir: Path, tracker: StageRun,
                  save: Callable[[str, int], None],
                  begin: Callable[[str, int], None]) -> list[Path]:
    """Run the stages not yet done; returns the previews written on the way."""
    ae_settings, unet_settings = config.pretrain.autoencoder, config.pretrain.unet
    previews: list[Path] = []
    for epoch in range(training.autoencoder_epochs, ae_settings.epochs):
        begin("autoencoder", epoch)
        started = time.perf_counter()
        metrics = _autoencoder_epoch(training, losses, cohort, config, epoch)
        metrics["autoencoder/epoch_seconds"] = time.perf_counter() - started
        _check_finite(metrics["autoencoder/loss"], "autoencoder", epoch, ae_settings, config)
        training.autoencoder_epochs = epoch + 1
        tracker.metrics(metrics, step=epoch)
        log.info("autoencoder epoch %d/%d: L1 %.4f", epoch + 1, ae_settings.epochs,
                 metrics["autoencoder/l1"])
        save("autoencoder", epoch)

    latents = _public_latents(training.autoencoder, cohort, ae_settings.batch_size,
                              config.memory.num_workers)
    if training.latent_scale_factor is None:
        # From PUBLIC latents only; federation and release reuse this number.
        scale = float(1.0 / latents.std())
        if not math.isfinite(scale):
            raise PretrainError("the public latents have zero spread (constant images?); "
                                "check data.public_dir")
        training.latent_scale_factor = scale
        if training.denoiser.attribute_embedding is not None:
            training.denoiser.attribute_embedding.set_statistics(
                *_attribute_statistics(cohort.attributes))
        tracker.metrics({"autoencoder/latent_scale_factor": scale}, step=ae_settings.epochs)
        measured = holdout if len(holdout) else cohort
        training.reconstruction = {
            **reconstruction_quality(
                training.autoencoder, measured.images, label_onehot=measured.onehot(
                    torch.arange(len(measured)), config.data.num_classes)),
            "scans": len(measured), "held_out": bool(len(holdout))}
        tracker.metrics({f"autoencoder/reconstruction_{k}": training.reconstruction[k]
                         for k in ("psnr", "ssim")}, step=ae_settings.epochs)
        log.info("autoencoder reconstruction of %d %s public scans: PSNR %.2f dB, SSIM %.4f",
                 len(measured), "held-out" if len(holdout) else "TRAINING",
                 training.reconstruction["psnr"], training.reconstruction["ssim"])
        tracker.artifact(_reconstruction_preview(training.autoencoder, measured, run_dir,
                                                 config.data.num_classes), "previews")
        save("scale_factor", ae_settings.epochs)
    previews.append(run_dir / "previews" / RECONSTRUCTION_PREVIEW)
    # The scale factor comes from the scans as they are; scanner-look versions reuse it.
    latents = torch.stack([latents] + [
        _public_latents(training.autoencoder, cohort, ae_settings.batch_size,
                        config.memory.num_workers, gamma)
        for gamma in config.pretrain.unet.contrast_gammas]) * training.latent_scale_factor
    label_grid = torch.cat([
        compact_latent_map(cohort.onehot(index, config.data.num_classes), latents.shape[-3:],
                           config.model.conditioning.map_encoding)
        for index in torch.arange(len(cohort)).split(16)]).to(training.device)

    if not config.pretrain.enabled:
        log.info("pretrain.enabled is false: the UNet keeps its random initialisation")
        return previews
    scheduler = build_scheduler(config.model)
    for epoch in range(training.unet_epochs, unet_settings.epochs):
        begin("unet", epoch)
        started = time.perf_counter()
        metrics = _unet_epoch(training, scheduler, latents, label_grid,
                              cohort.attributes.to(training.device), config, epoch)
        metrics["unet/epoch_seconds"] = time.perf_counter() - started
        _check_finite(metrics["unet/loss"], "unet", epoch, unet_settings, config)
        training.unet_epochs = epoch + 1
        tracker.metrics(metrics, step=epoch)
        log.info("UNet epoch %d/%d: loss %.4f", epoch + 1, unet_settings.epochs,
                 metrics["unet/loss"])
        save("unet", epoch)
    return previews


def _check_finite(loss: float, stage: str, epoch: int, settings: Any, config: Config) -> None:
    """Stop a diverged stage before its state is saved: the saved state stays at the last
    finite epoch, and nothing downstream trains on NaN weights."""
    if math.isfinite(loss):
        return
    raise PretrainError(f"pretrain.{stage}: the loss became {loss} in epoch {epoch + 1} "
                        f"(precision {config.precision}, learning rate {settings.learning_rate}); "
                        f"training diverged: use precision: fp32 or a lower "
                        f"pretrain.{stage}.learning_rate, in a new run folder")


@torch.no_grad()
def _reconstruction_preview(autoencoder, scans: PublicCohort, run_dir: Path,
                            num_classes: int) -> Path:
    """Up to two (held-out) public scans, each above its reconstruction, with the label map."""
    autoencoder.eval()
    count = min(2, len(scans))
    images = scans.images[:count]
    device = module_device(autoencoder)
    maps = decoder_map(autoencoder, scans.onehot(torch.arange(count), num_classes).to(device))
    reconstruction = decode_latents(autoencoder, encode_latents(autoencoder, images.to(device)),
                                    maps)
    reconstruction = reconstruction.float().cpu().clamp(0, 1)
    volumes = [v for i in range(count)
               for v in (images[i, 0].numpy(), reconstruction[i, 0].numpy())]
    labels = [scans.labels[i].numpy() for i in range(count) for _ in range(2)]
    names = scans.patient_ids or tuple(f"scan {i}" for i in range(count))
    titles = [t for i in range(count) for t in (names[i], "reconstruction")]
    return save_preview(run_dir / "previews" / RECONSTRUCTION_PREVIEW, volumes, labels,
                        titles=titles, num_classes=num_classes)


@torch.no_grad()
def _sample_preview(checkpoint: Checkpoint, cohort: PublicCohort, run_dir: Path,
                    config: Config) -> Path:
    """Samples conditioned on (up to) the first two PUBLIC maps, next to those public scans."""
    device = resolve_device(config.device)
    model: LatentDiffusion = configure(checkpoint.build_model(device), config.memory)
    count = min(2, len(cohort))
    index = torch.arange(count)
    attributes = cohort.attributes[index].to(device) if cohort.attributes.shape[1] else None
    with autocast(device, config.precision):
        samples = model.sample(cohort.onehot(index, config.data.num_classes).to(device),
                               attributes, generator=torch.Generator().manual_seed(config.seed))
    samples = samples.float().cpu()
    images = [v for i in range(count) for v in (cohort.images[i, 0].numpy(), samples[i, 0].numpy())]
    labels = [cohort.labels[i].numpy() for i in range(count) for _ in range(2)]
    titles = [t for i in range(count) for t in (f"public {i}", f"sample {i}")]
    return save_preview(run_dir / "previews" / SAMPLE_PREVIEW, images, labels, titles,
                        num_classes=config.data.num_classes)
