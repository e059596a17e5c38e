"""The first stage: KL and VQ autoencoders, their losses, and the local-weights perceptual loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import AutoencoderConfig
from models.autoencoder import (AutoencoderLoss, MapDecodingAutoencoderKL,
                                PerceptualWeightsError, build_autoencoder, build_discriminator,
                                decode_latents, decoder_map, downsampling_factor, encode_latents,
                                fft_magnitude_loss, narrow_posterior, reconstruct,
                                reconstruction_quality)
from models.conditioning import depth_to_space, space_to_depth


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(kind: str) -> AutoencoderConfig:
    return AutoencoderConfig(kind=kind, channels=[8, 8], latent_channels=2, norm_num_groups=4,
                             num_embeddings=16)


def blobs(batch: int, seed: int = 0) -> torch.Tensor:
    """Smooth random volumes in [0, 1] (B, 1, 16, 16, 16)."""
    noise = torch.rand(batch, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(16, 16, 16), mode="trilinear",
                                           align_corners=False)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_latent_grid_follows_the_downsampling(kind: str) -> None:
    cfg = tiny(kind)
    autoencoder = build_autoencoder(cfg).eval()
    with torch.no_grad():
        latents = encode_latents(autoencoder, blobs(2))
        assert latents.shape == (2, 2, 8, 8, 8) and downsampling_factor(cfg) == 2
        assert decode_latents(autoencoder, latents).shape == (2, 1, 16, 16, 16)
        # Deterministic encoding (the KL posterior mean, the VQ codes).
        assert torch.equal(latents, encode_latents(autoencoder, blobs(2)))


def test_dict_config_builds_the_same_network() -> None:
    torch.manual_seed(0)
    a = build_autoencoder(tiny("kl"))
    torch.manual_seed(0)
    b = build_autoencoder({"kind": "kl", "channels": [8, 8], "latent_channels": 2,
                           "num_res_blocks": 1, "attention_levels": [False, False],
                           "norm_num_groups": 4, "num_embeddings": 16})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_a_few_adversarial_steps_lower_the_reconstruction_loss(kind: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(kind)
    autoencoder, discriminator = build_autoencoder(cfg), build_discriminator(cfg, (16, 16, 16))
    losses = AutoencoderLoss(adversarial_weight=0.01,
                             regularisation_weight=1e-6 if kind == "kl" else 1.0)
    g_opt = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    images, generator = blobs(2), torch.Generator().manual_seed(1)
    first = None
    for _ in range(12):
        reconstruction, regularisation = reconstruct(autoencoder, images, generator)
        loss, parts = losses.generator_loss(images, reconstruction, regularisation, discriminator)
        first = parts["l1"] if first is None else first
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        d_loss = losses.discriminator_loss(discriminator, images, reconstruction)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        assert {"l1", "regularisation", "adversarial"} <= set(parts) and torch.isfinite(d_loss)
    assert parts["l1"] < 0.7 * first


def _medicalnet_style_weights(path: Path) -> Path:
    """A ResNet-10 state dict in MedicalNet's file layout (random values: nothing is downloaded)."""
    from monai.networks.nets import resnet10

    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                   bias_downsample=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def test_perceptual_loss_loads_local_weights_and_is_differentiable(tmp_path: Path) -> None:
    weights = _medicalnet_style_weights(tmp_path / "r10.pth")
    losses = AutoencoderLoss(0.0, 1e-6, perceptual_weights=weights)
    images = blobs(1)
    reconstruction = blobs(1, seed=3).requires_grad_()
    loss, parts = losses.generator_loss(images, reconstruction, torch.tensor(0.0), None)
    loss.backward()
    assert parts["perceptual"] > 0 and reconstruction.grad.abs().sum() > 0
    same, _ = losses.generator_loss(images, images, torch.tensor(0.0), None)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert all(not p.requires_grad for p in losses.perceptual.parameters())


def test_perceptual_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "bad.pth")
    with pytest.raises(PerceptualWeightsError, match="not a MedicalNet"):
        AutoencoderLoss(0.0, 1e-6, perceptual_weights=tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(PerceptualWeightsError, match="cannot read"):
        AutoencoderLoss(0.0, 1e-6, perceptual_weights=tmp_path / "junk.pth")


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_gan_terms_are_reported_differentiable_and_lower_the_loss(kind: str) -> None:
    """KL-GAN and VQ-GAN share every term: SSIM, FFT magnitude, adversarial, feature matching."""
    torch.manual_seed(0)
    cfg = tiny(kind)
    autoencoder, discriminator = build_autoencoder(cfg), build_discriminator(cfg, (16, 16, 16))
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in discriminator.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in discriminator.modules())
    losses = AutoencoderLoss(0.05, 1e-6 if kind == "kl" else 1.0, feature_matching_weight=1.0,
                             ssim_weight=0.5, fft_weight=0.1, image_shape=(16, 16, 16))
    g_opt = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    images, generator = blobs(2), torch.Generator().manual_seed(1)
    history = []
    for _ in range(12):
        reconstruction, regularisation = reconstruct(autoencoder, images, generator)
        loss, parts = losses.generator_loss(images, reconstruction, regularisation, discriminator)
        history.append(parts)
        g_opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all()
                   for p in autoencoder.parameters())
        g_opt.step()
        d_loss = losses.discriminator_loss(discriminator, images, reconstruction)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
    assert {"l1", "ssim_loss", "fft", "adversarial", "feature_matching"} <= set(history[-1])
    for term in ("l1", "ssim_loss", "fft"):
        assert history[-1][term] < history[0][term], term


def test_structural_and_feature_matching_terms_vanish_on_a_perfect_reconstruction() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(tiny("kl"), (16, 16, 16))
    losses = AutoencoderLoss(0.0, 0.0, feature_matching_weight=1.0, ssim_weight=1.0,
                             fft_weight=1.0, image_shape=(16, 16, 16))
    images = blobs(2)
    loss, parts = losses.generator_loss(images, images.clone(), torch.tensor(0.0), discriminator)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["feature_matching"] == pytest.approx(0.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool3d(images, 3, stride=1, padding=1)
    _, parts = losses.generator_loss(images, blurred, torch.tensor(0.0), discriminator)
    assert parts["ssim_loss"] > 0 and parts["fft"] > 0 and parts["feature_matching"] > 0


@pytest.mark.parametrize("side", [16, 6])
def test_separable_ssim_loss_matches_monai(side: int) -> None:
    """Value and gradient of MONAI's SSIMLoss (full 3-D Gaussian window), window clipped to fit."""
    from monai.losses import SSIMLoss

    from models.autoencoder import SeparableSSIMLoss, ssim_window
    torch.manual_seed(0)
    x = torch.rand(2, 1, side, side, side, requires_grad=True)
    y = (0.7 * x.detach() + 0.3 * torch.rand_like(x)).clamp(0, 1)
    window = ssim_window((side, side, side))
    expected = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=window)(x, y)
    got = SeparableSSIMLoss(win_size=window)(x, y)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    grad_expected, = torch.autograd.grad(expected, x)
    grad_got, = torch.autograd.grad(got, x)
    assert torch.allclose(grad_got, grad_expected, atol=1e-8, rtol=1e-4)
    assert SeparableSSIMLoss(win_size=window)(y, y).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        SeparableSSIMLoss()(x, y[:, :, :-1])


def test_batch_norm_discriminator_is_still_available() -> None:
    discriminator = build_discriminator(tiny("kl"), (16, 16, 16), norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in discriminator.modules())


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_reconstruction_quality_matches_psnr_by_hand(kind: str) -> None:
    torch.manual_seed(0)
    autoencoder = build_autoencoder(tiny(kind)).train()
    images = blobs(3)
    quality = reconstruction_quality(autoencoder, images, batch_size=2)
    assert autoencoder.training  # the caller's mode is kept
    with torch.no_grad():
        autoencoder.eval()
        reconstruction = decode_latents(autoencoder, encode_latents(autoencoder, images))
    mse = (reconstruction.clamp(0, 1) - images).pow(2).flatten(1).mean(1)
    assert quality["psnr"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-4)
    assert -1.0 <= quality["ssim"] < 1.0
    assert fft_magnitude_loss(images, images).item() == 0.0


def test_narrow_posterior_starts_the_kl_model_near_deterministic() -> None:
    torch.manual_seed(0)
    autoencoder = build_autoencoder(tiny("kl"))
    _, wide = autoencoder.encode(blobs(1))
    narrow_posterior(autoencoder, -10.0)
    _, sigma = autoencoder.encode(blobs(1))
    assert wide.mean() > 0.3
    assert torch.allclose(sigma, torch.full_like(sigma, float(torch.exp(torch.tensor(-5.0)))))
    vq = build_autoencoder(tiny("vq"))
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    narrow_posterior(vq, -10.0)
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())


def shells(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes (B, 1, 16, 16, 16) of nested spheres and their one-hot maps (B, 3, 16, 16, 16);
    each volume's spheres have their own radius, so the maps differ at full resolution."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij")) - 7.5
    radius = grid.norm(dim=0)
    labels = torch.stack([(radius < 6.0 - 0.5 * b).long() + (radius < 3.0 + 0.5 * b).long()
                          for b in range(batch)])
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    images = torch.tensor([0.0, 0.5, 1.0])[labels].unsqueeze(1)
    return images, onehot


def test_a_decoder_that_sees_the_map_follows_it() -> None:
    """decoder_map_classes > 0: the decoder takes the space-to-depth map beside the latents;
    the encoder is MONAI's as before (same latents for the same weights); another map changes
    the decoded volume; a missing or mismatched map is one clear error."""
    torch.manual_seed(0)
    cfg = AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4,
                            decoder_map_classes=3)
    autoencoder = build_autoencoder(cfg).eval()
    assert isinstance(autoencoder, MapDecodingAutoencoderKL)
    images, onehot = shells(2)
    grid = decoder_map(autoencoder, onehot)
    assert torch.equal(grid, space_to_depth(onehot, 2)) and grid.shape == (2, 24, 8, 8, 8)
    assert torch.equal(depth_to_space(grid, 2), onehot)
    with torch.no_grad():
        latents = encode_latents(autoencoder, images)
        decoded = decode_latents(autoencoder, latents, grid)
        other_map = decode_latents(autoencoder, latents, grid.flip(0))
    assert decoded.shape == (2, 1, 16, 16, 16)
    assert not torch.allclose(decoded, other_map)
    plain = build_autoencoder(tiny("kl"))
    plain.encoder.load_state_dict(autoencoder.encoder.state_dict())
    for name in ("quant_conv_mu", "quant_conv_log_sigma"):
        getattr(plain, name).load_state_dict(getattr(autoencoder, name).state_dict())
    assert torch.equal(encode_latents(plain, images), latents)
    assert decoder_map(plain, onehot) is None
    with pytest.raises(ValueError, match="needs the label map"):
        decoder_map(autoencoder, None)
    with pytest.raises(ValueError, match="maps of 3 classes; got 4"):
        decoder_map(autoencoder, torch.zeros(2, 4, 16, 16, 16))
    with pytest.raises(ValueError, match="needs the label map"):
        decode_latents(autoencoder, latents)
    with pytest.raises(ValueError, match="needs kind 'kl'"):
        build_autoencoder(AutoencoderConfig(kind="vq", channels=[8, 8], latent_channels=2,
                                            norm_num_groups=4, decoder_map_classes=3))


def test_a_decoder_that_sees_the_map_learns_from_it() -> None:
    """Volumes whose intensity is set voxel by voxel by a random map hold more detail than a
    2-channel latent at half resolution can carry: after the same steps of the same losses, the
    map-decoding autoencoder reconstructs them better than the same network without the map."""
    labels = torch.randint(0, 3, (4, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    images = torch.tensor([0.0, 0.5, 1.0])[labels].unsqueeze(1)
    losses = AutoencoderLoss(adversarial_weight=0.0, regularisation_weight=1e-6,
                             image_shape=(16, 16, 16))
    psnr = {}
    for classes in (0, 3):
        torch.manual_seed(0)
        cfg = AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4,
                                decoder_map_classes=classes)
        autoencoder = build_autoencoder(cfg)
        narrow_posterior(autoencoder, -10.0)
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(60):
            reconstruction, regularisation = reconstruct(
                autoencoder, images, generator, decoder_map(autoencoder, onehot))
            loss, _ = losses.generator_loss(images, reconstruction, regularisation, None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        psnr[classes] = reconstruction_quality(autoencoder, images, label_onehot=onehot)["psnr"]
    assert psnr[3] > psnr[0] + 3.0  # dB
