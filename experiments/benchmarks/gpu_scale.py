"""One GPU at realistic resolution: configs/gpu128.yaml (128^3, 1.5 mm) step times, peak memory.

Measured on the CUDA device (``--device``, else the first GPU), with the preset's own settings
(bf16 autocast, fused attention, gradient checkpointing in pretraining, 64^3 autoencoder crops):

- ``pretraining``: the autoencoder + discriminator step (batch ``pretrain.autoencoder.batch_size``,
  64^3 crops) and the UNet step on whole 32^3 latents at batch 2 and at
  ``pretrain.unet.batch_size``: median seconds per step and peak memory (GiB). Goal: the UNet
  pretraining step fits in 80 GB at batch >= 2.
- ``dp``: the DP-SGD step (``privacy.dp_trainer``: per-sample gradients through Opacus hooks and
  the grouped Conv3d sampler, fp32 clipping and noise, Adam) against the non-DP step (forward,
  ``mean().backward()``, Adam; no checkpointing, like DP) on the same batch of
  ``privacy.max_physical_batch_size`` rows, for the whole UNet and for the attention and
  conditioning subset; steps interleaved (non-DP, DP, repeated) and the median of the paired
  ratios reported, with each step's peak memory. Goal: DP <= 1.3x non-DP for the whole UNet.
- ``sampling``: volumes per second of 50-step DDIM sampling plus decoding to 128^3 (batch 1 and
  4). Goal: one 128^3 volume sampled and decoded in <= 2 s on an H100/H200-class GPU.

Random weights: step times and memory do not depend on what the weights are. A measurement that
runs out of memory is reported as such. On a machine without CUDA the benchmark prints one line
and measures nothing (the figures are GPU figures; CPU timings at 128^3 would say nothing about
them). :func:`measure` itself runs on any device (tests run it on the CPU at a tiny size).

    python -m experiments.benchmarks.gpu_scale [--quick] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "gpu128.yaml"
GOALS = {"dp_over_nondp_whole_unet": 1.3, "seconds_per_128_volume": 2.0,
         "pretraining_fits_gib": 80.0, "pretraining_batch": 2}
NOT_MEASURED = ("gpu_scale: no CUDA GPU on this machine; nothing measured (run `fedsynth "
                "benchmark --only gpu_scale` on a GPU machine)")


def _timed(device, step: Callable[[], Any]) -> float:
    from models.device import synchronize

    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def _measure_steps(device, step: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median seconds of ``repeats`` steps after one warm-up, and the peak memory (GiB)."""
    import torch

    from models.device import peak_memory_gib, reset_peak_memory

    try:
        reset_peak_memory(device)
        step()  # warm-up: kernels selected, allocator filled
        times = [_timed(device, step) for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"error": f"out of memory ({str(err).splitlines()[0][:120]})"}
    return {"seconds": statistics.median(times), "peak_gib": peak_memory_gib(device)}


def _cohort(config, batch: int, generator):
    import torch

    from experiments.pretrain import PublicCohort

    shape, classes = tuple(config.data.shape), config.data.num_classes
    labels = torch.randint(0, classes, (batch, *shape), generator=generator, dtype=torch.uint8)
    return PublicCohort(images=torch.rand(batch, 1, *shape, generator=generator), labels=labels,
                        attributes=torch.rand(batch, len(config.model.conditioning.attributes),
                                              generator=generator),
                        affines=torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1))


def _latent_batch(config, batch: int, device, generator) -> dict[str, Any]:
    import torch

    size = [s // config.model.autoencoder.downsampling for s in config.data.shape]
    classes = config.data.num_classes
    labels = torch.rand(batch, classes, *size, generator=generator)
    return {"latents": torch.randn(batch, config.model.autoencoder.latent_channels, *size,
                                   generator=generator).to(device),
            "labels": (labels / labels.sum(1, keepdim=True)).to(device),
            "attributes": torch.rand(batch, len(config.model.conditioning.attributes),
                                     generator=generator).to(device)}


def pretraining(config, device, repeats: int) -> list[dict[str, Any]]:
    """Autoencoder + discriminator and UNet pretraining steps (preset settings)."""
    import torch

    from experiments.pretrain import _autoencoder_epoch, _Training, _unet_epoch
    from models.autoencoder import AutoencoderLoss
    from models.diffusion import build_scheduler

    generator = torch.Generator().manual_seed(0)
    rows = []
    ae_batch = config.pretrain.autoencoder.batch_size
    training = _Training(config)
    cohort = _cohort(config, ae_batch, generator)
    losses = AutoencoderLoss(config.pretrain.autoencoder.adversarial_weight,
                             config.pretrain.autoencoder.kl_weight)
    adversarial_epoch = config.pretrain.autoencoder.epochs // 4
    result = _measure_steps(device, lambda: _autoencoder_epoch(training, losses, cohort, config,
                                                               adversarial_epoch), repeats)
    crop = config.memory.autoencoder_crop or config.data.shape
    rows.append({"network": "autoencoder + discriminator", "batch": ae_batch,
                 "input": "x".join(str(c) for c in crop), **result})
    scheduler = build_scheduler(config.model)
    for batch in sorted({GOALS["pretraining_batch"], config.pretrain.unet.batch_size}):
        data = _latent_batch(config, batch, device, generator)
        settings = dataclasses.replace(config.pretrain.unet, batch_size=batch)
        run = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain,
                                                                       unet=settings))
        result = _measure_steps(device, lambda: _unet_epoch(
            training, scheduler, data["latents"], data["labels"], data["attributes"], run, 0),
            repeats)
        rows.append({"network": "latent UNet", "batch": batch,
                     "input": "x".join(str(s) for s in data["latents"].shape[2:]), **result})
    return rows


def dp_versus_nondp(config, device, repeats: int) -> list[dict[str, Any]]:
    """Paired DP and non-DP steps for the whole UNet and the attention+conditioning subset."""
    import torch

    from models.device import autocast, peak_memory_gib, reset_peak_memory
    from models.diffusion import build_scheduler, diffusion_loss
    from models.latent_unet import build_latent_unet
    from models.memory import configure
    from privacy.dp_trainer import DPSettings, backward_per_patient, privatise, release
    from privacy.trainable import apply_trainable

    rows = []
    batch = config.privacy.max_physical_batch_size
    scheduler = build_scheduler(config.model)
    data = _latent_batch(config, batch, device, torch.Generator().manual_seed(1))
    classes, attributes = config.data.num_classes, len(config.model.conditioning.attributes)

    def loss_fn(model, rows_batch):
        with autocast(device, config.precision):
            return diffusion_loss(model, scheduler, rows_batch["latents"], rows_batch["labels"],
                                  rows_batch["attributes"],
                                  generator=torch.Generator().manual_seed(2)).float()

    for subset in ("all", "attention_conditioning"):
        torch.manual_seed(0)
        plain = configure(build_latent_unet(config.model, classes, attributes),
                          config.memory).to(device)
        private = configure(build_latent_unet(config.model, classes, attributes),
                            config.memory).to(device)
        private.load_state_dict(plain.state_dict())
        apply_trainable(plain, subset)
        apply_trainable(private, subset)
        plain_optimizer = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad])
        settings = DPSettings(max_grad_norm=config.privacy.max_grad_norm,
                              expected_batch_size=batch, grad_sample_mode="hooks",
                              trainable=subset)
        module = optimizer = None
        row: dict[str, Any] = {"trainable": subset, "batch": batch,
                               "parameters": sum(p.numel() for p in plain.parameters()
                                                 if p.requires_grad)}
        try:
            module, optimizer = privatise(private, settings, 1.0,
                                          noise_generator=torch.Generator(device).manual_seed(3))

            def nondp_step():
                plain_optimizer.zero_grad(set_to_none=True)
                loss_fn(plain, data).mean().backward()
                plain_optimizer.step()

            def dp_step():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    backward_per_patient(module, optimizer, loss_fn, data, torch.arange(batch),
                                         batch, "hooks")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            peaks = {}
            for name, step in (("nondp", nondp_step), ("dp", dp_step)):
                reset_peak_memory(device)
                step()  # warm-up
                peaks[name] = peak_memory_gib(device)
            nondp, dp = [], []
            for _ in range(repeats):
                nondp.append(_timed(device, nondp_step))
                dp.append(_timed(device, dp_step))
            row.update(nondp_seconds=statistics.median(nondp), dp_seconds=statistics.median(dp),
                       dp_over_nondp=statistics.median(d / n for d, n in zip(dp, nondp)),
                       nondp_peak_gib=peaks["nondp"], dp_peak_gib=peaks["dp"])
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            row["error"] = f"out of memory ({str(err).splitlines()[0][:120]})"
        finally:
            if module is not None:
                release(module, optimizer)
        rows.append(row)
        del plain, private, module, optimizer, plain_optimizer
    return rows


def sampling(config, device, repeats: int, batches=(1, 4)) -> list[dict[str, Any]]:
    """Volumes per second: DDIM sampling (``diffusion.sampling_steps``) plus decoding."""
    import torch

    from models.autoencoder import build_autoencoder
    from models.device import autocast
    from models.diffusion import LatentDiffusion
    from models.latent_unet import build_latent_unet
    from models.memory import configure

    torch.manual_seed(0)
    model = LatentDiffusion(build_autoencoder(config.model.autoencoder),
                            build_latent_unet(config.model, config.data.num_classes,
                                              len(config.model.conditioning.attributes)),
                            config.model, 1.0)
    model = configure(model, config.memory).to(device).eval()
    rows = []
    for batch in batches:
        generator = torch.Generator().manual_seed(4)
        labels = torch.randint(0, config.data.num_classes, (batch, *config.data.shape),
                               generator=generator)
        onehot = torch.nn.functional.one_hot(labels, config.data.num_classes)
        onehot = onehot.permute(0, 4, 1, 2, 3).float().to(device)
        attributes = torch.rand(batch, len(config.model.conditioning.attributes)).to(device)

        def sample():
            with autocast(device, config.precision):
                return model.sample(onehot, attributes, generator=torch.Generator().manual_seed(5),
                                    progress=False).float()

        result = _measure_steps(device, sample, repeats)
        if "seconds" in result:
            result = {"seconds_per_volume": result["seconds"] / batch,
                      "volumes_per_second": batch / result["seconds"],
                      "peak_gib": result["peak_gib"]}
        rows.append({"batch": batch, "steps": config.model.diffusion.sampling_steps,
                     "output": "x".join(str(s) for s in config.data.shape), **result})
    return rows


def measure(config, device, repeats: int = 3, sampling_batches=(1, 4)) -> dict[str, Any]:
    """All three measurements of ``config`` on ``device`` (any device; the benchmark uses CUDA)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return {"pretraining": pretraining(config, device, repeats),
            "dp": dp_versus_nondp(config, device, repeats),
            "sampling": sampling(config, device, repeats, sampling_batches)}


def _summary(results: dict[str, Any], device_name: str) -> str:
    parts = [f"configs/gpu128.yaml on {device_name}."]
    whole = next((r for r in results["dp"] if r["trainable"] == "all"), {})
    if "dp_over_nondp" in whole:
        parts.append(f"DP step {whole['dp_over_nondp']:.2f}x the non-DP step for the whole UNet "
                     f"(goal <= {GOALS['dp_over_nondp_whole_unet']}x).")
    one = next((r for r in results["sampling"] if r["batch"] == 1), {})
    if "seconds_per_volume" in one:
        parts.append(f"One 128^3 volume sampled and decoded in {one['seconds_per_volume']:.2f} s "
                     f"(goal <= {GOALS['seconds_per_128_volume']} s).")
    unet = [r for r in results["pretraining"] if r["network"] == "latent UNet"
            and r["batch"] >= GOALS["pretraining_batch"] and r.get("peak_gib") is not None]
    if unet:
        best = max(unet, key=lambda r: r["batch"])
        parts.append(f"UNet pretraining at batch {best['batch']} peaks at "
                     f"{best['peak_gib']:.1f} GiB (goal: fits "
                     f"{GOALS['pretraining_fits_gib']:.0f} GB at batch >= 2).")
    return " ".join(parts)


def run(quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """The benchmark on the CUDA device; one line and no figures without one."""
    import torch

    from configs import load_config
    from models.device import resolve_device

    resolved = resolve_device(device)  # cuda asked of a machine without it: DeviceError
    if resolved.type != "cuda":
        print(NOT_MEASURED)
        return {"summary": NOT_MEASURED, "measured": False}
    config = dataclasses.replace(load_config(PRESET, check_paths=False), device=str(resolved))
    results = measure(config, resolved, repeats=2 if quick else 5,
                      sampling_batches=(1,) if quick else (1, 4))
    name = torch.cuda.get_device_name(resolved)
    return {"summary": _summary(results, name), "measured": True, "device": name,
            "goals": GOALS, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, device=args.device), indent=2, default=str))


if __name__ == "__main__":
    main()
