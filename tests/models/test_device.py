"""The device and precision settings: resolution, one-line errors, autocast, CPU state dicts,
and a checkpoint written from CPU tensors that rebuilds on the device asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import ConfigError, config_from_dict
from models.device import (DeviceError, autocast, check_precision, cpu_state_dict,
                           device_problem, module_device, peak_memory_gib, resolve_device,
                           to_device)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_resolves_to_the_cpu_on_a_machine_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_resolves_to_the_cpu_here():
    assert resolve_device("auto").type == "cpu"


def test_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_clear_line(no_cuda, spec):
    with pytest.raises(DeviceError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert "\n" not in message
    assert f"device: {spec} was requested but this machine has no CUDA GPU" in message
    assert "--device cpu" in message


def test_a_cuda_index_the_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"cuda:3 was requested but this machine has 1 CUDA"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "CUDA", "cuda:x", "mps", ""])
def test_malformed_settings_are_refused(spec):
    assert device_problem(spec)
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec or "bad ")


def test_config_validates_device_and_precision():
    assert config_from_dict({}, check_paths=False).device == "auto"
    assert config_from_dict({"device": "cuda:1", "precision": "bf16"},
                            check_paths=False).precision == "bf16"
    with pytest.raises(ConfigError,
                       match=r"^device: must be auto, cpu, cuda or cuda:N \(got 'gpu'\)"):
        config_from_dict({"device": "gpu"}, check_paths=False)
    with pytest.raises(ConfigError, match=r"^precision: must be one of 'fp32', 'bf16'"):
        config_from_dict({"precision": "fp16"}, check_paths=False)
    with pytest.raises(ConfigError, match=r"federation.sites\[0\].device: must be auto"):
        config_from_dict({"federation": {"sites": [{"site_id": "a", "data_dir": "/tmp",
                                                    "device": "tpu"}]}}, check_paths=False)


def test_fp32_is_a_no_op_and_bf16_autocasts_on_the_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(DeviceError, match="precision: must be one of fp32, bf16"):
        check_precision("fp16", torch.device("cpu"))


def test_batches_move_and_state_dicts_come_back_as_cpu_copies():
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), "name"), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["pair"][1] == "name" and moved["n"] == 3
    assert moved["x"].device == torch.device("cpu")
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = cpu_state_dict(optimizer.state_dict())
    exp_avg = state["state"][0]["exp_avg"]
    assert exp_avg.device == torch.device("cpu")
    assert exp_avg.data_ptr() != optimizer.state_dict()["state"][0]["exp_avg"].data_ptr()
    assert module_device(module) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
    assert peak_memory_gib(torch.device("cpu")) is None


def test_a_cpu_written_checkpoint_round_trips_onto_the_requested_device(tmp_path: Path):
    from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                         UNetConfig, config_to_dict)
    from models.autoencoder import build_autoencoder
    from models.checkpoint import DataGrid, load_checkpoint, save_checkpoint
    from models.latent_unet import build_latent_unet

    cfg = ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(mode="concat"),
        diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=3))
    torch.manual_seed(0)
    autoencoder, denoiser = build_autoencoder(cfg.autoencoder), build_latent_unet(cfg, 4, 0)
    saved = save_checkpoint(tmp_path / "model.pt", autoencoder=autoencoder, denoiser=denoiser,
                            model_config=config_to_dict(cfg),
                            data=DataGrid((16, 16, 16), (12.0,) * 3, ("bg", "a", "b", "c")),
                            latent_scale_factor=0.9)
    raw = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert {t.device.type for t in raw["denoiser"].values()} == {"cpu"}
    loaded = load_checkpoint(tmp_path / "model.pt")
    model = loaded.build_model(torch.device("cpu"))
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert loaded.content_hash == saved.content_hash
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(model.denoiser.state_dict()[name], tensor)
