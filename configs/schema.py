"""The typed shape of every fedsynth config.

Frozen dataclasses, one per YAML section. Field metadata carries the bounds the loader
enforces (``gt``, ``ge``, ``lt``, ``le``) and ``must_exist`` for input paths.
``validate`` methods return ``(key, message)`` for constraints that span fields.
``configs/default.yaml`` documents every key with its default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

# Bounds that keep every value usable downstream (memory, run time, RNG seeds, 64-bit integers).
MAX_INT = 2**63 - 1
MAX_SEED = 2**32 - 1
MAX_ROUNDS = 10_000
MAX_EPOCHS = 100_000
MAX_BATCH = 4096
MAX_CHANNELS = 4096
MAX_EPSILON = 1e6


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _f(default=None, *, factory=None, **meta):
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    public_dir: Optional[Path] = _f(None, must_exist=True)
    manifest: str = "manifest.csv"
    shape: tuple[int, int, int] = _f((32, 32, 32), gt=0, le=512)
    spacing: tuple[float, float, float] = _f((6.0, 6.0, 6.0), gt=0, le=1000)
    label_names: list[str] = _f(
        factory=lambda: ["background", "csf", "grey_matter", "white_matter"])
    intensity_percentiles: tuple[float, float] = _f((0.5, 99.5), ge=0, le=100)
    # Manifest paths must resolve (after "..", symbolic links) inside the site folder unless true.
    allow_outside_paths: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def validate(self):
        if len(self.label_names) < 2:
            return "label_names", f"needs at least 2 classes, background first (got {self.label_names})"
        if len(set(self.label_names)) != len(self.label_names):
            return "label_names", f"names must be unique (got {self.label_names})"
        low, high = self.intensity_percentiles
        if not low < high:
            return "intensity_percentiles", f"the lower percentile must be below the upper (got [{low}, {high}])"
        return None


def _levels_problem(channels: list[int], attention: list[bool], groups: int):
    if not channels:
        return "channels", "needs at least one level (got [])"
    if len(attention) != len(channels):
        return "attention_levels", (f"needs one entry per channel level: {len(channels)} "
                                    f"(got {len(attention)})")
    bad = [c for c in channels if c % groups]
    if bad:
        return "channels", f"each must be divisible by norm_num_groups={groups} (got {channels})"
    return None


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: Literal["kl", "vq"] = "kl"
    channels: list[int] = _f(factory=lambda: [16, 32], gt=0, le=MAX_CHANNELS)
    latent_channels: int = _f(3, gt=0, le=256)
    num_res_blocks: int = _f(1, gt=0, le=16)
    attention_levels: list[bool] = _f(factory=lambda: [False, False])
    norm_num_groups: int = _f(8, gt=0, le=MAX_CHANNELS)
    num_embeddings: int = _f(256, gt=1, le=1_000_000)
    decoder_map_classes: int = _f(0, ge=0, le=256)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self):
        if self.decoder_map_classes and self.kind != "kl":
            return "decoder_map_classes", (f"a decoder that sees the map needs kind: kl "
                                           f"(got kind: {self.kind}); set it to 0 for VQ")
        return _levels_problem(self.channels, self.attention_levels, self.norm_num_groups)


@dataclass(frozen=True)
class UNetConfig:
    channels: list[int] = _f(factory=lambda: [32, 64, 64], gt=0, le=MAX_CHANNELS)
    attention_levels: list[bool] = _f(factory=lambda: [False, True, True])
    num_res_blocks: int = _f(1, gt=0, le=16)
    num_head_channels: int = _f(16, gt=0, le=MAX_CHANNELS)
    norm_num_groups: int = _f(8, gt=0, le=MAX_CHANNELS)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self):
        problem = _levels_problem(self.channels, self.attention_levels, self.norm_num_groups)
        if problem:
            return problem
        bad = [c for c, a in zip(self.channels, self.attention_levels)
               if a and c % self.num_head_channels]
        if bad:
            return "num_head_channels", (f"must divide every attention level's channels "
                                         f"{bad} (got {self.num_head_channels})")
        return None


@dataclass(frozen=True)
class ConditioningConfig:
    mode: Literal["concat", "spade"] = "concat"
    # How the map reaches the latent grid: per-class fractions of each latent cell (where inside
    # the cell each tissue lies is lost), or every voxel folded into channels (space-to-depth).
    map_encoding: Literal["fractions", "space_to_depth"] = "fractions"
    attributes: list[str] = _f(factory=list)
    dropout: float = _f(0.1, ge=0, lt=1)
    guidance_scale: float = _f(1.0, ge=0, le=100)


@dataclass(frozen=True)
class DiffusionConfig:
    train_timesteps: int = _f(1000, gt=0, le=100_000)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta"] = "scaled_linear_beta"
    sampling_steps: int = _f(50, gt=0, le=100_000)
    # What the UNet predicts: the noise, or the velocity (learns the map-to-image mapping faster).
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    # ddpm: DDPM training, DDIM sampling; rflow: MONAI's rectified flow (velocity x0 - noise,
    # Euler sampling; beta_schedule and prediction_type do not apply).
    scheduler: Literal["ddpm", "rflow"] = "ddpm"

    def validate(self):
        if self.sampling_steps > self.train_timesteps:
            return "sampling_steps", (f"must be <= train_timesteps={self.train_timesteps} "
                                      f"(got {self.sampling_steps})")
        return None


@dataclass(frozen=True)
class ModelConfig:
    autoencoder: AutoencoderConfig = _f(factory=AutoencoderConfig)
    unet: UNetConfig = _f(factory=UNetConfig)
    conditioning: ConditioningConfig = _f(factory=ConditioningConfig)
    diffusion: DiffusionConfig = _f(factory=DiffusionConfig)


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    epochs: int = _f(20, gt=0, le=MAX_EPOCHS)
    batch_size: int = _f(4, gt=0, le=MAX_BATCH)
    learning_rate: float = _f(1e-4, gt=0, le=10)
    # constant, or cosine: per step from learning_rate down to 0 at the last step (both networks).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    adversarial_weight: float = _f(0.01, ge=0, le=1e6)
    # Epochs of reconstruction-only training before the discriminator joins (None: a quarter).
    warmup_epochs: Optional[int] = _f(None, ge=0, le=MAX_EPOCHS)
    feature_matching_weight: float = _f(0.0, ge=0, le=1e6)
    ssim_weight: float = _f(0.0, ge=0, le=1e6)
    fft_weight: float = _f(0.0, ge=0, le=1e6)
    discriminator_norm: Literal["instance", "batch"] = "instance"
    # kl only: the posterior's initial log-variance (None: MONAI's initialisation, sigma ~ 1).
    initial_log_variance: Optional[float] = _f(-10.0, ge=-100, le=100)
    kl_weight: float = _f(1e-6, ge=0, le=1e6)
    perceptual_weights: Optional[Path] = _f(None, must_exist=True)


@dataclass(frozen=True)
class UNetTrainingConfig:
    epochs: int = _f(50, gt=0, le=MAX_EPOCHS)
    batch_size: int = _f(8, gt=0, le=MAX_BATCH)
    learning_rate: float = _f(1e-4, gt=0, le=10)
    # EMA of the UNet weights (with a warm-up); the checkpoint holds the EMA. None: no EMA.
    ema_decay: Optional[float] = _f(None, ge=0, lt=1)
    # Scanner-look randomisation: each public scan is also encoded with its [0, 1] intensities
    # raised to each of these gammas, and every epoch shows each scan in one of its versions.
    contrast_gammas: list[float] = _f(factory=list)

    def validate(self):
        if any(not 0.1 <= g <= 10 for g in self.contrast_gammas):
            return "contrast_gammas", f"each gamma must be in [0.1, 10] (got {self.contrast_gammas})"
        return None


@dataclass(frozen=True)
class PretrainConfig:
    enabled: bool = True
    # Fraction of public patients (rounded down) kept out of pretraining to measure the
    # autoencoder's reconstruction on; with none held out it is measured on training scans.
    holdout_fraction: float = _f(0.1, ge=0, lt=1)
    autoencoder: AutoencoderTrainingConfig = _f(factory=AutoencoderTrainingConfig)
    unet: UNetTrainingConfig = _f(factory=UNetTrainingConfig)


@dataclass(frozen=True)
class SiteBudgetConfig:
    target_epsilon: float = _f(10.0, gt=0, le=MAX_EPSILON)
    delta: float = _f(1e-5, gt=0, lt=1)
    # The site's own override of the delta policy: accept 1/(10 N) < delta < 1/N.
    allow_large_delta: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings. The site alone sets its budget."""

    site_id: str
    data_dir: Path = field(metadata={"must_exist": True})
    manifest: str = "manifest.csv"
    ledger: Optional[Path] = None
    # None: in simulation only, the consortium default (``privacy.target_epsilon``/``delta``),
    # locked into the site's ledger at first use; a deployed site without a budget refuses.
    budget: Optional[SiteBudgetConfig] = None
    # The site's own opt-in to NON-private rounds when the consortium sets privacy.enabled: false
    # (research and demo data only): its weights then carry no DP guarantee (epsilon = infinity).
    allow_non_private: bool = False
    # Fraction of the site's patients held out of training from its first round on, as the
    # non-members of ``fedsynth audit membership`` (0: off). Fixed in the site's ledger.
    membership_holdout: float = _f(0.0, ge=0, lt=1)
    # This hospital's own machine for its DP training and gate: None takes the experiment config's
    # device/precision in simulation, else auto (CUDA when present) and fp32.
    device: Optional[str] = None
    precision: Optional[Literal["fp32", "bf16"]] = None

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / self.manifest

    @property
    def ledger_path(self) -> Path:
        """Defaults to ``<data_dir>/.fedsynth/ledger.jsonl``."""
        return self.ledger if self.ledger is not None else \
            self.data_dir / ".fedsynth" / "ledger.jsonl"

    def validate(self):
        if not self.site_id or any(c in self.site_id for c in "/\\ "):
            return "site_id", f"must be a non-empty name without spaces or slashes (got {self.site_id!r})"
        if self.device is not None and not _DEVICE.match(self.device):
            return "device", f"must be auto, cpu, cuda or cuda:N (got {self.device!r})"
        return None


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = _f(3, gt=0, le=MAX_ROUNDS)
    local_epochs: int = _f(1, gt=0, le=1000)
    min_sites: int = _f(1, gt=0, le=10_000)
    sites: list[SiteConfig] = _f(factory=list)
    # Seconds the server waits for min_sites to connect, and for the replies of one round.
    round_timeout: float = _f(3600.0, gt=0, le=30 * 24 * 3600)


@dataclass(frozen=True)
class PrivacyConfig:
    """The consortium's DP-SGD settings. Each site's own budget is in its site config."""

    enabled: bool = True
    # Default budget for a site whose own config sets none.
    target_epsilon: float = _f(10.0, gt=0, le=MAX_EPSILON)
    delta: float = _f(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    max_grad_norm: float = _f(1.0, gt=0, le=1e6)
    clipping: Literal["flat", "per_layer"] = "flat"
    expected_batch_size: int = _f(8, gt=0, le=1_000_000)
    max_physical_batch_size: int = _f(8, gt=0, le=MAX_BATCH)
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost"] = "hooks"
    noise_multiplicity: int = _f(1, gt=0, le=1024)
    trainable: Literal["all", "attention_conditioning"] = "all"
    ema_decay: Optional[float] = _f(None, ge=0, lt=1)
    learning_rate: float = _f(1e-4, gt=0, le=10)


@dataclass(frozen=True)
class ThresholdConfig:
    policy: Literal["calibrated", "fixed"] = "calibrated"
    value: Optional[float] = _f(None, ge=0)
    percentile: float = _f(5.0, gt=0, lt=100)

    def validate(self):
        if self.policy == "fixed" and self.value is None:
            return "value", "is required when policy is 'fixed'; set a distance threshold"
        return None


@dataclass(frozen=True)
class DPGateConfig:
    enabled: bool = False
    epsilon: float = _f(1.0, gt=0, le=MAX_EPSILON)


@dataclass(frozen=True)
class ReleaseConfig:
    num_samples: int = _f(8, gt=0, le=100_000)
    distance: Literal["latent", "nrmse", "ssim"] = "latent"
    threshold: ThresholdConfig = _f(factory=ThresholdConfig)
    max_attempts: int = _f(3, gt=0, le=1000)
    chunk_size: int = _f(64, gt=0, le=65_536)
    # Voxels a candidate may be translated (per axis) and still count as a copy of a scan.
    max_shift: int = _f(1, ge=0, le=4)
    deform_masks: bool = True
    # Multiplies the elastic displacement of the deformation. 0.5: ~0.44 voxel per axis, about
    # what separates two patients of the demo cohort; 1.0 was the default until 2026-12-02;
    # 0: rotation, scaling and translation only.
    deform_scale: float = _f(0.5, ge=0, le=10)
    attribute_ranges: dict[str, tuple[float, float]] = _f(factory=dict)
    dp_gate: DPGateConfig = _f(factory=DPGateConfig)

    def validate(self):
        for name, (low, high) in self.attribute_ranges.items():
            if not low <= high:
                return f"attribute_ranges.{name}", f"low must be <= high (got [{low}, {high}])"
        return None


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "fedsynth"


def _compute_problem(config: "Config"):
    """The device setting and the crop size (validated here, resolved by ``models.device``)."""
    if not _DEVICE.match(config.device):
        return "device", f"must be auto, cpu, cuda or cuda:N (got {config.device!r})"
    crop, factor = config.memory.autoencoder_crop, config.model.autoencoder.downsampling
    if crop is not None and any(c % factor or c > s for c, s in zip(crop, config.data.shape)):
        return "memory.autoencoder_crop", (f"each size must be a multiple of the autoencoder's "
                                           f"downsampling {factor} and at most data.shape "
                                           f"{list(config.data.shape)} (got {list(crop)})")
    return None


@dataclass(frozen=True)
class MemoryConfig:
    """Memory options for large volumes (``models.memory``); none changes a model's weights."""

    flash_attention: bool = False
    gradient_checkpointing: bool = False
    autoencoder_crop: Optional[tuple[int, int, int]] = _f(None, gt=0)
    stream_from_disk: bool = False
    num_workers: int = _f(0, ge=0)
    decode_tile: Optional[tuple[int, int, int]] = _f(None, gt=0)


@dataclass(frozen=True)
class Config:
    seed: int = _f(0, ge=0, le=MAX_SEED)
    run_dir: Optional[Path] = None
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    data: DataConfig = _f(factory=DataConfig)
    model: ModelConfig = _f(factory=ModelConfig)
    pretrain: PretrainConfig = _f(factory=PretrainConfig)
    federation: FederationConfig = _f(factory=FederationConfig)
    privacy: PrivacyConfig = _f(factory=PrivacyConfig)
    release: ReleaseConfig = _f(factory=ReleaseConfig)
    tracking: TrackingConfig = _f(factory=TrackingConfig)
    memory: MemoryConfig = _f(factory=MemoryConfig)

    @property
    def total_downsampling(self) -> int:
        """Autoencoder downsampling times latent-UNet downsampling."""
        return self.model.autoencoder.downsampling * self.model.unet.downsampling

    def validate(self):
        problem = _compute_problem(self)
        if problem:
            return problem
        factor = self.total_downsampling
        if any(s % factor for s in self.data.shape):
            fixed = [max(factor, int(math.ceil(s / factor)) * factor) for s in self.data.shape]
            return "data.shape", (f"each size must be divisible by {factor} (autoencoder x{self.model.autoencoder.downsampling}"
                                  f" times UNet x{self.model.unet.downsampling}); "
                                  f"try {fixed} (got {list(self.data.shape)})")
        map_classes = self.model.autoencoder.decoder_map_classes
        if map_classes and map_classes != len(self.data.label_names):
            return "model.autoencoder.decoder_map_classes", (
                f"must be 0 or the number of data.label_names ({len(self.data.label_names)}) "
                f"(got {map_classes})")
        unknown = [a for a in self.model.conditioning.attributes
                   if self.release.attribute_ranges and a not in self.release.attribute_ranges]
        if unknown:
            return "release.attribute_ranges", (f"needs a range for every conditioning attribute; "
                                                f"missing {unknown}")
        return None

    def site_budget(self, site: SiteConfig) -> SiteBudgetConfig:
        """The site's own budget when it sets one, else the consortium default."""
        if site.budget is not None:
            return site.budget
        return SiteBudgetConfig(self.privacy.target_epsilon, self.privacy.delta)

    def validate_sites(self):
        ids = [s.site_id for s in self.federation.sites]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            return "federation.sites", f"site_id must be unique (duplicated: {', '.join(duplicated)})"
        if ids and self.federation.min_sites > len(ids):
            return "federation.min_sites", (f"must be <= the number of sites ({len(ids)}) "
                                            f"(got {self.federation.min_sites})")
        return None
