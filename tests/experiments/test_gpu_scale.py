"""The GPU benchmark: without CUDA it says so in one line and records no figure; its measurements
run end to end (here on the CPU, at a tiny size, so the GPU run has a tested code path)."""

from __future__ import annotations

import pytest
import torch

from configs import config_from_dict
from experiments.benchmarks import gpu_scale
from experiments.benchmarks.run_all import benchmark_names, run_all


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_one_line_and_nothing_recorded(tmp_path, no_cuda, capsys):
    assert "gpu_scale" in benchmark_names()
    result = gpu_scale.run(quick=True)
    assert result == {"summary": gpu_scale.NOT_MEASURED, "measured": False}
    assert capsys.readouterr().out.strip().splitlines() == [gpu_scale.NOT_MEASURED]
    assert gpu_scale.run(quick=True, device="cpu")["measured"] is False

    out = tmp_path / "BENCHMARKS.md"
    results = run_all(out, quick=True, only=["gpu_scale"], device="cpu")
    text = out.read_text()
    section = text[text.index("## gpu_scale"):]
    assert gpu_scale.NOT_MEASURED in section
    assert "| measured | False |" in section
    assert "seconds" not in section and "gib" not in section.lower()
    assert results["gpu_scale"]["measured"] is False


def test_cuda_asked_of_a_machine_without_it_is_reported_not_measured(tmp_path, no_cuda):
    out = tmp_path / "BENCHMARKS.md"
    results = run_all(out, quick=True, only=["gpu_scale"], device="cuda")
    assert results["gpu_scale"]["error"].startswith("DeviceError: device: cuda was requested")
    assert "Failed: DeviceError" in out.read_text()


def tiny_config():
    return config_from_dict({
        "device": "cpu", "precision": "bf16",
        "data": {"shape": [16, 16, 16], "spacing": [12.0] * 3},
        "model": {"autoencoder": {"channels": [8, 8, 8], "latent_channels": 2,
                                  "attention_levels": [False] * 3, "norm_num_groups": 4},
                  "unet": {"channels": [8, 16], "attention_levels": [False, True],
                           "num_head_channels": 8, "norm_num_groups": 4},
                  "conditioning": {"attributes": ["age", "sex"]},
                  "diffusion": {"train_timesteps": 20, "sampling_steps": 2}},
        "pretrain": {"autoencoder": {"batch_size": 2}, "unet": {"batch_size": 3}},
        "privacy": {"max_physical_batch_size": 2},
        "memory": {"flash_attention": True, "gradient_checkpointing": True,
                   "autoencoder_crop": [8, 8, 8]},
    }, check_paths=False)


def test_every_measurement_runs_and_reports_its_figures_on_the_cpu():
    torch.set_num_threads(1)
    results = gpu_scale.measure(tiny_config(), torch.device("cpu"), repeats=1,
                                sampling_batches=(1, 2))
    pretraining = results["pretraining"]
    assert [(r["network"], r["batch"]) for r in pretraining] == [
        ("autoencoder + discriminator", 2), ("latent UNet", 2), ("latent UNet", 3)]
    assert pretraining[0]["input"] == "8x8x8" and pretraining[1]["input"] == "4x4x4"
    assert all(r["seconds"] > 0 and r["peak_gib"] is None for r in pretraining)
    dp = {r["trainable"]: r for r in results["dp"]}
    assert set(dp) == {"all", "attention_conditioning"}
    assert dp["attention_conditioning"]["parameters"] < dp["all"]["parameters"]
    assert all(r["dp_over_nondp"] > 0 and r["dp_seconds"] > 0 for r in dp.values())
    sampling = results["sampling"]
    assert [r["batch"] for r in sampling] == [1, 2]
    assert all(r["volumes_per_second"] > 0 and r["output"] == "16x16x16" for r in sampling)
    summary = gpu_scale._summary(results, "cpu")
    assert "DP step" in summary and "sampled and decoded" in summary
