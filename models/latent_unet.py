"""The second stage: the latent denoiser, a MONAI diffusion UNet conditioned on a semantic map.

Conditioning modes (``model.conditioning.mode``):

- ``concat`` (Med-DDPM): the map, encoded on the latent grid, is concatenated to the noisy
  latents as extra input channels of a :class:`~monai.networks.nets.DiffusionModelUNet`;
- ``spade`` (Med-LSDM): a :class:`~monai.networks.nets.SPADEDiffusionModelUNet` modulates every
  normalisation by the map encoded on the latent grid (``label_nc`` = its channels).

The encoding (``model.conditioning.map_encoding``, :func:`models.conditioning.label_map_to_latent_grid`)
is each class's fraction of a latent cell (C channels) or every voxel folded into channels
(space-to-depth, C x f^3 channels for an autoencoder downsampling f).

Attributes (Daum et al.) enter through the UNet's class-embedding path: MONAI adds
``class_embedding(class_labels)`` to the time embedding, and :class:`AttributeEmbedding` takes the
place of its integer ``nn.Embedding`` so float vectors work. All trainable layers are standard
Linear/Conv/GroupNorm layers without batch coupling, so Opacus computes per-sample gradients.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet
from torch import nn

from models.autoencoder import downsampling_factor
from models.conditioning import (AttributeEmbedding, condition_channels, label_map_to_latent_grid,
                                 pack_attributes)


def _field(cfg: Any, name: str) -> Any:
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


class LatentDenoiser(nn.Module):
    """Predicts the noise (B, Cz, d, h, w) in noisy latents (B, Cz, d, h, w) at timesteps (B,).

    ``label_onehot`` (B, C, D, H, W) is a one-hot map at image or latent resolution, or a map
    already encoded on the latent grid (B, C', d, h, w) by :func:`label_map_to_latent_grid` with
    this model's ``map_encoding`` (what pretraining and the sites cache);
    ``attributes`` (B, A) raw values (required when the model has attributes); ``keep`` (B,) float
    mask, 0 where the sample gets the null condition (dropout, or guidance's unconditional branch).
    """

    def __init__(self, unet: nn.Module, mode: str, num_classes: int, num_attributes: int,
                 map_encoding: str = "fractions", factor: int = 1):
        super().__init__()
        if mode not in ("concat", "spade"):
            raise ValueError(f"conditioning mode must be 'concat' or 'spade' (got {mode!r})")
        self.unet = unet
        self.mode = mode
        self.num_classes = num_classes
        self.num_attributes = num_attributes
        self.map_encoding = map_encoding
        self.condition_channels = condition_channels(num_classes, factor, map_encoding)

    @property
    def attribute_embedding(self) -> AttributeEmbedding | None:
        return self.unet.class_embedding if self.num_attributes else None

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, label_onehot: torch.Tensor,
                attributes: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        batch = latents.shape[0]
        if keep is None:
            keep = torch.ones(batch, device=latents.device, dtype=latents.dtype)
        keep = keep.to(device=latents.device, dtype=latents.dtype)
        encoded = (label_onehot.shape[1] == self.condition_channels
                   and label_onehot.shape[2:] == latents.shape[2:])
        if label_onehot.shape[1] != self.num_classes and not encoded:
            raise ValueError(f"label map has {label_onehot.shape[1]} channels, the model expects "
                             f"{self.num_classes} classes")
        labels = label_map_to_latent_grid(label_onehot.to(latents.dtype), latents.shape[2:],
                                          self.map_encoding)
        if labels.shape[1] != self.condition_channels:
            raise ValueError(f"a {self.map_encoding} map needs {self.condition_channels} channels on "
                             f"the latent grid (got {labels.shape[1]}); give the map at image "
                             f"resolution")
        labels = labels * keep.view(batch, 1, 1, 1, 1)
        class_labels = None
        if self.num_attributes:
            if attributes is None or attributes.shape[-1] != self.num_attributes:
                raise ValueError(f"the model is conditioned on {self.num_attributes} attributes; "
                                 f"pass attributes of shape (B, {self.num_attributes})")
            class_labels = pack_attributes(attributes.to(latents.dtype), keep)
        if self.mode == "concat":
            return self.unet(torch.cat([latents, labels], dim=1), timesteps,
                             class_labels=class_labels)
        return self.unet(latents, timesteps, seg=labels, class_labels=class_labels)


def build_latent_unet(model_cfg: Any, num_classes: int, num_attributes: int) -> LatentDenoiser:
    """The conditioned latent denoiser for ``model_cfg`` (ModelConfig-like or a plain dict).

    Uses ``model_cfg.unet`` (channels, attention_levels, num_res_blocks, num_head_channels,
    norm_num_groups), ``model_cfg.conditioning.mode`` and ``model_cfg.autoencoder.latent_channels``.
    SPADE's hidden width is the UNet's first channel count (MONAI's default 128 is sized for GPUs).
    """
    unet_cfg = _field(model_cfg, "unet")
    conditioning = _field(model_cfg, "conditioning")
    mode = _field(conditioning, "mode")
    # Configs written before map_encoding existed mean fractions.
    encoding = (conditioning.get("map_encoding", "fractions") if isinstance(conditioning, Mapping)
                else getattr(conditioning, "map_encoding", "fractions"))
    factor = downsampling_factor(_field(model_cfg, "autoencoder"))
    map_channels = condition_channels(num_classes, factor, encoding)
    latent_channels = int(_field(_field(model_cfg, "autoencoder"), "latent_channels"))
    channels = [int(c) for c in _field(unet_cfg, "channels")]
    common = dict(
        spatial_dims=3, out_channels=latent_channels, channels=channels,
        attention_levels=[bool(a) for a in _field(unet_cfg, "attention_levels")],
        num_res_blocks=int(_field(unet_cfg, "num_res_blocks")),
        num_head_channels=int(_field(unet_cfg, "num_head_channels")),
        norm_num_groups=int(_field(unet_cfg, "norm_num_groups")),
        # A placeholder class count: the integer embedding is replaced by AttributeEmbedding below.
        num_class_embeds=1 if num_attributes else None)
    if mode == "concat":
        unet = DiffusionModelUNet(in_channels=latent_channels + map_channels, **common)
    elif mode == "spade":
        unet = SPADEDiffusionModelUNet(in_channels=latent_channels, label_nc=map_channels,
                                       spade_intermediate_channels=channels[0], **common)
    else:
        raise ValueError(f"conditioning mode must be 'concat' or 'spade' (got {mode!r})")
    if num_attributes:
        unet.class_embedding = AttributeEmbedding(num_attributes, embedding_dim=channels[0] * 4)
    return LatentDenoiser(unet, mode, num_classes, num_attributes, encoding, factor)


# Parameters that read the condition or mix information across the volume: attention blocks, the
# attribute embedding, SPADE's map-to-modulation convolutions, and (concat) the input convolution
# that first sees the map channels. The ``trainable: attention_conditioning`` DP fine-tuning option
# trains only these.
_ATTENTION_CONDITIONING = re.compile(
    r"(\.attentions?\.|\.class_embedding\.|\.mlp_(shared|gamma|beta)\.|^unet\.conv_in\.)")


def attention_and_conditioning_parameters(denoiser: LatentDenoiser
                                           ) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the attention and conditioning layers of a LatentDenoiser."""
    return [(name, p) for name, p in denoiser.named_parameters()
            if _ATTENTION_CONDITIONING.search(name)]
