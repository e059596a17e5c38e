"""The first stage: a 3D autoencoder (MONAI AutoencoderKL, or VQVAE as VQ-GAN option), its losses.

Images are (B, 1, D, H, W) in ~[0, 1]; latents are (B, latent_channels, D/f, H/f, W/f) with
``f = 2 ** (len(channels) - 1)``. Both kinds train with the same GAN objective (the KL model as in
LDM, the VQ model as a VQ-GAN, as in Med-LSDM): L1 reconstruction, a weight-free structural term
(SSIM loss and/or FFT magnitude), a PatchDiscriminator adversarial loss and a feature-matching loss
on the discriminator's intermediate outputs, plus the KL term (``kind: kl``) or the
vector-quantisation commitment loss (``kind: vq``). A perceptual loss is added only when local
MedicalNet weights are given (nothing is ever downloaded).

With ``decoder_map_classes`` > 0 (KL only) the decoder also sees the label map the volume follows,
folded losslessly onto the latent grid (space-to-depth, :func:`decoder_map`): the latents carry
contrast and texture, the map says where each tissue's boundary lies at full resolution. The
encoder never sees a map, so the latents (and everything the sites compute from them) are the same
kind of object either way.

Builders take the config duck-typed (``cfg.channels``) or as a plain dict, so a checkpoint rebuilds
its networks without the YAML.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.losses import PatchAdversarialLoss
from monai.losses.perceptual import MedicalNetPerceptualSimilarity
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import VQVAE, AutoencoderKL, PatchDiscriminator, resnet10, resnet50
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import Decoder
from torch import nn

from models.conditioning import depth_to_space, space_to_depth

Autoencoder = AutoencoderKL | VQVAE
NEEDS_MAP = ("this autoencoder's decoder needs the label map "
             "(model.autoencoder.decoder_map_classes > 0)")


def _field(cfg: Any, name: str, default: Any = ...) -> Any:
    if default is not ... and (name not in cfg if isinstance(cfg, Mapping)
                               else not hasattr(cfg, name)):
        return default  # a field added later: older checkpoints lack it
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


class MapDecoder(Decoder):
    """MONAI's KL decoder, told the label map twice: folded onto the latent grid beside the
    latents at its input, and at full resolution beside the last features before its output
    convolution. The first gives every level the layout; the second lets the output place
    each tissue boundary on its voxel (nearest-neighbour upsampling cannot unfold a folded map).

    ``forward(x, label_grid)``: x (B, Cz, d, h, w), label_grid (B, C * f^3, d, h, w) -> images
    (B, out_channels, D, H, W).
    """

    def __init__(self, *, map_classes: int, downsampling: int, in_channels: int,
                 **kwargs: Any):
        super().__init__(in_channels=in_channels + map_classes * downsampling ** 3, **kwargs)
        self.downsampling = int(downsampling)
        output = self.blocks[-1]
        self.blocks[-1] = Convolution(spatial_dims=self.spatial_dims,
                                      in_channels=output.conv.in_channels + int(map_classes),
                                      out_channels=self.out_channels, strides=1, kernel_size=3,
                                      padding=1, conv_only=True)

    def forward(self, x: torch.Tensor, label_grid: torch.Tensor) -> torch.Tensor:
        label_grid = label_grid.to(x.dtype)
        x = torch.cat([x, label_grid], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](torch.cat([x, depth_to_space(label_grid, self.downsampling)],
                                         dim=1))


class MapDecodingAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose decoder also takes the label map (:class:`MapDecoder`).

    ``decode(z, label_grid)``: latents z (B, Cz, d, h, w) and the map on the latent grid
    (B, map_classes * f^3, d, h, w) from :func:`decoder_map` -> images (B, 1, D, H, W).
    Encoding is MONAI's, unchanged.
    """

    def __init__(self, *, map_classes: int, downsampling: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.map_classes = int(map_classes)
        self.downsampling = int(downsampling)
        decoder = self.decoder
        self.decoder = MapDecoder(
            map_classes=self.map_classes, downsampling=self.downsampling,
            spatial_dims=decoder.spatial_dims, channels=decoder.channels,
            in_channels=self.latent_channels, out_channels=decoder.out_channels,
            num_res_blocks=decoder.num_res_blocks, norm_num_groups=decoder.norm_num_groups,
            norm_eps=decoder.norm_eps, attention_levels=decoder.attention_levels,
            with_nonlocal_attn=kwargs["with_decoder_nonlocal_attn"])

    def decode(self, z: torch.Tensor, label_grid: torch.Tensor | None = None) -> torch.Tensor:
        if label_grid is None:
            raise ValueError(NEEDS_MAP)
        z = self.post_quant_conv(z)
        if self.use_checkpoint:  # models.memory.use_gradient_checkpointing, as MONAI's decode
            return torch.utils.checkpoint.checkpoint(self.decoder, z, label_grid,
                                                     use_reentrant=False)
        return self.decoder(z, label_grid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise TypeError("use models.autoencoder.reconstruct(autoencoder, images, label_grid=...)")


def decoder_map(autoencoder: nn.Module, label_onehot: torch.Tensor | None) -> torch.Tensor | None:
    """The map as the decoder sees it, or None for a decoder that sees no map.

    One-hot maps (B, C, D, H, W) -> (B, C * f^3, D/f, H/f, W/f), space-to-depth (lossless).
    """
    if not isinstance(autoencoder, MapDecodingAutoencoderKL):
        return None
    if label_onehot is None:
        raise ValueError(NEEDS_MAP)
    if label_onehot.shape[1] != autoencoder.map_classes:
        raise ValueError(f"the decoder was trained on maps of {autoencoder.map_classes} classes; "
                         f"got {label_onehot.shape[1]}")
    return space_to_depth(label_onehot.float(), autoencoder.downsampling)


def downsampling_factor(cfg: Any) -> int:
    """Spatial downsampling of the autoencoder: one factor 2 per level after the first."""
    return 2 ** (len(_field(cfg, "channels")) - 1)


def build_autoencoder(cfg: Any) -> Autoencoder:
    """AutoencoderKL (``kind: kl``) or VQVAE (``kind: vq``) for one-channel 3D images.

    ``cfg`` has kind, channels, latent_channels, num_res_blocks, attention_levels, norm_num_groups,
    num_embeddings and optionally decoder_map_classes (0 when absent: no map at the decoder;
    > 0: :class:`MapDecodingAutoencoderKL`). The VQVAE keeps its first level at full resolution
    (stride 1) so that both kinds downsample by ``2 ** (len(channels) - 1)``. The KL model's non-local attention at the bottleneck
    follows the last entry of ``attention_levels`` (it is quadratic in the latent voxel count).
    """
    kind = _field(cfg, "kind")
    channels = [int(c) for c in _field(cfg, "channels")]
    latent_channels = int(_field(cfg, "latent_channels"))
    num_res_blocks = int(_field(cfg, "num_res_blocks"))
    map_classes = int(_field(cfg, "decoder_map_classes", 0))
    if kind == "kl":
        attention = [bool(a) for a in _field(cfg, "attention_levels")]
        kwargs = dict(
            spatial_dims=3, in_channels=1, out_channels=1, channels=channels,
            latent_channels=latent_channels, num_res_blocks=num_res_blocks,
            attention_levels=attention, norm_num_groups=int(_field(cfg, "norm_num_groups")),
            with_encoder_nonlocal_attn=attention[-1], with_decoder_nonlocal_attn=attention[-1])
        if map_classes:
            return MapDecodingAutoencoderKL(map_classes=map_classes,
                                            downsampling=downsampling_factor(cfg), **kwargs)
        return AutoencoderKL(**kwargs)
    if map_classes:
        raise ValueError(f"a decoder that sees the map needs kind 'kl' (got {kind!r})")
    if kind == "vq":
        down = [(1, 3, 1, 1)] + [(2, 4, 1, 1)] * (len(channels) - 1)
        up = [(2, 4, 1, 1, 0)] * (len(channels) - 1) + [(1, 3, 1, 1, 0)]
        return VQVAE(
            spatial_dims=3, in_channels=1, out_channels=1, channels=channels,
            num_res_layers=num_res_blocks, num_res_channels=channels,
            downsample_parameters=down, upsample_parameters=up,
            num_embeddings=int(_field(cfg, "num_embeddings")), embedding_dim=latent_channels)
    raise ValueError(f"autoencoder kind must be 'kl' or 'vq' (got {kind!r})")


@torch.no_grad()
def narrow_posterior(autoencoder: Autoencoder, log_variance: float) -> None:
    """Start a KL autoencoder's posterior at sigma = exp(log_variance / 2) for every latent.

    MONAI initialises the log-variance convolution like any other, so the posterior starts with
    sigma near 1, as wide as the latents themselves: the decoder then learns from latents whose
    noise swamps their signal, and a short training ends blurry. Zero weights and a bias of
    ``log_variance`` make early training near-deterministic; the KL term may still widen it.
    A VQ model has no posterior and is left unchanged.
    """
    if isinstance(autoencoder, AutoencoderKL):
        autoencoder.quant_conv_log_sigma.conv.weight.zero_()
        autoencoder.quant_conv_log_sigma.conv.bias.fill_(float(log_variance))


def build_discriminator(cfg: Any, image_shape: tuple[int, int, int],
                        norm: str = "instance") -> PatchDiscriminator:
    """PatchDiscriminator with as many stride-2 layers (1 to 3) as the smallest side allows.

    ``norm`` is ``instance`` (per-sample statistics: stable at the CPU's batch of 2) or ``batch``
    (MONAI's default).
    """
    layers = max(1, min(3, int(math.log2(min(image_shape))) - 2))
    return PatchDiscriminator(spatial_dims=3, channels=int(_field(cfg, "channels")[0]),
                              in_channels=1, out_channels=1, num_layers_d=layers,
                              norm=norm.upper())


def ssim_window(image_shape: tuple[int, ...]) -> int:
    """The SSIM window side for a grid: 7 voxels, or the largest odd size that fits."""
    side = min(7, min(int(s) for s in image_shape))
    return side if side % 2 else side - 1


@torch.no_grad()
def reconstruction_quality(autoencoder: Autoencoder, images: torch.Tensor,
                           batch_size: int = 4,
                           label_onehot: torch.Tensor | None = None) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of deterministic reconstructions of images (N, 1, D, H, W) in [0, 1].

    ``label_onehot`` (N, C, D, H, W): the images' maps, needed when the decoder sees the map.

    Reconstructions go through the latent path the diffusion model uses (encode, decode), are
    clipped to [0, 1], and are scored with MONAI's PSNRMetric and SSIMMetric (data range 1,
    Gaussian window of :func:`ssim_window` voxels).
    """
    was_training = autoencoder.training
    autoencoder.eval()
    psnr = PSNRMetric(max_val=1.0)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=ssim_window(images.shape[2:]))
    device = next(autoencoder.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].float()
        maps = None if label_onehot is None else label_onehot[start:start + batch_size].to(device)
        reconstruction = decode_latents(autoencoder, encode_latents(autoencoder, batch.to(device)),
                                        decoder_map(autoencoder, maps))
        reconstruction = reconstruction.float().cpu().clamp(0.0, 1.0)
        psnr(reconstruction, batch)
        ssim(reconstruction, batch)
    autoencoder.train(was_training)
    return {"psnr": float(psnr.aggregate().item()), "ssim": float(ssim.aggregate().item())}


def encode_latents(autoencoder: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (B, Cz, d, h, w) of images (B, 1, D, H, W).

    KL: the posterior mean; VQ: the quantised embedding (MONAI's stage-2 input).
    """
    if isinstance(autoencoder, VQVAE):
        return autoencoder.encode_stage_2_inputs(images)
    z_mu, _ = autoencoder.encode(images)
    return z_mu


def decode_latents(autoencoder: Autoencoder, latents: torch.Tensor,
                   label_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 1, D, H, W) from latents (B, Cz, d, h, w); VQ latents are re-quantised first.

    ``label_grid``: :func:`decoder_map` of the images' maps (None for a decoder without one).
    """
    if isinstance(autoencoder, MapDecodingAutoencoderKL):
        return autoencoder.decode(latents, label_grid)
    return autoencoder.decode_stage_2_outputs(latents)


def reconstruct(autoencoder: Autoencoder, images: torch.Tensor,
                generator: torch.Generator | None = None,
                label_grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward pass: (reconstruction (B, 1, D, H, W), regularisation loss scalar).

    ``label_grid``: :func:`decoder_map` of the images' maps, for a decoder that sees the map.

    KL: a reparameterised draw from ``generator`` and the KL divergence to N(0, I), summed over
    latent elements and averaged over the batch (as in MONAI's tutorials). VQ: the quantiser's
    commitment loss (the codebook itself follows an exponential moving average).
    """
    if isinstance(autoencoder, VQVAE):
        reconstruction, quantisation_loss = autoencoder(images)
        return reconstruction, quantisation_loss
    z_mu, z_sigma = autoencoder.encode(images)
    eps = torch.randn(z_mu.shape, generator=generator, dtype=z_mu.dtype).to(z_mu.device)
    reconstruction = decode_latents(autoencoder, z_mu + eps * z_sigma, label_grid)
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1,
                         dim=list(range(1, z_mu.ndim)))
    return reconstruction, kl.mean()


class PerceptualWeightsError(ValueError):
    """A perceptual-loss weights file that cannot be loaded. One line: the file and the fix."""


class LocalMedicalNetSimilarity(MedicalNetPerceptualSimilarity):
    """MONAI's MedicalNet perceptual similarity, its feature net loaded from a LOCAL weights file.

    MONAI's own class fetches the network through torch.hub; here MONAI's ResNet (the MedicalNet
    architecture) is built locally and given the weights file's state dict (MedicalNet's
    ``{"state_dict": {"module.conv1.weight": ...}}`` or a flat state dict; ResNet-10 or ResNet-50 by
    its keys). The features are the last residual stage's map; the distance is MONAI's.
    """

    def __init__(self, weights: Path):
        nn.Module.__init__(self)  # skip the parent's torch.hub download
        self.channel_wise = False
        try:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise PerceptualWeightsError(
                f"{weights}: cannot read perceptual weights ({type(err).__name__}); give a "
                f"MedicalNet ResNet-10/50 .pth file or unset "
                f"pretrain.autoencoder.perceptual_weights") from None
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise PerceptualWeightsError(
                f"{weights}: holds no state dict; give a MedicalNet .pth file")
        state = {k.replace("module.", ""): v for k, v in state.items()}
        builder = resnet50 if any(k.endswith("conv3.weight") for k in state) else resnet10
        net = builder(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                      bias_downsample=False)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise PerceptualWeightsError(
                f"{weights}: not a MedicalNet ResNet-10/50 state dict ({first}); "
                f"give a matching weights file") from None
        self.model = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> "LocalMedicalNetSimilarity":
        return super().train(False)  # frozen feature net: BatchNorm stays in eval mode


class SeparableSSIMLoss(nn.Module):
    """``1 - SSIM`` of two (B, 1, D, H, W) batches: MONAI's ``SSIMLoss`` (Gaussian window of
    ``win_size`` voxels, sigma 1.5, no padding, k1 0.01, k2 0.03), computed with the window's three
    1-D factors instead of its full 3-D kernel.

    MONAI convolves with the outer product of a 1-D Gaussian, which is separable; three passes of
    ``win_size`` taps replace one of ``win_size ** 3``. Same value and gradient up to float
    rounding (tested against MONAI's), 3.2x cheaper forward and backward at 32^3: on the demo's
    2-core CPU the 7^3 kernel's backward was 37 % of an autoencoder training step.

    Each pass is a weighted sum of ``win_size`` shifted slices, not a one-channel ``conv3d``:
    oneDNN's backward of such a convolution was 18 % of the step. On the demo's 2-core CPU the
    term's forward and backward took 5.3 ms against 31 ms with ``conv3d`` passes, and the
    training step ran 1.20-1.40x faster (``experiments/benchmarks/ssim_loss.py``).
    """

    def __init__(self, win_size: int = 7, data_range: float = 1.0, sigma: float = 1.5,
                 k1: float = 0.01, k2: float = 0.03):
        super().__init__()
        # MONAI's _gaussian_kernel: exp(-x^2 / (2 sigma^2)) on taps centred at 0, normalised.
        taps = torch.arange((1 - win_size) / 2, (1 + win_size) / 2, 1, dtype=torch.float)
        window = torch.exp(-torch.pow(taps / sigma, 2) / 2)
        self.register_buffer("window", window / window.sum(), persistent=False)
        self.win_size = win_size
        self.c1 = (k1 * data_range) ** 2
        self.c2 = (k2 * data_range) ** 2

    def _blur(self, volumes: torch.Tensor) -> torch.Tensor:
        """The window's 'valid' correlation with (B, 1, D, H, W) volumes: (B, 1, D - w + 1, ...)."""
        weights = self.window.to(volumes.dtype)
        for dim in (2, 3, 4):
            size = volumes.shape[dim] - self.win_size + 1
            blurred = volumes.narrow(dim, 0, size) * weights[0]
            for tap in range(1, self.win_size):
                blurred = blurred + volumes.narrow(dim, tap, size) * weights[tap]
            volumes = blurred
        return volumes

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"SSIM loss needs two (B, 1, D, H, W) batches of one shape "
                             f"(got {tuple(x.shape)} and {tuple(y.shape)})")
        x, y = x.float(), y.float()
        count = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 under bf16 too
            mu_x, mu_y, mu_xx, mu_yy, mu_xy = self._blur(
                torch.cat([x, y, x * x, y * y, x * y])).split(count)
        sigma_x, sigma_y = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y
        sigma_xy = mu_xy - mu_x * mu_y
        contrast = (2 * sigma_xy + self.c2) / (sigma_x + sigma_y + self.c2)
        ssim = (2 * mu_x * mu_y + self.c1) / (mu_x ** 2 + mu_y ** 2 + self.c1) * contrast
        return (1 - ssim.flatten(1).mean(1)).mean()


def fft_magnitude_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the 3D FFT magnitudes (log1p) of two (B, 1, D, H, W) batches.

    Blur removes high-frequency energy; this term penalises it directly, with no learned weights.
    """
    def spectrum(volume: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.fft.rfftn(volume, dim=(-3, -2, -1), norm="ortho").abs())
    return torch.nn.functional.l1_loss(spectrum(reconstruction), spectrum(images))


class AutoencoderLoss(nn.Module):
    """The first stage's generator and discriminator objectives (shared by the KL and VQ kinds).

    ``generator_loss`` = L1 + regularisation_weight * regularisation
    (+ ssim_weight * (1 - SSIM)) (+ fft_weight * FFT-magnitude L1)
    (+ adversarial_weight * least-squares patch loss)
    (+ feature_matching_weight * L1 between the discriminator's intermediate features of the
    scan and of its reconstruction) (+ perceptual_weight * perceptual distance).
    """

    def __init__(self, adversarial_weight: float, regularisation_weight: float,
                 perceptual_weights: Path | None = None, perceptual_weight: float = 0.001, *,
                 feature_matching_weight: float = 0.0, ssim_weight: float = 0.0,
                 fft_weight: float = 0.0, image_shape: tuple[int, int, int] = (32, 32, 32)):
        super().__init__()
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.adversarial_weight = adversarial_weight
        self.regularisation_weight = regularisation_weight
        self.perceptual_weight = perceptual_weight
        self.feature_matching_weight = feature_matching_weight
        self.ssim_weight = ssim_weight
        self.fft_weight = fft_weight
        self.ssim = SeparableSSIMLoss(win_size=ssim_window(image_shape), data_range=1.0)
        self.perceptual = (LocalMedicalNetSimilarity(perceptual_weights)
                           if perceptual_weights else None)

    def generator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor,
                       regularisation: torch.Tensor, discriminator: nn.Module | None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for the autoencoder and its parts; ``discriminator=None`` during warm-up."""
        l1 = torch.nn.functional.l1_loss(reconstruction, images)
        loss = l1 + self.regularisation_weight * regularisation
        parts = {"l1": l1.item(), "regularisation": regularisation.item()}
        if self.ssim_weight > 0:
            ssim = self.ssim(reconstruction, images)
            loss = loss + self.ssim_weight * ssim
            parts["ssim_loss"] = ssim.item()
        if self.fft_weight > 0:
            fft = fft_magnitude_loss(reconstruction, images)
            loss = loss + self.fft_weight * fft
            parts["fft"] = fft.item()
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction, images).mean()
            loss = loss + self.perceptual_weight * perceptual
            parts["perceptual"] = perceptual.item()
        uses_discriminator = self.adversarial_weight > 0 or self.feature_matching_weight > 0
        if discriminator is not None and uses_discriminator:
            fake = discriminator(reconstruction.contiguous())
            if self.adversarial_weight > 0:
                adversarial = self.adversarial(fake[-1], target_is_real=True,
                                               for_discriminator=False)
                loss = loss + self.adversarial_weight * adversarial
                parts["adversarial"] = adversarial.item()
            if self.feature_matching_weight > 0:
                with torch.no_grad():
                    real = discriminator(images.contiguous())
                matching = torch.stack([torch.nn.functional.l1_loss(f, r)
                                        for f, r in zip(fake[:-1], real[:-1])]).mean()
                loss = loss + self.feature_matching_weight * matching
                parts["feature_matching"] = matching.item()
        return loss, parts

    def discriminator_loss(self, discriminator: nn.Module, images: torch.Tensor,
                           reconstruction: torch.Tensor) -> torch.Tensor:
        """Least-squares patch loss: real patches -> 1, reconstructed patches -> 0."""
        logits_fake = discriminator(reconstruction.detach().contiguous())[-1]
        logits_real = discriminator(images.contiguous())[-1]
        fake = self.adversarial(logits_fake, target_is_real=False, for_discriminator=True)
        real = self.adversarial(logits_real, target_is_real=True, for_discriminator=True)
        return 0.5 * (fake + real)
