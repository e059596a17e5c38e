"""The release (server.release): gating, resampling, resume, bad inputs, a real Flower simulation.

Two demo-cohort sites at 16^3 answer gate queries through the real ClientApp
(``client.client_app``): in-process through ``experiments.loopback.LoopbackGrid`` for the fast
tests, and through ``flwr.simulation`` (Ray) in the slow one. Planted copies of the sites' scans
are slipped in among the model's candidates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from flwr.app import Message

import server.release as release_module
from client.client_app import make_client_app
from client.site_data import load_site
from configs import (AutoencoderConfig, ConditioningConfig, DiffusionConfig, ModelConfig,
                     UNetConfig, config_to_dict, load_config)
from experiments.cli import main
from experiments.cohort import generate_cohort
from server.release import first_attempt_maps, load_public_maps
from experiments.loopback import LoopbackGrid
from models.autoencoder import build_autoencoder
from models.checkpoint import DataGrid, load_checkpoint, save_checkpoint
from models.latent_unet import build_latent_unet
from privacy.dp_gate import gate_charges
from privacy.protocol import GATE_ACCOUNTING_KEYS, GATE_PASSED, GATE_STATUS_KEYS
from privacy.rollback_guard import alarm_path
from server.consortium_ledger import read_consortium_ledger
from server.reconcile import reconcile
from server.release import (CACHE_DIR, STATE_FILE, PublicMaps, ReleaseError, ReleaseHalted,
                            prepare_release, run_release, sample_name, slot_seed)

SIZE, SPACING = 16, 12.0
LABELS = ("background", "csf", "grey_matter", "white_matter")


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class InProcessGrid(LoopbackGrid):
    """Every site as an in-process node, recording replies; the ``fail_on_call``-th exchange
    raises as if the link dropped."""

    def __init__(self, client_app, num_nodes: int, fail_on_call: int | None = None):
        nodes = [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        super().__init__(client_app, nodes)
        self.calls, self.fail_on_call = 0, fail_on_call
        self.replies: list[Message] = []

    def push_messages(self, messages):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ConnectionError("the link dropped")
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.replies += replies
        return replies


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A cohort (public + 2 sites), a tiny untrained checkpoint and the model section."""
    root = tmp_path_factory.mktemp("release")
    generate_cohort(root / "cohort", sites=2, patients=5, size=SIZE, seed=7, public_patients=3)
    model = ModelConfig(
        autoencoder=AutoencoderConfig(channels=[8, 8], latent_channels=2, norm_num_groups=4),
        unet=UNetConfig(channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                        norm_num_groups=4),
        conditioning=ConditioningConfig(mode="concat", attributes=["age", "sex"]),
        diffusion=DiffusionConfig(train_timesteps=20, sampling_steps=3))
    torch.manual_seed(0)
    denoiser = build_latent_unet(model, len(LABELS), 2)
    denoiser.attribute_embedding.set_statistics(torch.tensor([55.0, 0.5]),
                                                torch.tensor([20.0, 0.5]))
    checkpoint = root / "checkpoint.pt"
    save_checkpoint(checkpoint, autoencoder=build_autoencoder(model.autoencoder), denoiser=denoiser,
                    model_config=config_to_dict(model),
                    data=DataGrid((SIZE,) * 3, (SPACING,) * 3, LABELS, ("age", "sex")),
                    latent_scale_factor=1.0)
    return {"root": root, "checkpoint": checkpoint, "model": config_to_dict(model)}


def write_config(world: dict, folder: Path, **release) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cohort = world["root"] / "cohort"
    sites = [{"site_id": f"site_{i}", "data_dir": str(cohort / f"site_{i}"),
              "ledger": str(folder / f"state_{i}" / "ledger.jsonl")} for i in range(2)]
    config = {
        "seed": 5, "run_dir": str(folder / "run"),
        "data": {"public_dir": str(cohort / "public"), "shape": [SIZE] * 3,
                 "spacing": [SPACING] * 3},
        "model": world["model"],
        "federation": {"min_sites": 2, "round_timeout": 60, "sites": sites},
        "release": {"distance": "nrmse", "max_attempts": 3, "chunk_size": 4,
                    "attribute_ranges": {"age": [20, 90], "sex": [0, 1]}, **release},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan_for(world: dict, config_path: Path, out: Path, num: int):
    config = load_config(config_path)
    checkpoint = load_checkpoint(world["checkpoint"])
    return prepare_release(config, checkpoint, load_public_maps(config, checkpoint.data), num, out,
                           checkpoint_path=world["checkpoint"])


def site_images(config_path: Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    config = load_config(config_path)
    out = {}
    for site in config.federation.sites:
        dataset = load_site(site.data_dir, config.data, site.manifest)
        out[site.site_id] = (np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]),
                             [dataset[i]["patient_id"] for i in range(len(dataset))])
    return out


# Planted copies, by (slot, attempt): (site, scan index, kind). Slot 3 is a copy at every attempt.
PLANTS = {(0, 0): ("site_0", 0, "exact"), (1, 0): ("site_1", 2, "rolled"),
          (2, 0): ("site_0", 1, "noised"), (2, 1): ("site_1", 0, "exact"),
          (3, 0): ("site_1", 1, "exact"), (3, 1): ("site_0", 3, "rolled"),
          (3, 2): ("site_1", 3, "noised")}


def plant(monkeypatch, scans: dict, seed: int) -> None:
    """Make ``generate`` return planted copies for the (slot, attempt)s of PLANTS."""
    by_noise_seed = {}
    real_draw, real_generate = release_module.draw_condition, release_module.generate

    def draw(plan, slot, attempt):
        condition = real_draw(plan, slot, attempt)
        by_noise_seed[condition.noise_seed] = (slot, attempt)
        return condition

    def generate(model, plan, conditions):
        images, labels = real_generate(model, plan, conditions)
        for i, condition in enumerate(conditions):
            planted = PLANTS.get(by_noise_seed[condition.noise_seed])
            if planted:
                site, index, kind = planted
                copy = torch.as_tensor(scans[site][0][index])
                if kind == "rolled":
                    copy = torch.roll(copy, 1, dims=2)
                if kind == "noised":
                    generator = torch.Generator().manual_seed(seed)
                    copy = copy + 0.02 * torch.randn(copy.shape, generator=generator)
                images[i] = copy
        return images, labels

    monkeypatch.setattr(release_module, "draw_condition", draw)
    monkeypatch.setattr(release_module, "generate", generate)


def brute_force_nearest(candidate: np.ndarray, scans: np.ndarray,
                        exclude: np.ndarray | None = None) -> float:
    """nrmse to the nearest scan under every one-voxel circular shift, float64, pair by pair."""
    best = np.inf
    for shift in np.ndindex(3, 3, 3):
        offset = tuple(s - 1 for s in shift)
        moved = np.roll(candidate.astype(np.float64), offset, axis=(-3, -2, -1))
        for j, scan in enumerate(scans.astype(np.float64)):
            if exclude is None or not exclude[j]:
                best = min(best, np.linalg.norm(moved - scan) / np.linalg.norm(scan))
    return best


def independent_threshold(scans: np.ndarray, patients: list[str], percentile: float = 5.0) -> float:
    distances = [brute_force_nearest(scan, scans, np.array([p == patients[i] for p in patients]))
                 for i, scan in enumerate(scans)]
    return float(np.percentile(distances, percentile))


def output_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def read_image(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_copies_are_rejected_and_every_release_clears_every_threshold(world, tmp_path,
                                                                      monkeypatch) -> None:
    config_path = write_config(world, tmp_path)
    scans = site_images(config_path)
    plant(monkeypatch, scans, seed=1)
    grid = InProcessGrid(make_client_app(str(config_path)), 2)
    plan = plan_for(world, config_path, tmp_path / "out", 5)
    result = run_release(grid, plan)

    assert (result.requested, result.released, result.exhausted) == (5, 4, 1)
    assert result.candidates == 5 + 6 and result.rejections == 7
    rows = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    assert [r["patient_id"] for r in rows] == [sample_name(s) for s in (0, 1, 2, 4)]
    assert [int(r["attempt"]) for r in rows] == [2, 2, 3, 1]
    assert all(r["gate_site_0"] == r["gate_site_1"] == "pass" for r in rows)
    assert float(rows[0]["sex"]) in (0.0, 1.0) and 20 <= float(rows[0]["age"]) <= 90
    # Read back as the evaluation reads them, the maps of the slots released at their first
    # attempt are the ones first_attempt_maps planned (the demo's baselines are built on them).
    config = load_config(config_path)
    planned = first_attempt_maps(config, plan.maps.labels, 5, config.data.num_classes)
    released = load_site(tmp_path / "out", config.data, "manifest.csv")
    for index, (slot, row) in enumerate(zip((0, 1, 2, 4), rows)):
        same = torch.equal(released[index]["label"].argmax(0), planned[slot].long())
        assert same == (row["attempt"] == "1"), (slot, row["attempt"])

    for site, (images, patients) in scans.items():
        threshold = independent_threshold(images, patients)
        for row in rows:
            released = read_image(tmp_path / "out" / row["image"])
            for copy in images:
                assert not np.allclose(released, copy, atol=0.05)
            nearest = brute_force_nearest(released, images)
            assert nearest >= threshold - 1e-9, (site, row["patient_id"])

    # On the wire: every answer holds a pass/fail array and counts, nothing else.
    for reply in grid.replies:
        assert set(reply.content.keys()) == {GATE_PASSED, "gate-accounting", "gate-status"}
        assert list(reply.content[GATE_PASSED].keys()) == ["passed"]
        assert reply.content[GATE_PASSED]["passed"].dtype == "uint8"
        assert set(reply.content["gate-accounting"].keys()) == GATE_ACCOUNTING_KEYS
        assert set(reply.content["gate-status"].keys()) == GATE_STATUS_KEYS

    report = json.loads((tmp_path / "out" / "release_report.json").read_text())
    counts = report["counts"]
    assert counts["rejections"] == 7 and counts["released"] == 4
    assert counts["failed_at_site_0"] + counts["failed_at_site_1"] >= 7
    assert report["distance"] == "nrmse" and report["threshold"]["policy"] == "calibrated"
    assert report["model_sha256"] == plan.checkpoint.content_hash
    assert any("outside the DP-SGD guarantee" in line for line in report["caveats"])
    assert [s["site_id"] for s in report["sites"]] == ["site_0", "site_1"]
    markdown = (tmp_path / "out" / "release_report.md").read_text()
    assert "outside the DP-SGD guarantee" in markdown and "| Rejections | 7 |" in markdown
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0
    assert not (tmp_path / "out" / CACHE_DIR).exists()


def test_interrupted_releases_resume_without_duplicates_or_losses(world, tmp_path,
                                                                  monkeypatch) -> None:
    config_path = write_config(world, tmp_path / "cfg")
    scans = site_images(config_path)
    plant(monkeypatch, scans, seed=2)
    app = make_client_app(str(config_path))
    reference = run_release(InProcessGrid(app, 2),
                            plan_for(world, config_path, tmp_path / "reference", 6))

    # 1. Killed while writing the samples of a round.
    out = tmp_path / "cut-while-writing"
    real_write, calls = release_module.write_volume, []

    def dying_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(release_module, "write_volume", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_release(InProcessGrid(app, 2), plan_for(world, config_path, out, 6))
    monkeypatch.setattr(release_module, "write_volume", real_write)
    state = json.loads((out / STATE_FILE).read_text())
    assert state["rounds"][-1]["stage"] == "decided"     # cut between its decision and its files
    resumed = run_release(InProcessGrid(app, 2), plan_for(world, config_path, out, 6))

    # 2. The link drops during the second gate round (after its candidates were cached).
    out2 = tmp_path / "cut-while-gating"
    with pytest.raises(ConnectionError):
        run_release(InProcessGrid(app, 2, fail_on_call=2), plan_for(world, config_path, out2, 6))
    assert json.loads((out2 / STATE_FILE).read_text())["rounds"][1]["stage"] == "generated"
    resumed2 = run_release(InProcessGrid(app, 2), plan_for(world, config_path, out2, 6))

    expected = output_files(reference.out)
    assert not any(Path(f).name.startswith(".") for f in expected)
    for result in (resumed, resumed2):
        assert output_files(result.out) == expected
        assert (result.released, result.rejections) == (reference.released, reference.rejections)
        rows = list(csv.DictReader((result.out / "manifest.csv").open()))
        assert len({r["patient_id"] for r in rows}) == len(rows) == reference.released
        for row in rows:
            np.testing.assert_allclose(read_image(result.out / row["image"]),
                                       read_image(reference.out / row["image"]), atol=1e-5)
    # The re-sent round was answered from the sites' gate logs: one answer per query id per site.
    for site in load_config(config_path).federation.sites:
        log = (site.ledger_path.parent / "gate_log.jsonl").read_text().splitlines()
        ids = [json.loads(line)["query_id"] for line in log]
        assert len(ids) == len(set(ids))


def test_bad_inputs_get_one_line_each(world, tmp_path) -> None:
    config_path = write_config(world, tmp_path)
    config = load_config(config_path)
    checkpoint = load_checkpoint(world["checkpoint"])
    maps = load_public_maps(config, checkpoint.data)
    for num in (0, -3):
        with pytest.raises(ReleaseError, match="--num: must be a whole number > 0") as caught:
            prepare_release(config, checkpoint, maps, num, tmp_path / "out")
        assert "\n" not in str(caught.value)
    with pytest.raises(ReleaseError, match="checkpoint not found"):
        prepare_release(config, tmp_path / "missing.pt", maps, 2, tmp_path / "out")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(world["checkpoint"].read_bytes()[:500])
    with pytest.raises(ReleaseError, match="unreadable or truncated") as caught:
        prepare_release(config, corrupt, maps, 2, tmp_path / "out")
    assert "\n" not in str(caught.value)
    small = PublicMaps(maps.labels[:, :8, :8, :8].contiguous(), maps.affines, maps.attributes,
                       maps.names)
    with pytest.raises(ReleaseError,
                       match=r"grid \[8, 8, 8\] differs from the checkpoint's \[16, 16, 16\]"):
        prepare_release(config, checkpoint, small, 2, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ReleaseError, match="not empty"):
        prepare_release(config, checkpoint, maps, 2, tmp_path / "busy")


def test_cli_reports_bad_inputs_in_one_line(world, tmp_path, capsys) -> None:
    config_path = write_config(world, tmp_path)
    checkpoint = str(world["checkpoint"])
    cases = [(["--num", "0", "--checkpoint", checkpoint], "--num: must be a whole number > 0"),
             (["--num", "2", "--checkpoint", str(tmp_path / "nope.pt")], "checkpoint not found"),
             (["--num", "2"], "checkpoint not found")]   # default: RUN_DIR/federation/checkpoint.pt
    wrong_grid = yaml.safe_load(config_path.read_text())
    wrong_grid["data"]["shape"] = [8, 8, 8]
    wrong_path = tmp_path / "wrong.yaml"
    wrong_path.write_text(yaml.safe_dump(wrong_grid))
    for extra, expected in cases:
        code = main(["release", "--config", str(config_path), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    code = main(["release", "--config", str(wrong_path), "--out", str(tmp_path / "o"), "--num", "2",
                 "--checkpoint", checkpoint])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "differs from the checkpoint's" in err, err
    assert not (tmp_path / "o").exists()


def test_dp_gate_charges_every_site_ledger_and_the_report_counts_it(world, tmp_path) -> None:
    config_path = write_config(world, tmp_path, max_attempts=2,
                               dp_gate={"enabled": True, "epsilon": 2.0})
    raw = yaml.safe_load(config_path.read_text())
    for site in raw["federation"]["sites"]:
        site["budget"] = {"target_epsilon": 9.0, "delta": 1e-5}
    config_path.write_text(yaml.safe_dump(raw))
    app = make_client_app(str(config_path))
    run_dir = tmp_path / "run"
    plan = dataclasses.replace(plan_for(world, config_path, tmp_path / "out", 3), run_dir=run_dir)
    result = run_release(InProcessGrid(app, 2), plan)
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    rounds = len(state["rounds"])
    report = json.loads(result.report_json.read_text())
    consortium = run_dir / "federation" / "consortium_ledger.jsonl"
    mirrored = read_consortium_ledger(consortium)
    for site, row in zip(load_config(config_path).federation.sites, report["sites"]):
        charges = gate_charges(site.ledger_path)
        assert [c.query_id for c in charges] == [r["query_id"] for r in state["rounds"]]
        assert row["gate_epsilon"] == pytest.approx(2.0 * rounds)
        assert row["total_epsilon"] == pytest.approx(2.0 * rounds)   # no DP-SGD round here
        assert row["source"].startswith("site ledger") and row["cap"] == 9.0
        # Every gate answer is mirrored in the consortium ledger and reconciles with the site's.
        gates = mirrored.gate_reports(site.site_id)
        assert [g.query_id for g in gates] == [r["query_id"] for r in state["rounds"]]
        assert gates[-1].epsilon_total == pytest.approx(2.0 * rounds)
        assert reconcile(site.ledger_path, consortium, site.site_id).ok
    assert any("above-threshold" in line for line in report["caveats"])

    # A site ledger restored from before its gate charges (here: removed) is caught by the site
    # itself at the next query, which carries the head the consortium saw.
    site_0 = load_config(config_path).federation.sites[0].ledger_path
    saved = {path: path.read_bytes() for path in (site_0, site_0.with_name(site_0.name + ".head"))}
    for path in saved:
        path.unlink()
    with pytest.raises(ReleaseHalted, match="site_0: refused \\(ledger-rollback\\)"):
        run_release(InProcessGrid(make_client_app(str(config_path)), 2),
                    dataclasses.replace(plan_for(world, config_path, tmp_path / "out3", 1),
                                        run_dir=run_dir))
    for path, data in saved.items():
        path.write_bytes(data)
    alarm_path(site_0).unlink()

    # A site whose cap cannot take one more query refuses; the release halts and can resume.
    raw["federation"]["sites"][1]["budget"] = {"target_epsilon": 1.0, "delta": 1e-5}
    poor = tmp_path / "poor"
    poor.mkdir()
    (poor / "config.yaml").write_text(yaml.safe_dump(raw))
    site_1 = load_config(config_path).federation.sites[1].ledger_path
    charged = len(gate_charges(site_1))   # the first release's, and site_1's answer just above
    assert charged == rounds + 1
    with pytest.raises(ReleaseHalted, match="site_1: budget-exhausted"):
        run_release(InProcessGrid(make_client_app(str(poor / "config.yaml")), 2),
                    plan_for(world, poor / "config.yaml", tmp_path / "out2", 2))
    # Same ledger files as the first release: the refusing site wrote nothing new.
    assert len(gate_charges(site_1)) == charged
    assert json.loads((tmp_path / "out2" / STATE_FILE).read_text())["rounds"][0]["stage"] == \
        "generated"


def test_slot_seeds_are_fixed_by_slot_and_attempt() -> None:
    assert slot_seed(5, 3, 1) == slot_seed(5, 3, 1)
    assert len({slot_seed(5, s, a) for s in range(20) for a in range(3)}) == 60
    assert all(0 <= slot_seed(9, s, 0) < 2 ** 63 for s in range(10))


@pytest.mark.slow
def test_release_through_a_flower_simulation(world, tmp_path, capsys) -> None:
    config_path = write_config(world, tmp_path, distance="latent")
    out = tmp_path / "released"
    code = main(["release", "--config", str(config_path), "--num", "3", "--out", str(out),
                 "--checkpoint", str(world["checkpoint"])])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "released:" in printed
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    report = json.loads((out / "release_report.json").read_text())
    assert len(rows) == report["counts"]["released"] and report["distance"] == "latent"
    assert report["counts"]["candidates"] >= 3
    for site in load_config(config_path).federation.sites:
        lines = (site.ledger_path.parent / "gate_log.jsonl").read_text().splitlines()
        log = [json.loads(line) for line in lines]
        assert log and all("answer" in entry for entry in log)
        assert sum(len(entry["candidates"]) for entry in log) == report["counts"]["candidates"]


def test_deformed_maps_move_class_shares_as_the_cohort_labels_do():
    from monai.transforms import Rand3DElastic

    # A synthetic head: nested shells of classes 1-3 on background.
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    radius = (grid - 7.5).norm(dim=0)
    labels = torch.bucketize(-radius, torch.tensor([-7.0, -5.0, -3.0])).to(torch.uint8)
    moved = release_module.deformed_map(labels, 11, 4)
    assert moved.dtype == torch.uint8 and moved.shape == labels.shape
    assert int(moved.max()) <= 3
    assert torch.equal(release_module.deformed_map(labels, None, 4), labels)
    # The same field applied to the one-hot map, then the largest share: not the class indices
    # moved by nearest neighbour (the previous behaviour, which differs on this map).
    transform = Rand3DElastic(prob=1.0, mode="bilinear", padding_mode="zeros",
                              **release_module._ELASTIC).set_random_state(seed=11)
    one_hot = torch.nn.functional.one_hot(labels.long(), 4).permute(3, 0, 1, 2).float()
    assert torch.equal(moved, torch.as_tensor(transform(one_hot)).argmax(0).to(torch.uint8))
    nearest = Rand3DElastic(prob=1.0, mode="nearest", padding_mode="zeros",
                            **release_module._ELASTIC).set_random_state(seed=11)
    assert not torch.equal(moved, torch.as_tensor(nearest(labels[None].float()))[0]
                           .round().to(torch.uint8))


def test_deform_scale_scales_the_elastic_displacement_only():
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    radius = (grid - 7.5).norm(dim=0)
    labels = torch.bucketize(-radius, torch.tensor([-7.0, -5.0, -3.0])).to(torch.uint8)
    changed = {scale: float((release_module.deformed_map(labels, 11, 4, scale) != labels)
                            .float().mean()) for scale in (0.0, 0.25, 1.0, 2.0)}
    assert changed[0.0] < changed[0.25] < changed[1.0] < changed[2.0]
    assert torch.equal(release_module.deformed_map(labels, 11, 4, 1.0),
                       release_module.deformed_map(labels, 11, 4))
    # scale 0: the same seed's rotation, scaling and translation alone.
    from monai.transforms import Rand3DElastic
    affine_only = Rand3DElastic(prob=1.0, mode="bilinear", padding_mode="zeros",
                                **{**release_module._ELASTIC, "magnitude_range": (0.0, 0.0)})
    one_hot = torch.nn.functional.one_hot(labels.long(), 4).permute(3, 0, 1, 2).float()
    expected = torch.as_tensor(affine_only.set_random_state(seed=11)(one_hot)).argmax(0)
    assert torch.equal(release_module.deformed_map(labels, 11, 4, 0.0), expected.to(torch.uint8))


def test_a_decoder_that_sees_the_map_decodes_each_candidate_with_its_own_map(
        world, tmp_path, monkeypatch) -> None:
    """With ``decoder_map_classes``, the release decodes each candidate with the deformed map
    it was sampled on (the map it is released with), folded onto the latent grid."""
    from models.conditioning import space_to_depth

    model = {**world["model"],
             "autoencoder": {**world["model"]["autoencoder"], "decoder_map_classes": len(LABELS)}}
    torch.manual_seed(0)
    config = load_config(write_config({**world, "model": model}, tmp_path / "cfg")).model
    denoiser = build_latent_unet(config, len(LABELS), 2)
    denoiser.attribute_embedding.set_statistics(torch.tensor([55.0, 0.5]),
                                                torch.tensor([20.0, 0.5]))
    path = tmp_path / "map_decoder.pt"
    save_checkpoint(path, autoencoder=build_autoencoder(config.autoencoder), denoiser=denoiser,
                    model_config=model,
                    data=DataGrid((SIZE,) * 3, (SPACING,) * 3, LABELS, ("age", "sex")),
                    latent_scale_factor=1.0)
    plan = plan_for({**world, "checkpoint": path}, tmp_path / "cfg" / "config.yaml",
                    tmp_path / "out", num=3)
    network = load_checkpoint(path).build_model()
    decode, seen = network.autoencoder.decode, []
    monkeypatch.setattr(network.autoencoder, "decode",
                        lambda z, grid: seen.append(grid) or decode(z, grid))
    conditions = [release_module.draw_condition(plan, slot, 0) for slot in range(3)]
    images, labels = release_module.generate(network, plan, conditions)
    onehot = torch.nn.functional.one_hot(labels.long(), len(LABELS)).permute(0, 4, 1, 2, 3)
    assert images.shape == (3, 1, SIZE, SIZE, SIZE) and torch.isfinite(images).all()
    assert torch.equal(torch.cat(seen), space_to_depth(onehot.float(), 2))
