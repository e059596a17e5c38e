"""configs/gpu128.yaml cannot rot unnoticed: it loads, builds, and each of its networks takes one
training step at batch 1 on the CPU (the autoencoder and discriminator on the preset's 64^3 crops,
the UNet on a whole 32^3 latent, a DP-SGD step on the attention and conditioning subset).

The GPU figures (memory, step times) are measured by experiments/benchmarks/gpu_scale.py; this test
only proves the preset's code path runs. Under ``/usr/bin/time -v`` it peaks well below 24 GB.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock

from configs import load_config

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "gpu128.yaml"


@pytest.fixture(scope="module")
def config():
    loaded = load_config(PRESET, check_paths=False)
    # The CPU path of the same preset: fp32 (CPU bf16 3D convolutions are slow reference kernels).
    return dataclasses.replace(loaded, device="cpu", precision="fp32")


def test_preset_is_the_documented_128_cube(config):
    assert tuple(config.data.shape) == (128, 128, 128)
    assert all(1.5 <= s <= 2.0 for s in config.data.spacing)
    assert config.model.autoencoder.downsampling == 4           # latent 32^3
    latent = config.data.shape[0] // config.model.autoencoder.downsampling
    levels = [latent // 2 ** i for i in range(len(config.model.unet.channels))]
    attended = [size for size, a in zip(levels, config.model.unet.attention_levels) if a]
    assert latent == 32 and attended == [16, 8]                  # never attention at 32^3
    assert not any(config.model.autoencoder.attention_levels)
    assert config.memory.flash_attention and config.memory.stream_from_disk
    assert load_config(PRESET, check_paths=False).precision == "bf16"
    assert config.pretrain.unet.batch_size >= 2


@pytest.mark.slow
def test_every_network_of_the_preset_takes_a_training_step_on_the_cpu(config):
    from experiments.pretrain import PublicCohort, _autoencoder_epoch, _Training, _unet_epoch
    from models.autoencoder import AutoencoderLoss
    from models.diffusion import build_scheduler, diffusion_loss
    from models.latent_unet import build_latent_unet
    from models.memory import configure
    from privacy.dp_trainer import DPSettings, backward_per_patient, privatise, release
    from privacy.trainable import apply_trainable, trainable_parameter_names

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    shape = tuple(config.data.shape)
    classes = config.data.num_classes
    labels = torch.randint(0, classes, (1, *shape), generator=generator, dtype=torch.uint8)
    cohort = PublicCohort(images=torch.rand(1, 1, *shape, generator=generator), labels=labels,
                          attributes=torch.tensor([[50.0, 1.0]]),
                          affines=torch.eye(4, dtype=torch.float64)[None])

    training = _Training(config)
    assert training.autoencoder.use_checkpoint  # memory.gradient_checkpointing
    assert all(m.use_flash_attention for m in training.denoiser.modules()
               if isinstance(m, SABlock))

    # Autoencoder + discriminator (adversarial epoch), batch 1, on a random 64^3 crop.
    ae_before = [p.detach().clone() for p in training.autoencoder.parameters()]
    d_before = [p.detach().clone() for p in training.discriminator.parameters()]
    losses = AutoencoderLoss(config.pretrain.autoencoder.adversarial_weight,
                             config.pretrain.autoencoder.kl_weight)
    metrics = _autoencoder_epoch(training, losses, cohort, config,
                                 epoch=config.pretrain.autoencoder.epochs // 4)
    assert {"autoencoder/l1", "autoencoder/adversarial", "autoencoder/discriminator"} <= \
        set(metrics) and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, p) for a, p in zip(ae_before, training.autoencoder.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(d_before,
                                                     training.discriminator.parameters()))
    with torch.no_grad():
        latent = training.autoencoder.encode(cohort.images)[0]
    assert tuple(latent.shape) == (1, config.model.autoencoder.latent_channels, 32, 32, 32)

    # UNet, batch 1, whole 32^3 latent, checkpointed blocks and fused attention.
    grid = torch.nn.functional.one_hot(labels.long(), classes).permute(0, 4, 1, 2, 3).float()
    label_grid = torch.nn.functional.interpolate(grid, size=(32, 32, 32), mode="area")
    unet_before = [p.detach().clone() for p in training.denoiser.parameters()]
    scheduler = build_scheduler(config.model)
    metrics = _unet_epoch(training, scheduler, latent.detach(), label_grid, cohort.attributes,
                          config, epoch=0)
    assert torch.isfinite(torch.tensor(metrics["unet/loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(unet_before, training.denoiser.parameters()))
    del training

    # DP-SGD on the attention + conditioning subset (no checkpointing under DP), batch 1.
    torch.manual_seed(1)
    denoiser = configure(build_latent_unet(config.model, classes, 2), config.memory)
    apply_trainable(denoiser, "attention_conditioning")
    trained = set(trainable_parameter_names(denoiser, "attention_conditioning"))
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    settings = DPSettings(max_grad_norm=1.0, expected_batch_size=1, grad_sample_mode="hooks",
                          trainable="attention_conditioning")
    module, optimizer = privatise(denoiser, settings, 1.0,
                                  noise_generator=torch.Generator().manual_seed(2))

    def loss_fn(model, batch):
        return diffusion_loss(model, scheduler, batch["latents"], batch["labels"],
                              batch["attributes"], generator=torch.Generator().manual_seed(3))

    backward_per_patient(module, optimizer, loss_fn,
                         {"latents": latent.detach(), "labels": label_grid,
                          "attributes": cohort.attributes}, torch.tensor([0]), 1, "hooks")
    assert all(p.grad_sample.dtype == torch.float32 and p.grad_sample.shape[0] == 1
               for p in optimizer.params)
    optimizer.step()
    release(module, optimizer)
    changed = {n for n, p in denoiser.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trained
