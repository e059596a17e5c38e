"""Memory options for large volumes (128^3 and up), applied to already-built networks.

None of these changes a parameter, a buffer or a state-dict key, so checkpoints and their content
hashes are the same with and without them; they only trade compute for memory:

- :func:`use_flash_attention`: MONAI's attention blocks (``SABlock``, ``CrossAttentionBlock``) call
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA)
  instead of building the explicit (tokens x tokens) attention matrix - the matrix alone is
  ~4 GiB per head and sample at 32^3 tokens in fp32.
- :func:`use_gradient_checkpointing`: MONAI's ``AutoencoderKL`` has ``use_checkpoint`` (its encoder
  and decoder recompute their activations in the backward pass); MONAI's ``DiffusionModelUNet`` has
  no such option, so each of its down, middle and up blocks is made to run under
  ``torch.utils.checkpoint`` (non-reentrant) while training. Not for DP-SGD: a recomputed forward
  fires Opacus' activation hooks twice, so the DP trainers never enable it.
- :func:`decode_tiled`: the autoencoder's decoder run over overlapping latent tiles with MONAI's
  ``sliding_window_inference`` (Gaussian blending), for volumes whose full decode does not fit.
- :func:`random_crop`: MONAI's ``RandSpatialCrop`` drawing one crop per batch from a seeded
  generator, for autoencoder training on crops (the networks are fully convolutional).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import AutoencoderKL
from monai.transforms import RandSpatialCrop
from torch import nn
from torch.utils.checkpoint import checkpoint

_ATTENTION_BLOCKS = (SABlock, CrossAttentionBlock)


def use_flash_attention(module: nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI attention block inside ``module`` to (or from) fused SDPA attention.

    Returns the number of blocks switched. Blocks that save their attention map or use relative
    position embeddings (which SDPA cannot) are left as they are.
    """
    switched = 0
    for block in module.modules():
        if not isinstance(block, _ATTENTION_BLOCKS):
            continue
        if enabled and (getattr(block, "save_attn", False) or
                        getattr(block, "rel_positional_embedding", None) is not None):
            continue
        block.use_flash_attention = bool(enabled)
        switched += 1
    return switched


class _Checkpointed:
    """Mixin put in front of a block's class: its forward runs under activation checkpointing
    while training with gradients enabled (plain forward otherwise)."""

    def forward(self, *args, **kwargs):  # noqa: D401 - same contract as the block's own forward
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpoint_block(block: nn.Module) -> bool:
    cls = type(block)
    if issubclass(cls, _Checkpointed):
        return False
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    block.__class__ = _CHECKPOINTED_CLASSES[cls]
    return True


def use_gradient_checkpointing(module: nn.Module) -> int:
    """Activation checkpointing for every autoencoder and diffusion UNet inside ``module``.

    ``AutoencoderKL``: MONAI's own ``use_checkpoint``. A UNet (anything with ``down_blocks``,
    ``middle_block`` and ``up_blocks``, as MONAI's ``DiffusionModelUNet`` and
    ``SPADEDiffusionModelUNet``): each of those blocks is checkpointed. Returns how many
    autoencoders and blocks were switched. The state dict is unchanged.
    """
    switched = 0
    for sub in module.modules():
        if isinstance(sub, AutoencoderKL) and not sub.use_checkpoint:
            sub.use_checkpoint = True
            switched += 1
        if all(hasattr(sub, name) for name in ("down_blocks", "middle_block", "up_blocks")):
            for block in [*sub.down_blocks, sub.middle_block, *sub.up_blocks]:
                switched += _checkpoint_block(block)
    return switched


def decode_tiled(decode, latents: torch.Tensor, roi: Sequence[int], overlap: float = 0.25,
                 sw_batch_size: int = 1) -> torch.Tensor:
    """``decode`` ((b, Cz, *roi) latents -> (b, 1, *roi x f) images) over overlapping tiles.

    latents (B, Cz, d, h, w) -> images (B, 1, d f, h f, w f), blended with Gaussian weights
    (MONAI's ``sliding_window_inference``, which follows the decoder's zoom factor ``f``). A roi at
    least as large as the latent grid decodes in one piece.
    """
    roi = tuple(int(r) for r in roi)
    if all(r >= s for r, s in zip(roi, latents.shape[2:])):
        return decode(latents)
    return sliding_window_inference(latents, roi_size=roi, sw_batch_size=sw_batch_size,
                                    predictor=decode, overlap=overlap, mode="gaussian",
                                    progress=False)


def random_crop(images: torch.Tensor, size: Sequence[int] | None,
                generator: torch.Generator) -> torch.Tensor:
    """The same random crop (MONAI ``RandSpatialCrop``) of every volume in ``images`` (B, C, *S).

    ``size`` None or not smaller than the volume: ``images`` unchanged. The crop's corner is drawn
    from ``generator`` (one draw per batch, so a seed fixes it).
    """
    if size is None or all(int(c) >= s for c, s in zip(size, images.shape[2:])):
        return images
    cropper = RandSpatialCrop(roi_size=[int(c) for c in size], random_size=False)
    cropper.set_random_state(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
    cropper.randomize(images.shape[2:])
    return torch.stack([torch.as_tensor(cropper(image, randomize=False)) for image in images])


def configure(module: nn.Module, memory, *, training: bool = False) -> nn.Module:
    """Apply a ``memory`` config section (``configs.schema.MemoryConfig``, duck-typed) to a built
    network or :class:`~models.diffusion.LatentDiffusion`: flash attention; gradient
    checkpointing when ``training`` (never pass ``training=True`` for a DP-SGD model); tiled
    decoding on a model with a ``decode_tile`` attribute. Returns ``module``."""
    if memory.flash_attention:
        use_flash_attention(module)
    if training and memory.gradient_checkpointing:
        use_gradient_checkpointing(module)
    if hasattr(module, "decode_tile") and memory.decode_tile is not None:
        module.decode_tile = tuple(int(t) for t in memory.decode_tile)
    return module
