"""What the latent UNet is conditioned on, and the "null" condition used for dropout and guidance.

Two condition inputs, dropped together (Med-DDPM / Med-LSDM semantic maps, Daum et al. attributes):

- the semantic map, one-hot (B, C, D, H, W), brought to the latent grid as per-class fractions or,
  with ``map_encoding: space_to_depth``, with every voxel folded into channels;
- optional attributes (age, sex, ...) as a float vector (B, A), embedded by
  :class:`AttributeEmbedding` and added to the UNet's time embedding (the class-embedding path of
  MONAI's UNet).

The null condition is an all-zero map (a real map's class fractions sum to 1 in every voxel) and
attributes with their presence flag set to 0. It has no learned parameters, so every trainable layer
stays a standard ``nn.Linear``/``nn.Conv3d`` that Opacus computes per-sample gradients for.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


MAP_ENCODINGS = ("fractions", "space_to_depth")


def condition_channels(num_classes: int, factor: int, encoding: str = "fractions") -> int:
    """Channels of an encoded map on the latent grid: C (fractions) or C * factor^3 (space-to-depth)."""
    if encoding == "fractions":
        return num_classes
    if encoding == "space_to_depth":
        return num_classes * factor ** 3
    raise ValueError(f"map encoding must be one of {MAP_ENCODINGS} (got {encoding!r})")


def space_to_depth(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, f*d, f*h, f*w) -> (B, C*f^3, d, h, w): each latent cell's f^3 voxels as channels.

    The 3D analogue of ``torch.nn.functional.pixel_unshuffle``: nothing is averaged away, so the
    denoiser sees where inside a latent cell each tissue lies, not only how much of it there is.
    """
    b, c, depth, height, width = volume.shape
    if depth % factor or height % factor or width % factor:
        raise ValueError(f"map shape {tuple(volume.shape[2:])} is not divisible by {factor}")
    d, h, w = depth // factor, height // factor, width // factor
    folded = volume.reshape(b, c, d, factor, h, factor, w, factor)
    return folded.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor ** 3, d, h, w)


def depth_to_space(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C*f^3, d, h, w) -> (B, C, f*d, f*h, f*w): the inverse of :func:`space_to_depth`."""
    b, channels, d, h, w = grid.shape
    if channels % factor ** 3:
        raise ValueError(f"{channels} channels are not a multiple of {factor}^3")
    c = channels // factor ** 3
    folded = grid.reshape(b, c, factor, factor, factor, d, h, w)
    return folded.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, d * factor, h * factor,
                                                          w * factor)


def label_map_to_latent_grid(label_onehot: torch.Tensor, latent_size: Sequence[int],
                             encoding: str = "fractions") -> torch.Tensor:
    """One-hot map (B, C, D, H, W) -> the encoded map on the latent grid (B, C', d, h, w).

    ``fractions`` (C' = C): area interpolation averages each latent cell's voxels, so
    partial-volume information survives the downsampling. ``space_to_depth`` (C' = C * f^3 with
    f = D / d): every voxel is kept (:func:`space_to_depth`). A map already on the latent grid is
    returned as is (an encoded map from a cache, or a fractions map given at latent resolution).
    """
    size = tuple(int(s) for s in latent_size)
    if tuple(label_onehot.shape[2:]) == size:
        return label_onehot
    if encoding == "space_to_depth":
        factor = label_onehot.shape[2] // size[0]
        if tuple(label_onehot.shape[2:]) != tuple(s * factor for s in size):
            raise ValueError(f"map shape {tuple(label_onehot.shape[2:])} is not the latent grid "
                             f"{size} times one integer factor")
        return space_to_depth(label_onehot, factor)
    if encoding != "fractions":
        raise ValueError(f"map encoding must be one of {MAP_ENCODINGS} (got {encoding!r})")
    return F.interpolate(label_onehot, size=size, mode="area")


def compact_latent_map(label_onehot: torch.Tensor, latent_size: Sequence[int],
                       encoding: str = "fractions") -> torch.Tensor:
    """:func:`label_map_to_latent_grid` for keeping many maps in memory or on disk: a space-to-depth
    map is 0/1, so it is returned as uint8 (a quarter of float32); fractions stay float."""
    encoded = label_map_to_latent_grid(label_onehot, latent_size, encoding)
    return encoded.to(torch.uint8) if encoding == "space_to_depth" else encoded


def draw_condition_mask(batch_size: int, dropout: float, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Float (B,) mask: 1 keeps a sample's condition, 0 replaces it by the null condition.

    Each sample is dropped independently with probability ``dropout`` (classifier-free guidance
    training); one uniform draw per sample from ``generator``.
    """
    if dropout <= 0.0:
        return torch.ones(batch_size, device=device)
    draws = torch.rand(batch_size, generator=generator)
    return (draws >= dropout).to(dtype=torch.float32, device=device)


class AttributeEmbedding(nn.Module):
    """Packed attributes (B, A + 1) -> embedding (B, E), in place of MONAI's ``class_embedding``.

    The input is ``[raw attributes..., presence flag]``. Attributes are standardised with the public
    cohort's mean and std (buffers, set once by :meth:`set_statistics`), zeroed where the flag is 0
    (the null condition), and projected by two ``nn.Linear`` layers. Non-finite values count as the
    mean. No in-place operations, so Opacus hooks see unmodified layer outputs.
    """

    def __init__(self, num_attributes: int, embedding_dim: int):
        super().__init__()
        if num_attributes <= 0:
            raise ValueError(
                f"AttributeEmbedding needs at least one attribute (got {num_attributes})")
        self.num_attributes = num_attributes
        self.register_buffer("mean", torch.zeros(num_attributes))
        self.register_buffer("std", torch.ones(num_attributes))
        self.project = nn.Sequential(nn.Linear(num_attributes + 1, embedding_dim), nn.SiLU(),
                                     nn.Linear(embedding_dim, embedding_dim))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardisation constants (A,) from PUBLIC data; a zero or non-finite std becomes 1."""
        std = torch.as_tensor(std, dtype=self.std.dtype)
        std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
        self.mean.copy_(torch.nan_to_num(torch.as_tensor(mean, dtype=self.mean.dtype)))
        self.std.copy_(std)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        values, present = packed[:, :self.num_attributes], packed[:, self.num_attributes:]
        standardised = torch.nan_to_num((values - self.mean) / self.std,
                                        nan=0.0, posinf=0.0, neginf=0.0)
        return self.project(torch.cat([standardised * present, present], dim=1))


def pack_attributes(attributes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attributes (B, A) and keep mask (B,) -> the (B, A + 1) input of AttributeEmbedding."""
    return torch.cat([attributes, keep.to(attributes.dtype)[:, None]], dim=1)
