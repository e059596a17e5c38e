"""DP-SGD under a bf16 autocast forward (CPU autocast): per-sample gradients, their norms, the
clipping and the noise stay fp32, and clip and noise exactly as in an fp32 run."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from models.device import autocast
from privacy.dp_trainer import DPSettings, privatise, release
from privacy.grad_samplers import active_conv3d_grad_sampler, use_conv3d_grad_sampler

BATCH = 4
SIGMA = 1.3
CLIP = 0.05  # below every per-sample norm: every sample is clipped


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet() -> DiffusionModelUNet:
    """Conv3d, GroupNorm, Linear and attention layers; every weight perturbed (MONAI zero-inits
    some projections, which would leave layers without gradient)."""
    torch.manual_seed(0)
    model = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=[8, 8],
                               attention_levels=[False, True], num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(BATCH, 2, 8, 8, 8, generator=generator),
            "noise": torch.randn(BATCH, 1, 8, 8, 8, generator=generator),
            "t": torch.randint(0, 1000, (BATCH,), generator=generator)}


def dp_step(precision: str) -> dict[str, object]:
    """One DP-SGD step of the tiny UNet; what the optimizer saw at each stage."""
    model, data = tiny_unet(), batch()
    settings = DPSettings(max_grad_norm=CLIP, expected_batch_size=BATCH, grad_sample_mode="hooks")
    module, optimizer = privatise(model, settings, SIGMA,
                                  noise_generator=torch.Generator().manual_seed(7))
    with autocast("cpu", precision):
        prediction = module(data["x"], timesteps=data["t"])
        losses = (prediction.float() - data["noise"]).pow(2).flatten(1).mean(dim=1)
    losses.sum().backward()
    params = optimizer.params
    grad_samples = [p.grad_sample.detach().clone() for p in params]
    activation_dtype = prediction.dtype
    optimizer.clip_and_accumulate()
    summed = [p.summed_grad.detach().clone() for p in params]
    norms = torch.stack([g.reshape(BATCH, -1).norm(dim=1) for g in grad_samples]).norm(dim=0)
    optimizer.add_noise()
    noise = [p.grad.detach() - s for p, s in zip(params, summed)]  # add_noise: p.grad = sum + n
    result = {"output_dtype": activation_dtype, "grad_samples": grad_samples, "norms": norms,
              "summed": summed, "noise": noise, "grad_dtypes": {p.grad.dtype for p in params}}
    release(module, optimizer)
    return result


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_under_bf16_autocast_keeps_per_sample_gradients_norms_clipping_and_noise_fp32():
    use_conv3d_grad_sampler("grouped")
    assert active_conv3d_grad_sampler() == "grouped"  # the upcasting wrapper is seen through
    full, mixed = dp_step("fp32"), dp_step("bf16")
    assert full["output_dtype"] == torch.float32
    assert mixed["output_dtype"] == torch.bfloat16  # the forward really ran in bf16

    # Per-sample gradients and everything after them are fp32.
    assert all(g.dtype == torch.float32 for g in mixed["grad_samples"])
    assert all(s.dtype == torch.float32 for s in mixed["summed"])
    assert mixed["grad_dtypes"] == {torch.float32}

    # Per-sample norms agree up to the bf16 forward's rounding (8 mantissa bits: ~0.4% per op).
    torch.testing.assert_close(mixed["norms"], full["norms"], rtol=0.05, atol=0.0)
    assert bool((full["norms"] > CLIP).all()) and bool((mixed["norms"] > CLIP).all())

    # Clipping: each sample scaled to norm exactly C (as in fp32), so the clipped sum's norm is
    # bounded by B * C in both runs.
    for run in (full, mixed):
        total = torch.stack([s.norm() for s in run["summed"]]).norm()
        assert total <= BATCH * CLIP * (1 + 1e-5)

    # Noise: the same fp32 draws N(0, sigma^2 C^2) from the same generator, to fp32 rounding.
    for a, b in zip(full["noise"], mixed["noise"]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    noise = torch.cat([n.flatten() for n in mixed["noise"]])
    assert abs(float(noise.std()) / (SIGMA * CLIP) - 1) < 0.1


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_fp32_per_sample_gradients_are_unchanged_by_the_upcasting_wrapper():
    """The wrapper passes fp32 tensors through untouched: fp32 results equal plain autograd."""
    use_conv3d_grad_sampler("grouped")
    model, data = tiny_unet(), batch()
    reference = copy.deepcopy(model)
    rows = []
    for i in range(BATCH):
        reference.zero_grad()
        out = reference(data["x"][i:i + 1], timesteps=data["t"][i:i + 1])
        (out - data["noise"][i:i + 1]).pow(2).mean().backward()
        rows.append([p.grad.detach().clone() for p in reference.parameters()])
    module, optimizer = privatise(model, DPSettings(grad_sample_mode="hooks"), 1.0)
    out = module(data["x"], timesteps=data["t"])
    (out - data["noise"]).pow(2).flatten(1).mean(dim=1).sum().backward()
    for j, p in enumerate(model.parameters()):
        for i in range(BATCH):
            torch.testing.assert_close(p.grad_sample[i], rows[i][j], rtol=1e-4, atol=1e-6)
    release(module, optimizer)
