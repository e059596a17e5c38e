"""Memory options: fused attention, gradient checkpointing, tiled decoding, random crops. None may
change a state dict; each must give the same numbers as the plain path (or say how it differs)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import AutoencoderKL

from configs import AutoencoderConfig, ConditioningConfig, ModelConfig, UNetConfig
from models.diffusion import LatentDiffusion
from models.latent_unet import build_latent_unet
from models.memory import (configure, decode_tiled, random_crop, use_flash_attention,
                           use_gradient_checkpointing)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_denoiser(seed: int = 0):
    cfg = ModelConfig(autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2,
                                                    norm_num_groups=4),
                      unet=UNetConfig(channels=[8, 16], attention_levels=[False, True],
                                      num_head_channels=8, norm_num_groups=4),
                      conditioning=ConditioningConfig(mode="concat"))
    torch.manual_seed(seed)
    denoiser = build_latent_unet(cfg, 3, 0)
    with torch.no_grad():  # MONAI zero-initialises some projections: give every layer a gradient
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return denoiser


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, 8, 8, 8, generator=generator), torch.tensor([3, 700]),
            torch.rand(2, 3, 8, 8, 8, generator=generator))


def test_flash_attention_switches_every_block_and_gives_the_same_output():
    plain = tiny_denoiser()
    fused = copy.deepcopy(plain)
    assert use_flash_attention(fused) == sum(isinstance(m, SABlock) for m in fused.modules()) > 0
    assert all(m.use_flash_attention for m in fused.modules() if isinstance(m, SABlock))
    assert list(fused.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs()), plain(*inputs()), rtol=1e-4, atol=1e-5)


def test_unet_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_denoiser()
    checkpointed = copy.deepcopy(plain)
    assert use_gradient_checkpointing(checkpointed) == 2 + 1 + 2  # down, middle, up blocks
    assert use_gradient_checkpointing(checkpointed) == 0  # idempotent
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    for model in (plain, checkpointed):
        model.train()
        model(*inputs()).pow(2).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    copy.deepcopy(checkpointed)  # EMA copies still work


def test_autoencoder_checkpointing_uses_monai_option():
    autoencoder = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 8],
                                latent_channels=2, num_res_blocks=1,
                                attention_levels=[False, False], norm_num_groups=4)
    assert not autoencoder.use_checkpoint
    assert use_gradient_checkpointing(autoencoder) == 1
    assert autoencoder.use_checkpoint


def test_tiled_decoding_covers_the_volume_and_equals_one_piece_when_the_tile_fits():
    calls = []

    def decode(z: torch.Tensor) -> torch.Tensor:  # a x2 "decoder": nearest upsampling of channel 0
        calls.append(tuple(z.shape[2:]))
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=2, mode="nearest")

    latents = torch.randn(1, 2, 8, 8, 8)
    whole = decode(latents)
    calls.clear()
    assert torch.equal(decode_tiled(decode, latents, (8, 8, 8)), whole)
    assert calls == [(8, 8, 8)]
    calls.clear()
    tiled = decode_tiled(decode, latents, (4, 4, 4))
    assert tiled.shape == (1, 1, 16, 16, 16)
    assert set(calls) == {(4, 4, 4)} and len(calls) > 8  # overlapping tiles
    # A local (voxel-wise) decoder is reproduced exactly by Gaussian-blended tiles.
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_configure_applies_decode_tile_and_leaves_weights_alone():
    memory = SimpleNamespace(flash_attention=True, gradient_checkpointing=True,
                             decode_tile=(4, 4, 4))
    autoencoder = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 8],
                                latent_channels=2, num_res_blocks=1,
                                attention_levels=[False, False], norm_num_groups=4)
    model = LatentDiffusion(autoencoder, tiny_denoiser(), {
        "autoencoder": {"channels": [8, 8], "latent_channels": 2},
        "conditioning": {"guidance_scale": 1.0}}, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configure(model, memory)  # inference: no checkpointing
    assert model.decode_tile == (4, 4, 4) and not autoencoder.use_checkpoint
    assert model.decode(torch.randn(1, 2, 8, 8, 8)).shape == (1, 1, 16, 16, 16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tiled_decoding_hands_each_tile_its_own_part_of_the_map():
    """A decoder that sees the map decodes in tiles too: the map rides beside the latents, so
    each tile decodes with the map under it, and the result is close to decoding in one piece."""
    from models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    autoencoder = build_autoencoder(AutoencoderConfig(
        channels=[8, 8], latent_channels=2, norm_num_groups=4, decoder_map_classes=3)).eval()
    model = LatentDiffusion(autoencoder, tiny_denoiser(), {
        "autoencoder": {"channels": [8, 8], "latent_channels": 2},
        "conditioning": {"guidance_scale": 1.0}}, 1.0)
    latents = torch.randn(1, 2, 8, 8, 8)
    labels = torch.randint(0, 3, (1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    whole = model.decode(latents, onehot)
    model.decode_tile = (6, 6, 6)
    tiled = model.decode(latents, onehot)
    other = model.decode(latents, onehot.roll(1, dims=2))
    assert tiled.shape == whole.shape == (1, 1, 16, 16, 16)
    # Tiles normalise on their own statistics, so close, not equal; another map moves it more.
    assert (tiled - whole).abs().mean() < 0.5 * (other - whole).abs().mean()
    with pytest.raises(ValueError, match="needs the label map"):
        model.decode(latents)


def test_random_crop_is_seeded_shared_by_the_batch_and_off_without_a_size():
    images = torch.arange(2 * 16 ** 3, dtype=torch.float32).reshape(2, 1, 16, 16, 16)
    assert random_crop(images, None, torch.Generator()) is images
    assert random_crop(images, (16, 16, 16), torch.Generator()) is images
    a = random_crop(images, (8, 8, 8), torch.Generator().manual_seed(0))
    b = random_crop(images, (8, 8, 8), torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 8, 8, 8) and torch.equal(a, b)
    assert torch.equal(a[1] - a[0], torch.full_like(a[0], 16.0 ** 3))  # same window in both
    corners = {float(random_crop(images, (8, 8, 8), torch.Generator().manual_seed(s))[0].min())
               for s in range(6)}
    assert len(corners) > 1
