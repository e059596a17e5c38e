"""Which parameters DP fine-tuning trains: all of them, or the attention and conditioning layers.

``attention_conditioning`` (DP-LDM) trains only the layers that mix information across the volume or
read the condition, and freezes the rest. The privacy cost is unchanged (same q, sigma, steps): a
frozen parameter is simply never released with new information. Fewer trainable parameters mean less
noise in total and cheaper per-sample gradients.

For a fedsynth :class:`models.latent_unet.LatentDenoiser` the selection is the model's own
(:func:`models.latent_unet.attention_and_conditioning_parameters`: attention blocks, the attribute
embedding, SPADE's modulation convolutions and, in concat mode, the input convolution that first
sees the map). For any other module: every parameter of an attention module (MONAI's SABlock,
SpatialAttentionBlock, CrossAttentionBlock, TransformerBlock and the diffusion UNet's transformer
blocks, ``nn.MultiheadAttention``), of a module named ``class_embedding`` and of SPADE blocks.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

Subset = Literal["all", "attention_conditioning"]


def _attention_types() -> tuple[type[nn.Module], ...]:
    from monai.networks.blocks.crossattention import CrossAttentionBlock
    from monai.networks.blocks.selfattention import SABlock
    from monai.networks.blocks.spade_norm import SPADE
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock
    from monai.networks.blocks.transformerblock import TransformerBlock
    from monai.networks.nets.diffusion_model_unet import (DiffusionUNetTransformerBlock,
                                                           SpatialTransformer)
    return (SABlock, SpatialAttentionBlock, CrossAttentionBlock, TransformerBlock,
            DiffusionUNetTransformerBlock, SpatialTransformer, nn.MultiheadAttention, SPADE)


def _generic_selection(model: nn.Module) -> set[str]:
    kinds = _attention_types()
    chosen: set[str] = set()
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if isinstance(module, kinds) or leaf == "class_embedding":
            prefix = f"{module_name}." if module_name else ""
            chosen.update(prefix + name for name, _ in module.named_parameters())
    return chosen


def trainable_parameter_names(model: nn.Module, subset: Subset) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters ``subset`` trains, in order."""
    names = [name for name, _ in model.named_parameters()]
    if subset == "all":
        return names
    if subset != "attention_conditioning":
        raise ValueError(f"trainable must be 'all' or 'attention_conditioning' (got {subset!r})")
    chosen: set[str] | None = None
    try:
        from models.latent_unet import LatentDenoiser, attention_and_conditioning_parameters
    except ImportError:
        LatentDenoiser = None
    if LatentDenoiser is not None and isinstance(model, LatentDenoiser):
        chosen = {name for name, _ in attention_and_conditioning_parameters(model)}
    if chosen is None:
        chosen = _generic_selection(model)
    selected = [name for name in names if name in chosen]
    if not selected:
        raise ValueError(f"trainable 'attention_conditioning' found no attention or conditioning "
                         f"layer in {type(model).__name__}; use trainable: all")
    return selected


def apply_trainable(model: nn.Module, subset: Subset) -> dict[str, bool]:
    """Freeze every parameter outside ``subset``; returns the previous ``requires_grad`` flags."""
    keep = set(trainable_parameter_names(model, subset))
    previous = {}
    for name, parameter in model.named_parameters():
        previous[name] = parameter.requires_grad
        parameter.requires_grad_(name in keep and parameter.requires_grad)
    return previous


def restore_trainable(model: nn.Module, previous: dict[str, bool]) -> None:
    """Undo :func:`apply_trainable`."""
    for name, parameter in model.named_parameters():
        if name in previous:
            parameter.requires_grad_(previous[name])
