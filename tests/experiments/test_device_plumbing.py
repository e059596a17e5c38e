"""Every stage honours the device setting: pretraining puts its networks and batches on it, a
streamed cohort trains exactly like the in-memory one, sampling builds its model there, simulated
sites inherit it (or --device), and CUDA asked of a machine without it is one line, exit 2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, RecordDict

import experiments.pretrain as pretrain_module
from configs import load_config
from experiments.cli import main
from experiments.pretrain import pretrain
from models.device import resolve_device

from tests.experiments.test_pretrain_sample import write_config, write_site


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def public(tmp_path: Path) -> Path:
    return write_site(tmp_path / "public", patients=4, seed=0)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _with(path: Path, **top) -> Path:
    data = yaml.safe_load(path.read_text())
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return path


def test_pretraining_puts_networks_and_batches_on_the_configured_device(tmp_path, public,
                                                                         monkeypatch):
    config = load_config(_with(write_config(tmp_path, public), device="cpu"))
    asked, seen = [], []

    def spy_resolve(spec):
        asked.append(spec)
        return resolve_device(spec)

    def spy_reconstruct(autoencoder, images, generator, label_grid=None):
        seen.append(("autoencoder", images.device, next(autoencoder.parameters()).device))
        return reconstruct(autoencoder, images, generator, label_grid)

    def spy_loss(denoiser, scheduler, latents, labels, attributes, **kwargs):
        seen.append(("unet", latents.device, next(denoiser.parameters()).device))
        seen.append(("labels", labels.device, attributes.device))
        return diffusion_loss(denoiser, scheduler, latents, labels, attributes, **kwargs)

    reconstruct, diffusion_loss = pretrain_module.reconstruct, pretrain_module.diffusion_loss
    monkeypatch.setattr(pretrain_module, "resolve_device", spy_resolve)
    monkeypatch.setattr(pretrain_module, "reconstruct", spy_reconstruct)
    monkeypatch.setattr(pretrain_module, "diffusion_loss", spy_loss)
    moved = []
    to = torch.nn.Module.to

    def spy_to(self, *args, **kwargs):
        moved.append((type(self).__name__, args[0] if args else kwargs.get("device")))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    result = pretrain(config, tmp_path / "run", tracking=False)
    assert asked and set(asked) == {"cpu"}
    cpu = torch.device("cpu")
    assert {"AutoencoderKL", "PatchDiscriminator", "LatentDenoiser"} <= \
        {name for name, device in moved if device == cpu}
    assert {kind for kind, *_ in seen} == {"autoencoder", "unet", "labels"}
    assert all(a == cpu and b == cpu for _, a, b in seen)
    # What the stage writes holds CPU tensors (loaded here without map_location).
    state = torch.load(tmp_path / "run" / pretrain_module.STATE_FILE, weights_only=True)
    assert {t.device for t in state["denoiser"].values()} == {cpu}
    assert {t.device for s in state["unet_optimizer"]["state"].values() for t in s.values()} \
        == {cpu}
    assert result.checkpoint.content_hash


def test_a_streamed_cohort_pretrains_exactly_like_the_in_memory_one(tmp_path, public):
    config_path = write_config(tmp_path, public)
    in_memory = pretrain(load_config(config_path), tmp_path / "memory", tracking=False)
    streamed_config = _with(config_path, memory={"stream_from_disk": True, "num_workers": 1})
    config = load_config(streamed_config)
    cohort = pretrain_module.load_public_cohort(config)
    assert not isinstance(cohort.images, torch.Tensor)  # nothing held: read per batch
    streamed = pretrain(config, tmp_path / "streamed", tracking=False)
    assert streamed.checkpoint.content_hash == in_memory.checkpoint.content_hash


def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(tmp_path, public, no_cuda, capsys):
    config = write_config(tmp_path, public)
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--no-tracking", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("fedsynth pretrain: error: device: cuda was requested but this "
                          "machine has no CUDA GPU")
    assert not (tmp_path / "run").exists()
    assert main(["pretrain", "--config", str(config), "--device", "gpu"]) == 2
    assert "--device: must be auto, cpu, cuda or cuda:N (got 'gpu')" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(_with(config, device="cuda:1")), "--out",
                 str(tmp_path / "run"), "--no-tracking"]) == 2
    assert "device: cuda:1 was requested" in capsys.readouterr().err


def test_sampling_builds_its_model_on_the_device(tmp_path, public, monkeypatch):
    from models.checkpoint import Checkpoint

    config = load_config(write_config(tmp_path, public))
    result = pretrain(config, tmp_path / "run", tracking=False)
    built = []
    build_model = Checkpoint.build_model

    def spy(self, device=None):
        built.append(device)
        return build_model(self, device)

    monkeypatch.setattr(Checkpoint, "build_model", spy)
    assert main(["sample", "--checkpoint", str(result.checkpoint_path), "--masks", str(public),
                 "--num", "1", "--out", str(tmp_path / "samples"), "--steps", "2",
                 "--device", "cpu", "--precision", "bf16"]) == 0
    assert built == [torch.device("cpu")]
    import nibabel as nib
    image = nib.load(str(tmp_path / "samples" / "images" / "synth_0000.nii.gz"))
    assert image.get_fdata().shape == (16, 16, 16)


def test_simulated_sites_take_the_run_device_unless_their_own_config_sets_one(tmp_path):
    from client.client_app import CONFIG_PATH_KEY, DEVICE_KEY, resolve_site

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "device": "cpu", "precision": "bf16",
        "federation": {"sites": [{"site_id": "a", "data_dir": "a"},
                                 {"site_id": "b", "data_dir": "b", "device": "cuda:1"}]}}))

    def site(partition: int, **run):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition},
                          state=RecordDict(), run_config={CONFIG_PATH_KEY: str(path), **run})
        return resolve_site(context, {})

    assert (site(0).device, site(0).precision) == ("cpu", "bf16")
    assert site(0, **{DEVICE_KEY: "cuda"}).device == "cuda"
    assert site(1).device == site(1, **{DEVICE_KEY: "cpu"}).device == "cuda:1"


def test_site_training_resolves_its_device_and_keeps_dp_outside_hooks_in_fp32(tmp_path, no_cuda):
    from client.site_runtime import _loss_fn, site_compute
    from configs.schema import SiteConfig
    from models.diffusion import build_scheduler

    site = SiteConfig(site_id="a", data_dir=tmp_path, device="cpu", precision="bf16")
    assert site_compute(site, {"enabled": True, "grad_sample_mode": "hooks"}) == \
        (torch.device("cpu"), "bf16")
    assert site_compute(site, {"enabled": True, "grad_sample_mode": "functorch"})[1] == "fp32"
    assert site_compute(replace(site, device=None, precision=None), {}) == \
        (torch.device("cpu"), "fp32")
    from models.device import DeviceError
    with pytest.raises(DeviceError):
        site_compute(replace(site, device="cuda"), {})

    model_cfg = {"diffusion": {"train_timesteps": 10, "beta_schedule": "linear_beta",
                               "sampling_steps": 2, "prediction_type": "epsilon"}}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 1, 1)

        def forward(self, noisy, timesteps, labels, attributes, keep):
            return self.conv(noisy)

    loss = _loss_fn(build_scheduler(model_cfg), 0.0, False, torch.Generator().manual_seed(0),
                    torch.device("cpu"), "bf16")
    batch = {"latents": torch.randn(2, 1, 4, 4, 4), "labels": torch.rand(2, 1, 4, 4, 4),
             "attributes": torch.zeros(2, 0)}
    losses = loss(Probe(), batch)
    assert losses.shape == (2,) and losses.dtype == torch.float32
