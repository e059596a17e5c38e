"""The per-sample diffusion loss, training progress, and seeded guided sampling."""

from __future__ import annotations

import pytest
import torch

from configs import AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig, UNetConfig
from models.autoencoder import build_autoencoder
from models.conditioning import label_map_to_latent_grid
from models.diffusion import LatentDiffusion, build_sampler, build_scheduler, diffusion_loss
from models.latent_unet import build_latent_unet

CLASSES = 4


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(mode: str = "concat", guidance: float = 1.0,
               prediction: str = "v_prediction") -> ModelConfig:
    return ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(mode=mode, dropout=0.2, guidance_scale=guidance),
        diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=4,
                                  prediction_type=prediction))


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


def test_loss_is_per_sample_and_independent_of_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    cfg = tiny_model()
    denoiser, scheduler = activate(build_latent_unet(cfg, CLASSES, 2)).eval(), build_scheduler(cfg)
    latents, maps, values = torch.randn(4, 2, 8, 8, 8), random_maps(4), torch.randn(4, 2)
    noise, timesteps = torch.randn(4, 2, 8, 8, 8), torch.tensor([0, 4, 11, 19])
    with torch.no_grad():
        batch = diffusion_loss(denoiser, scheduler, latents, maps, values, noise=noise,
                               timesteps=timesteps)
        assert batch.shape == (4,) and (batch > 0).all()
        alone = torch.cat([
            diffusion_loss(denoiser, scheduler, latents[i:i + 1], maps[i:i + 1], values[i:i + 1],
                           noise=noise[i:i + 1], timesteps=timesteps[i:i + 1]) for i in range(4)])
        assert torch.allclose(batch, alone, rtol=1e-5, atol=1e-7)
        # Changing the other members leaves sample 0's loss unchanged.
        latents[1:], maps[1:] = torch.randn(3, 2, 8, 8, 8), random_maps(3, seed=5)
        changed = diffusion_loss(denoiser, scheduler, latents, maps, values, noise=noise,
                                 timesteps=timesteps)
        assert torch.allclose(changed[0], batch[0], rtol=1e-5)
        assert not torch.allclose(changed[1:], batch[1:])


class ZeroDenoiser(torch.nn.Module):
    """Predicts 0 everywhere, so the loss is the mean square of the target itself."""

    def forward(self, latents, timesteps, label_onehot, attributes=None, keep=None):
        return torch.zeros_like(latents)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_target_follows_the_prediction_type(prediction: str) -> None:
    scheduler = build_scheduler(tiny_model(prediction=prediction))
    latents, noise = torch.randn(3, 2, 8, 8, 8), torch.randn(3, 2, 8, 8, 8)
    timesteps = torch.tensor([0, 7, 19])
    loss = diffusion_loss(ZeroDenoiser(), scheduler, latents, random_maps(3), noise=noise,
                          timesteps=timesteps)
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    target = noise if prediction == "epsilon" else velocity
    assert torch.allclose(loss, target.pow(2).flatten(1).mean(1), rtol=1e-5)


def test_loss_draws_are_seeded() -> None:
    cfg = tiny_model()
    denoiser, scheduler = activate(build_latent_unet(cfg, CLASSES, 0)), build_scheduler(cfg)
    latents, maps = torch.randn(3, 2, 8, 8, 8), random_maps(3)
    with torch.no_grad():
        a, b, c = (diffusion_loss(denoiser, scheduler, latents, maps, condition_dropout=0.5,
                                  generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["concat", "spade"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(mode: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_model(mode)
    denoiser, scheduler = build_latent_unet(cfg, CLASSES, 2), build_scheduler(cfg)
    maps, values = random_maps(4), torch.randn(4, 2)
    # Latents that depend on the map, as real ones do, so the clean part of the target is learnable.
    latents = 2 * label_map_to_latent_grid(maps, (8, 8, 8))[:, 1:3] - 0.5
    noise, timesteps = torch.randn(4, 2, 8, 8, 8), torch.tensor([2, 6, 10, 15])
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return diffusion_loss(denoiser, scheduler, latents, maps, values, noise=noise,
                              timesteps=timesteps).mean()

    first = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * first


def tiny_model_with_autoencoder(guidance: float = 1.0,
                                prediction: str = "v_prediction") -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = tiny_model("concat", guidance, prediction)
    denoiser = activate(build_latent_unet(cfg, CLASSES, 2))
    return LatentDiffusion(build_autoencoder(cfg.autoencoder), denoiser, cfg,
                           latent_scale_factor=1.3).eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(prediction: str) -> None:
    model = tiny_model_with_autoencoder(prediction=prediction)
    maps, values = random_maps(2), torch.tensor([[40.0, 0.0], [70.0, 1.0]])
    a = model.sample(maps, values, generator=torch.Generator().manual_seed(7), progress=False)
    b = model.sample(maps, values, generator=torch.Generator().manual_seed(7), progress=False)
    c = model.sample(maps, values, generator=torch.Generator().manual_seed(8), progress=False)
    assert a.shape == (2, 1, 16, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # Noise is drawn per sample: the second sample is the same when generated after the first alone.
    generator = torch.Generator().manual_seed(7)
    first = model.sample(maps[:1], values[:1], generator=generator, progress=False)
    second = model.sample(maps[1:], values[1:], generator=generator, progress=False)
    assert torch.allclose(torch.cat([first, second]), a, atol=1e-5)


def test_guidance_scale_changes_the_sample_and_one_is_plain_conditional() -> None:
    model = tiny_model_with_autoencoder(guidance=1.0)
    maps, values = random_maps(1), torch.tensor([[40.0, 0.0]])
    run = {g: model.sample(maps, values, generator=torch.Generator().manual_seed(3),
                           guidance_scale=g, progress=False) for g in (0.0, 1.0, 3.0)}
    assert all(torch.isfinite(v).all() for v in run.values())
    assert not torch.allclose(run[1.0], run[3.0]) and not torch.allclose(run[0.0], run[1.0])
    # g = 0 is the unconditional model: the map and attributes no longer matter.
    other = model.sample(random_maps(1, seed=9), torch.tensor([[80.0, 1.0]]),
                         generator=torch.Generator().manual_seed(3), guidance_scale=0.0,
                         progress=False)
    assert torch.allclose(other, run[0.0], atol=1e-6)


def test_ddim_steps_follow_the_config() -> None:
    sampler = build_sampler(tiny_model())
    sampler.set_timesteps(4)
    assert len(sampler.timesteps) == 4 and int(sampler.timesteps.max()) < 20


def rflow_model() -> ModelConfig:
    cfg = tiny_model()
    return ModelConfig(autoencoder=cfg.autoencoder, unet=cfg.unet, conditioning=cfg.conditioning,
                       diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=4,
                                                 scheduler="rflow"))


class FlowOracle(torch.nn.Module):
    """The exact rectified-flow velocity towards one known clean latent ``target``:
    x_t = (1 - s) x0 + s noise with s = t / T, so noise = (x_t - (1 - s) x0) / s."""

    def __init__(self, target: torch.Tensor, train_timesteps: int):
        super().__init__()
        self.target, self.steps = target, train_timesteps

    def forward(self, latents, timesteps, label_onehot, attributes=None, keep=None):
        s = (timesteps.float() / self.steps).view(-1, 1, 1, 1, 1)
        noise = (latents - (1 - s) * self.target) / s
        return self.target - noise


def test_rectified_flow_trains_on_the_velocity_and_samples_to_the_clean_latent() -> None:
    cfg = rflow_model()
    scheduler = build_scheduler(cfg)
    latents, noise = torch.randn(3, 2, 8, 8, 8), torch.randn(3, 2, 8, 8, 8)
    timesteps = torch.tensor([1, 7, 20])
    loss = diffusion_loss(ZeroDenoiser(), scheduler, latents, random_maps(3), noise=noise,
                          timesteps=timesteps)
    assert torch.allclose(loss, (latents - noise).pow(2).flatten(1).mean(1), rtol=1e-5)
    assert diffusion_loss(FlowOracle(latents, 20), scheduler, latents, random_maps(3),
                          noise=noise, timesteps=timesteps).max() < 1e-10
    # Euler steps along a straight path land on the clean latent from any noise.
    from models.diffusion import sample_latents
    sampler = build_sampler(cfg)
    start = torch.randn(3, 2, 8, 8, 8)
    clean = sample_latents(FlowOracle(latents, 20), sampler, start, random_maps(3), steps=4,
                           progress=False)
    assert [int(t) for t in sampler.timesteps] == [20, 15, 10, 5]
    assert torch.allclose(clean, latents, atol=1e-5)


def test_a_rectified_flow_model_samples_reproducibly() -> None:
    cfg = rflow_model()
    denoiser = activate(build_latent_unet(cfg, CLASSES, 2))
    model = LatentDiffusion(build_autoencoder(cfg.autoencoder), denoiser, cfg,
                            latent_scale_factor=1.3).eval()
    maps, values = random_maps(2), torch.tensor([[40.0, 0.0], [70.0, 1.0]])
    a, b = (model.sample(maps, values, generator=torch.Generator().manual_seed(7), progress=False)
            for _ in range(2))
    assert a.shape == (2, 1, 16, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)
