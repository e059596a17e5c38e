"""Pretraining on a tiny public cohort, resume, MLflow logging, the pretrain -> sample CLI path."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from configs import load_config
from experiments.cli import main
from experiments.pretrain import STATE_FILE, PretrainError, pretrain
from models.checkpoint import load_checkpoint

SIZE = 16
SPACING = 12.0  # mm: a 192 mm field of view, like the demo cohort at 16^3


def _phantom(rng: np.random.Generator, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom: white matter inside grey matter, a CSF core; intensity by tissue."""
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1) - (SIZE - 1) / 2 - shift
    radius = np.linalg.norm(grid * np.array([1.0, 0.85, 1.1]), axis=-1)
    label = np.zeros((SIZE,) * 3, np.uint8)
    label[radius < 6.5] = 2
    label[radius < 4.5] = 3
    label[radius < 1.8] = 1
    intensity = np.array([0.0, 0.3, 0.6, 0.9])[label] + rng.normal(0, 0.03, label.shape)
    return intensity.astype(np.float32), label


def write_site(folder: Path, patients: int, seed: int) -> Path:
    """A site-format folder: manifest.csv (patient_id,image,label,age,sex), images/, labels/."""
    rng = np.random.default_rng(seed)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = -SPACING * (SIZE - 1) / 2
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rows = []
    for p in range(patients):
        image, label = _phantom(rng, rng.uniform(-1, 1, 3))
        name = f"p{p:02d}"
        nib.save(nib.Nifti1Image(image, affine), str(folder / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / "labels" / f"{name}_label.nii.gz"))
        rows.append({"patient_id": name, "image": f"images/{name}.nii.gz",
                     "label": f"labels/{name}_label.nii.gz", "age": str(30 + 5 * p),
                     "sex": str(p % 2)})
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_config(tmp_path: Path, public: Path, **pretrain_overrides) -> Path:
    config = {
        "seed": 3,
        "data": {"public_dir": str(public), "shape": [SIZE] * 3, "spacing": [SPACING] * 3},
        "model": {
            "autoencoder": {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4},
            "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
                     "norm_num_groups": 4},
            "conditioning": {"mode": "concat", "attributes": ["age", "sex"], "dropout": 0.2},
            "diffusion": {"train_timesteps": 20, "sampling_steps": 4},
        },
        "pretrain": {"autoencoder": {"epochs": 2, "batch_size": 3},
                     "unet": {"epochs": 2, "batch_size": 3}, **pretrain_overrides},
        "tracking": {"experiment": "pretrain-test"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions run fastest single-threaded on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def public(tmp_path: Path) -> Path:
    return write_site(tmp_path / "public", patients=5, seed=0)


def test_resume_continues_bit_exactly(tmp_path: Path, public: Path) -> None:
    config = load_config(write_config(tmp_path, public))
    starts: list[tuple[str, int]] = []
    straight = pretrain(config, tmp_path / "straight", tracking=False,
                        on_epoch_start=lambda stage, epoch: starts.append((stage, epoch)))
    meta = straight.checkpoint.metadata
    assert starts == ([("autoencoder", e) for e in range(meta["autoencoder_epochs"])]
                      + [("unet", e) for e in range(meta["unet_epochs"])])

    class Stop(KeyboardInterrupt):
        pass

    def stop_after_first_unet_epoch(stage: str, epoch: int) -> None:
        if stage == "unet" and epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        pretrain(config, tmp_path / "resumed", tracking=False,
                 on_epoch_end=stop_after_first_unet_epoch)
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    with pytest.raises(PretrainError, match="--resume"):
        pretrain(config, tmp_path / "resumed", tracking=False)
    starts.clear()
    resumed = pretrain(config, tmp_path / "resumed", resume=True, tracking=False,
                       on_epoch_start=lambda stage, epoch: starts.append((stage, epoch)))
    assert starts == [("unet", 1)]  # only the epochs it still had to run
    assert resumed.checkpoint.content_hash == straight.checkpoint.content_hash
    assert resumed.checkpoint.metadata["unet_epochs"] == 2


def test_the_autoencoder_trains_channels_last_and_a_resume_inside_it_is_bit_exact(
        tmp_path: Path, public: Path) -> None:
    """On the CPU the autoencoder and its discriminator train in channels_last_3d (faster oneDNN
    kernels); what is saved is plain contiguous, and resuming mid-stage changes nothing."""
    from dataclasses import replace

    from experiments.pretrain import _Training
    config = replace(load_config(write_config(tmp_path, public)), device="cpu")  # a GPU keeps it
    training = _Training(config)
    convolutions = [m.weight for net in (training.autoencoder, training.discriminator)
                    for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last_3d)
                                and not w.is_contiguous() for w in convolutions
                                if w.shape[1] > 1 and w.shape[2:].numel() > 1)
    saved = training.state_dict()["autoencoder"]
    assert all(t.is_contiguous() for t in saved.values())

    straight = pretrain(config, tmp_path / "straight", tracking=False)
    assert all(t.is_contiguous() for t in straight.checkpoint.autoencoder_state.values())

    class Stop(KeyboardInterrupt):
        pass

    def stop_after_first_autoencoder_epoch(stage: str, epoch: int) -> None:
        if stage == "autoencoder" and epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        pretrain(config, tmp_path / "resumed", tracking=False,
                 on_epoch_end=stop_after_first_autoencoder_epoch)
    resumed = pretrain(config, tmp_path / "resumed", resume=True, tracking=False)
    assert resumed.checkpoint.content_hash == straight.checkpoint.content_hash


def test_resume_refuses_a_changed_config(tmp_path: Path, public: Path) -> None:
    config = load_config(write_config(tmp_path, public))

    def stop(stage: str, epoch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "run", tracking=False, on_epoch_end=stop)
    changed = load_config(write_config(tmp_path, public, unet={"epochs": 2, "batch_size": 3,
                                                              "learning_rate": 0.01}))
    with pytest.raises(PretrainError, match="pretrain.unet.learning_rate"):
        pretrain(changed, tmp_path / "run", resume=True, tracking=False)


def test_a_diverged_stage_stops_with_one_line_and_keeps_the_last_finite_state(
        tmp_path: Path, public: Path, monkeypatch) -> None:
    """A NaN loss (as bf16 autoencoder training once produced) must not train on: one line,
    the saved state still at the last finite epoch, no checkpoint."""
    from models.autoencoder import AutoencoderLoss
    config = load_config(write_config(tmp_path, public))
    calls = {"n": 0}
    original = AutoencoderLoss.generator_loss

    def diverging(self, *args, **kwargs):
        loss, parts = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] > 2 else (loss, parts)

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", diverging)  # 2 batches per epoch
    with pytest.raises(PretrainError, match=r"pretrain.autoencoder: the loss became nan in "
                                            r"epoch 2 .*precision: fp32"):
        pretrain(config, tmp_path / "run", tracking=False)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert state["autoencoder_epochs"] == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cosine_schedule_anneals_the_autoencoder_learning_rate_to_zero(
        tmp_path: Path, public: Path) -> None:
    from types import SimpleNamespace

    from experiments.pretrain import autoencoder_learning_rate
    config = load_config(write_config(tmp_path, public, autoencoder={
        "epochs": 2, "batch_size": 3, "learning_rate": 1e-3, "lr_schedule": "cosine"}))
    pretrain(config, tmp_path / "run", tracking=False)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    for optimizer in ("autoencoder_optimizer", "discriminator_optimizer"):  # both networks
        last_rate = state[optimizer]["param_groups"][0]["lr"]
        assert 0 < last_rate < 0.2 * 1e-3, optimizer  # the last step's, near the end of the cosine
    cosine = SimpleNamespace(learning_rate=2e-3, lr_schedule="cosine")
    assert autoencoder_learning_rate(cosine, 0.0) == pytest.approx(2e-3)
    assert autoencoder_learning_rate(cosine, 0.5) == pytest.approx(1e-3)
    assert autoencoder_learning_rate(cosine, 1.0) == pytest.approx(0.0, abs=1e-12)
    constant = SimpleNamespace(learning_rate=2e-3, lr_schedule="constant")
    assert autoencoder_learning_rate(constant, 0.9) == 2e-3


def test_disabled_pretraining_still_trains_the_autoencoder(tmp_path: Path, public: Path) -> None:
    from models.autoencoder import build_autoencoder
    from models.latent_unet import build_latent_unet

    config = load_config(write_config(tmp_path, public, enabled=False))
    result = pretrain(config, tmp_path / "run", tracking=False)
    meta = result.checkpoint.metadata
    assert meta["unet_pretrained"] is False
    assert (meta["autoencoder_epochs"], meta["unet_epochs"]) == (2, 0)
    stored = load_checkpoint(result.checkpoint_path)
    torch.manual_seed(config.seed)
    untrained_autoencoder = build_autoencoder(config.model.autoencoder).state_dict()
    assert any(not torch.equal(v, untrained_autoencoder[k])
               for k, v in stored.autoencoder_state.items())
    torch.manual_seed(config.seed + 1)
    untrained_unet = build_latent_unet(config.model, config.data.num_classes, 2).state_dict()
    # The UNet keeps its initialisation; only the public attribute statistics are filled in.
    changed = {k for k, v in stored.denoiser_state.items() if not torch.equal(v, untrained_unet[k])}
    assert changed == {"unet.class_embedding.mean", "unet.class_embedding.std"}


@pytest.mark.slow  # about 7 s alone, over 20 s on a busy CPU (MLflow's SQLite store setup)
def test_pretrain_then_sample_cli_end_to_end(tmp_path: Path, public: Path, capsys) -> None:
    from mlflow import MlflowClient

    config = write_config(tmp_path, public)
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    checkpoint = run_dir / "checkpoint.pt"
    assert checkpoint.is_file() and load_checkpoint(checkpoint).content_hash in printed

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pretrain-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.conditioning.mode"] == "concat"
    assert run.data.params["pretrain.unet.epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "unet/loss")
    assert [m.step for m in history] == [0, 1] and all(np.isfinite(m.value) for m in history)
    assert len(client.get_metric_history(run.info.run_id, "autoencoder/l1")) == 2
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "previews")]
    assert "previews/pretrain_samples.png" in artifacts
    assert run.data.tags["checkpoint_sha256"] == load_checkpoint(checkpoint).content_hash

    # Sampling from a site-format mask folder with a manifest (attributes taken from it).
    out = tmp_path / "synthetic"
    assert main(["sample", "--checkpoint", str(checkpoint), "--masks", str(public), "--num", "3",
                 "--out", str(out), "--seed", "1", "--guidance", "2.0", "--batch-size", "2"]) == 0
    from client.site_data import read_manifest
    records = read_manifest(out)
    assert [r.patient_id for r in records] == ["synth_0000", "synth_0001", "synth_0002"]
    assert records[1].attributes["age"] == "35" and records[1].attributes["condition"] == "p01"
    source = nib.load(str(public / "labels" / "p01_label.nii.gz"))
    image, label = nib.load(str(records[1].image)), nib.load(str(records[1].label))
    assert np.allclose(image.affine, source.affine) and np.allclose(label.affine, source.affine)
    assert image.shape == (SIZE,) * 3 and np.isfinite(image.get_fdata()).all()
    assert np.array_equal(label.get_fdata(), source.get_fdata())
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A plain folder of label files (attributes: the public means); maps are cycled in name order.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("p00", "p01"):
        source_label = public / "labels" / f"{name}_label.nii.gz"
        (plain / f"{name}.nii.gz").write_bytes(source_label.read_bytes())
    again = tmp_path / "again"
    assert main(["sample", "--checkpoint", str(checkpoint), "--masks", str(plain), "--num", "3",
                 "--out", str(again), "--seed", "1", "--batch-size", "2"]) == 0
    records = read_manifest(again)
    assert [r.attributes["condition"] for r in records] == ["p00", "p01", "p00"]
    assert float(records[0].attributes["age"]) == pytest.approx(40.0)  # mean of 30..50


def test_sample_cli_refuses_bad_input_with_one_line(tmp_path: Path, public: Path, capsys) -> None:
    config = load_config(write_config(tmp_path, public, unet={"epochs": 1, "batch_size": 3},
                                      autoencoder={"epochs": 1, "batch_size": 3}))
    checkpoint = pretrain(config, tmp_path / "run", tracking=False).checkpoint_path

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    out = str(tmp_path / "out")
    assert "not found" in error(["sample", "--checkpoint", str(tmp_path / "none.pt"),
                                 "--masks", str(public), "--num", "1", "--out", out])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    assert "truncated" in error(["sample", "--checkpoint", str(truncated), "--masks", str(public),
                                 "--num", "1", "--out", out])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(wrong / "small.nii.gz"))
    assert "does not match" in error(["sample", "--checkpoint", str(checkpoint),
                                      "--masks", str(wrong), "--num", "1", "--out", out])
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", str(checkpoint), "--masks", str(public), "--num", "0",
              "--out", out])
    assert exit_info.value.code == 2
    assert "must be > 0" in capsys.readouterr().err
    assert not Path(out).exists()


def test_reconstruction_is_measured_on_held_out_patients_and_the_ema_is_kept(
        tmp_path: Path, public: Path) -> None:
    from experiments.pretrain import RECONSTRUCTION_PREVIEW, load_public_cohort, split_holdout
    from models.autoencoder import reconstruction_quality

    config = load_config(write_config(
        tmp_path, public, holdout_fraction=0.4,
        unet={"epochs": 2, "batch_size": 3, "ema_decay": 0.5},
        autoencoder={"epochs": 2, "batch_size": 3, "ssim_weight": 0.5,
                     "feature_matching_weight": 1.0, "warmup_epochs": 1}))
    result = pretrain(config, tmp_path / "run", tracking=False)
    measured = result.checkpoint.metadata["autoencoder_reconstruction"]
    training, held = split_holdout(load_public_cohort(config), 0.4, config.seed)
    # 2 of the 5 patients, whole: none of their scans is trained on.
    assert len(set(held.patient_ids)) == 2 and not set(held.patient_ids) & set(training.patient_ids)
    assert result.checkpoint.metadata["public_scans"] == len(training) == 3
    assert measured["held_out"] is True and measured["scans"] == len(held)
    again = reconstruction_quality(load_checkpoint(result.checkpoint_path).build_autoencoder(),
                                   held.images)
    assert measured["psnr"] == pytest.approx(again["psnr"]) and 0 < measured["ssim"] < 1
    assert (tmp_path / "run" / "previews" / RECONSTRUCTION_PREVIEW).is_file()

    # The checkpoint holds the EMA of the UNet, not its last weights.
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    stored = result.checkpoint.denoiser_state
    assert all(torch.equal(stored[k], ema[k]) for k in stored)
    assert any(not torch.equal(stored[k], state["denoiser"][k]) for k in stored)


def test_without_held_out_patients_reconstruction_is_labelled_as_training_data(
        tmp_path: Path, public: Path) -> None:
    config = load_config(write_config(tmp_path, public, holdout_fraction=0.0,
                                      enabled=False))
    measured = pretrain(config, tmp_path / "run", tracking=False
                        ).checkpoint.metadata["autoencoder_reconstruction"]
    assert measured["held_out"] is False and measured["scans"] == 5


def test_ema_warm_up_follows_early_weights_then_averages_slowly() -> None:
    from torch.optim.swa_utils import AveragedModel

    from experiments.pretrain import ema_with_warmup

    layer = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(layer, avg_fn=ema_with_warmup(0.99), use_buffers=True)
    values = [1.0, 2.0, 3.0]
    with torch.no_grad():
        for value in values:
            layer.weight.fill_(value)
            ema.update_parameters(layer)
    # n = 0: copied (1.0); n = 1: rate 2/11; n = 2: rate 3/12 (not 0.99, which would stay near 1).
    expected = 1.0
    for n, value in ((1, 2.0), (2, 3.0)):
        rate = (1 + n) / (10 + n)
        expected = rate * expected + (1 - rate) * value
    assert ema.module.weight.item() == pytest.approx(expected)
    assert ema.module.weight.item() > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["demo.yaml", "quality32.yaml"])
def test_shipped_recipes_pretrain_on_a_tiny_cohort(tmp_path: Path, public: Path,
                                                   recipe: str) -> None:
    """The shipped configs' pretraining recipes (losses, warm-up, EMA, hold-out), shrunk to a
    tiny cohort and a few epochs, run end to end and record their reconstruction quality."""
    root = Path(__file__).resolve().parents[2]
    shipped = load_config(root / "configs" / recipe, check_paths=False)
    section = yaml.safe_load((root / "configs" / recipe).read_text())["pretrain"]
    section["holdout_fraction"] = 0.2
    section["autoencoder"].update(epochs=2, batch_size=3, warmup_epochs=1)
    section["unet"].update(epochs=2, batch_size=3)
    path = write_config(tmp_path, public)
    written = yaml.safe_load(path.read_text())
    written["pretrain"] = section
    written["model"]["conditioning"]["mode"] = shipped.model.conditioning.mode
    written["model"]["conditioning"]["guidance_scale"] = shipped.model.conditioning.guidance_scale
    written["model"]["autoencoder"]["decoder_map_classes"] = \
        shipped.model.autoencoder.decoder_map_classes
    path.write_text(yaml.safe_dump(written))
    result = pretrain(load_config(path), tmp_path / "run", tracking=False)
    meta = result.checkpoint.metadata
    assert meta["autoencoder_reconstruction"]["held_out"] is True
    assert meta["unet_ema_decay"] == shipped.pretrain.unet.ema_decay
    assert result.checkpoint.model_config["conditioning"]["guidance_scale"] == \
        shipped.model.conditioning.guidance_scale
    assert result.checkpoint.model_config["autoencoder"]["decoder_map_classes"] == \
        shipped.model.autoencoder.decoder_map_classes


def test_a_cohort_without_patient_ids_holds_out_single_scans() -> None:
    from experiments.pretrain import PublicCohort, split_holdout

    cohort = PublicCohort(torch.rand(10, 1, 4, 4, 4), torch.zeros(10, 4, 4, 4, dtype=torch.uint8),
                          torch.zeros(10, 0), torch.zeros(10, 4, 4))
    training, held = split_holdout(cohort, 0.2, seed=0)
    assert (len(training), len(held)) == (8, 2)
    assert not set(map(tuple, training.images.flatten(1).tolist())) & \
        set(map(tuple, held.images.flatten(1).tolist()))


def test_contrast_gammas_train_the_unet_on_other_scanner_looks(tmp_path: Path, public: Path
                                                               ) -> None:
    """The same run with scanner-look versions of the public scans: the autoencoder and the
    scale factor are untouched (they come from the scans as they are), the UNet differs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = pretrain(load_config(write_config(tmp_path / "a", public)), tmp_path / "plain",
                     tracking=False).checkpoint
    looks = pretrain(load_config(write_config(tmp_path / "b", public,
                                              unet={"epochs": 2, "batch_size": 3,
                                                    "contrast_gammas": [0.7, 1.5]})),
                     tmp_path / "looks", tracking=False).checkpoint
    assert plain.latent_scale_factor == looks.latent_scale_factor
    assert all(torch.equal(v, looks.autoencoder_state[k])
               for k, v in plain.autoencoder_state.items())
    assert any(not torch.equal(v, looks.denoiser_state[k])
               for k, v in plain.denoiser_state.items())


def test_contrast_gammas_out_of_range_are_refused_with_one_line(tmp_path: Path, public: Path
                                                                ) -> None:
    from configs.loader import ConfigError

    with pytest.raises(ConfigError, match="contrast_gammas"):
        load_config(write_config(tmp_path, public, unet={"contrast_gammas": [0.0]}))


def test_a_decoder_that_sees_the_map_pretrains_and_samples_end_to_end(tmp_path: Path,
                                                                      public: Path) -> None:
    """model.autoencoder.decoder_map_classes: pretraining trains the decoder on the public maps,
    measures held-out reconstructions with their maps, and the checkpoint samples through the
    CLI; the checkpoint rebuilds the map-decoding network from its own model section."""
    from models.autoencoder import MapDecodingAutoencoderKL

    path = write_config(tmp_path, public, holdout_fraction=0.2)
    written = yaml.safe_load(path.read_text())
    written["model"]["autoencoder"]["decoder_map_classes"] = 4
    path.write_text(yaml.safe_dump(written))
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--config", str(path), "--out", str(run_dir)]) == 0
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint.model_config["autoencoder"]["decoder_map_classes"] == 4
    assert isinstance(checkpoint.build_autoencoder(), MapDecodingAutoencoderKL)
    assert np.isfinite(checkpoint.metadata["autoencoder_reconstruction"]["psnr"])
    assert (run_dir / "previews" / "autoencoder_reconstruction.png").is_file()
    out = tmp_path / "synthetic"
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--masks", str(public),
                 "--num", "2", "--out", str(out), "--seed", "1"]) == 0
    image = nib.load(str(out / "images" / "synth_0000.nii.gz")).get_fdata()
    assert image.shape == (SIZE,) * 3 and np.isfinite(image).all()
