"""The checkpoint artefact: bit-exact round trip, content hash, and refusal of damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     UNetConfig, config_to_dict)
from models.autoencoder import build_autoencoder
from models.checkpoint import CheckpointError, DataGrid, load_checkpoint, save_checkpoint
from models.latent_unet import build_latent_unet

GRID = DataGrid((16, 16, 16), (12.0, 12.0, 12.0),
                ("background", "csf", "grey_matter", "white_matter"), ("age", "sex"))


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(mode: str = "spade") -> ModelConfig:
    return ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(mode=mode, attributes=["age", "sex"]),
        diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=3))


def write(path: Path, mode: str = "spade", seed: int = 0):
    cfg = tiny_model(mode)
    torch.manual_seed(seed)
    autoencoder, denoiser = build_autoencoder(cfg.autoencoder), build_latent_unet(cfg, 4, 2)
    denoiser.attribute_embedding.set_statistics(torch.tensor([55.0, 0.5]),
                                                torch.tensor([12.0, 0.5]))
    checkpoint = save_checkpoint(path, autoencoder=autoencoder, denoiser=denoiser,
                                 model_config=config_to_dict(cfg), data=GRID,
                                 latent_scale_factor=0.8731, metadata={"stage": "test"})
    return checkpoint, autoencoder, denoiser


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    saved, autoencoder, denoiser = write(tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.content_hash == saved.content_hash and len(loaded.content_hash) == 64
    assert loaded.data == GRID and loaded.latent_scale_factor == 0.8731
    assert loaded.metadata == {"stage": "test"}
    assert loaded.fedsynth_version == saved.fedsynth_version
    for original, state in ((autoencoder, loaded.autoencoder_state),
                            (denoiser, loaded.denoiser_state)):
        reference = original.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) and state[k].dtype == reference[k].dtype
                   for k in state)
    # The rebuilt model (from the stored plain-dict config, no YAML) samples identically.
    model, again = loaded.build_model(), load_checkpoint(tmp_path / "model.pt").build_model()
    classes = torch.randint(0, 4, (1, 16, 16, 16))
    maps = torch.nn.functional.one_hot(classes, 4).permute(0, 4, 1, 2, 3).float()
    values = torch.tensor([[60.0, 1.0]])
    a = model.sample(maps, values, generator=torch.Generator().manual_seed(0), progress=False)
    b = again.sample(maps, values, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b)


def test_hash_names_the_model_not_the_file(tmp_path: Path) -> None:
    first, _, _ = write(tmp_path / "a.pt", seed=0)
    same, _, _ = write(tmp_path / "b.pt", seed=0)
    other, _, _ = write(tmp_path / "c.pt", seed=1)
    concat, _, _ = write(tmp_path / "d.pt", mode="concat", seed=0)
    assert first.content_hash == same.content_hash
    assert len({first.content_hash, other.content_hash, concat.content_hash}) == 3


def test_missing_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_checkpoint(tmp_path / "truncated.pt")
    assert "\n" not in str(error.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a fedsynth checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_tampered_weights_or_config_fail_the_hash(tmp_path: Path) -> None:
    write(tmp_path / "model.pt")
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    name = next(iter(raw["denoiser"]))
    raw["denoiser"][name] = raw["denoiser"][name].clone()
    raw["denoiser"][name].view(-1)[0] += 1e-6
    torch.save(raw, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "weights.pt")
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    raw["latent_scale_factor"] = 1.0
    torch.save(raw, tmp_path / "scale.pt")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "scale.pt")


def test_a_config_the_code_cannot_build_is_refused(tmp_path: Path) -> None:
    checkpoint, _, _ = write(tmp_path / "model.pt")
    config = dict(checkpoint.model_config)
    config["conditioning"] = {**config["conditioning"], "mode": "cross_attention"}
    save_checkpoint(tmp_path / "future.pt", autoencoder=checkpoint.autoencoder_state,
                    denoiser=checkpoint.denoiser_state, model_config=config, data=GRID,
                    latent_scale_factor=1.0)
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_checkpoint(tmp_path / "future.pt")


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    saved, autoencoder, denoiser = write(tmp_path / "model.pt")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "model.pt", autoencoder=autoencoder, denoiser=denoiser,
                        model_config=saved.model_config, data=GRID, latent_scale_factor=2.0)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "model.pt").content_hash == saved.content_hash
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
