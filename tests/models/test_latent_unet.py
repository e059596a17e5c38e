"""The conditioned latent denoiser: shapes, conditioning paths, and Opacus per-sample gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     UNetConfig)
from models.conditioning import (compact_latent_map, draw_condition_mask,
                                 label_map_to_latent_grid, space_to_depth)
from models.latent_unet import attention_and_conditioning_parameters, build_latent_unet

CLASSES = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions run fastest single-threaded on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(mode: str = "concat", map_encoding: str = "fractions") -> ModelConfig:
    return ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(mode=mode, map_encoding=map_encoding, dropout=0.2),
        diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=4))


def activate(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """MONAI zero-initialises each block's last convolution (an untrained UNet predicts 0 whatever
    its input); perturb every weight so that inputs and conditions reach the output."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def random_maps(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    classes = torch.randint(0, CLASSES, (batch, size, size, size),
                            generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(classes, CLASSES).permute(0, 4, 1, 2, 3).float()


@pytest.mark.parametrize("mode", ["concat", "spade"])
@pytest.mark.parametrize("attributes", [0, 2])
def test_output_matches_latent_shape(mode: str, attributes: int) -> None:
    denoiser = build_latent_unet(tiny_model(mode), CLASSES, attributes)
    latents = torch.randn(3, 2, 8, 8, 8)
    values = torch.randn(3, attributes) if attributes else None
    out = denoiser(latents, torch.tensor([0, 5, 19]), random_maps(3), values)
    assert out.shape == latents.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["concat", "spade"])
def test_map_and_attributes_change_the_prediction_and_null_ignores_them(mode: str) -> None:
    torch.manual_seed(0)
    denoiser = activate(build_latent_unet(tiny_model(mode), CLASSES, 2), scale=0.1)
    latents, t = torch.randn(1, 2, 8, 8, 8), torch.tensor([7])
    base = denoiser(latents, t, random_maps(1, seed=0), torch.tensor([[50.0, 1.0]]))
    other_map = denoiser(latents, t, random_maps(1, seed=1), torch.tensor([[50.0, 1.0]]))
    other_age = denoiser(latents, t, random_maps(1, seed=0), torch.tensor([[80.0, 1.0]]))
    assert not torch.allclose(base, other_map) and not torch.allclose(base, other_age)
    null = torch.zeros(1)
    null_a = denoiser(latents, t, random_maps(1, seed=0), torch.tensor([[50.0, 1.0]]), null)
    null_b = denoiser(latents, t, random_maps(1, seed=1), torch.tensor([[80.0, 0.0]]), null)
    assert torch.equal(null_a, null_b)


def test_area_resize_keeps_class_fractions() -> None:
    maps = random_maps(2)
    grid = label_map_to_latent_grid(maps, (8, 8, 8))
    assert grid.shape == (2, CLASSES, 8, 8, 8)
    assert torch.allclose(grid.sum(1), torch.ones(2, 8, 8, 8))
    assert torch.allclose(grid.mean((2, 3, 4)), maps.mean((2, 3, 4)))


def test_space_to_depth_keeps_every_voxel_and_averages_to_the_fractions() -> None:
    maps = random_maps(2)
    folded = label_map_to_latent_grid(maps, (8, 8, 8), "space_to_depth")
    assert folded.shape == (2, CLASSES * 8, 8, 8, 8)
    # Channel c * 8 + 4i + 2j + k of cell (d, h, w) is voxel (2d + i, 2h + j, 2w + k) of class c.
    for c, i, j, k in [(0, 0, 0, 0), (1, 1, 0, 1), (3, 1, 1, 1), (2, 0, 1, 0)]:
        assert torch.equal(folded[:, c * 8 + 4 * i + 2 * j + k], maps[:, c, i::2, j::2, k::2])
    fractions = label_map_to_latent_grid(maps, (8, 8, 8))
    assert torch.allclose(folded.reshape(2, CLASSES, 8, 8, 8, 8).mean(2), fractions)
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(torch.zeros(1, 1, 6, 6, 5), 2)


@pytest.mark.parametrize("mode", ["concat", "spade"])
def test_space_to_depth_sees_where_in_a_cell_a_tissue_lies(mode: str) -> None:
    """Two maps with the same class fractions in every latent cell (one mirrored inside each 2^3
    cell): a fractions model cannot tell them apart, a space-to-depth model can."""
    maps = random_maps(1)
    mirrored = maps.reshape(1, CLASSES, 8, 2, 8, 2, 8, 2).flip(3).reshape(maps.shape)
    assert torch.equal(label_map_to_latent_grid(maps, (8, 8, 8)),
                       label_map_to_latent_grid(mirrored, (8, 8, 8)))
    latents, t = torch.randn(1, 2, 8, 8, 8), torch.tensor([7])
    torch.manual_seed(0)
    fractions = activate(build_latent_unet(tiny_model(mode), CLASSES, 0), scale=0.1)
    assert torch.equal(fractions(latents, t, maps), fractions(latents, t, mirrored))
    torch.manual_seed(0)
    folded = activate(build_latent_unet(tiny_model(mode, "space_to_depth"), CLASSES, 0),
                      scale=0.1)
    assert not torch.allclose(folded(latents, t, maps), folded(latents, t, mirrored))
    # A map encoded ahead (as pretraining and the sites cache it, uint8) gives the same output.
    cached = compact_latent_map(maps, (8, 8, 8), "space_to_depth")
    assert cached.dtype == torch.uint8
    assert compact_latent_map(maps, (8, 8, 8)).dtype == torch.float32   # fractions stay float
    assert torch.allclose(folded(latents, t, cached), folded(latents, t, maps))
    with pytest.raises(ValueError, match="space_to_depth map needs 32 channels"):
        folded(latents, t, label_map_to_latent_grid(maps, (8, 8, 8)))


def test_condition_mask_is_seeded_and_respects_probability() -> None:
    a = draw_condition_mask(1000, 0.3, torch.Generator().manual_seed(4))
    b = draw_condition_mask(1000, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and 0.6 < a.mean() < 0.8
    assert torch.equal(draw_condition_mask(5, 0.0), torch.ones(5))


def test_attention_and_conditioning_parameters_are_a_proper_subset() -> None:
    denoiser = build_latent_unet(tiny_model("spade"), CLASSES, 2)
    names = {n for n, _ in attention_and_conditioning_parameters(denoiser)}
    assert any(".attentions." in n for n in names) and any("class_embedding" in n for n in names)
    assert any("mlp_gamma" in n for n in names)
    assert 0 < len(names) < len(list(denoiser.parameters()))


# Opacus' full backward hooks fire on module outputs when the inputs need no gradient (as here).
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode,map_encoding", [("concat", "fractions"), ("spade", "fractions"),
                                               ("concat", "space_to_depth")])
def test_opacus_per_sample_gradients_match_single_sample_gradients(mode: str,
                                                                    map_encoding: str) -> None:
    """The DP-SGD contract: Opacus' hooks give each sample's own gradient of its own loss."""
    from opacus import GradSampleModule

    from models.diffusion import build_scheduler, diffusion_loss

    torch.manual_seed(1)
    model_cfg = tiny_model(mode, map_encoding)
    denoiser = activate(build_latent_unet(model_cfg, CLASSES, 2))
    scheduler = build_scheduler(model_cfg)
    latents, maps, values = torch.randn(3, 2, 8, 8, 8), random_maps(3), torch.randn(3, 2)
    noise, timesteps = torch.randn(3, 2, 8, 8, 8), torch.tensor([1, 9, 18])

    reference = copy.deepcopy(denoiser)  # Opacus hooks every submodule of the wrapped model
    wrapped = GradSampleModule(denoiser, loss_reduction="sum")
    losses = diffusion_loss(wrapped, scheduler, latents, maps, values, noise=noise,
                            timesteps=timesteps)
    losses.sum().backward()
    for i in range(3):
        single = diffusion_loss(reference, scheduler, latents[i:i + 1], maps[i:i + 1],
                                values[i:i + 1], noise=noise[i:i + 1],
                                timesteps=timesteps[i:i + 1])
        grads = torch.autograd.grad(single.sum(), list(reference.parameters()))
        for p, g in zip(denoiser.parameters(), grads):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-6, rtol=1e-4)
