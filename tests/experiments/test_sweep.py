"""``fedsynth sweep``: a real two-setting sweep against a real MLflow store, read back; bad files."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from mlflow import MlflowClient

from experiments.cli import main
from experiments.sweep import SweepError, load_sweep, run_sweep
from experiments.tiny_federation import write_tiny_federation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sweep(folder: Path, base: Path, **changes) -> Path:
    sweep = {"name": "tiny", "base": str(base), "out": "out",
             "set": {"pretrain": {"autoencoder": {"epochs": 1, "batch_size": 2},
                                  "unet": {"epochs": 1, "batch_size": 2}}},
             "grid": {"epsilon": [3, 10]},
             "quality": {"samples": 2, "seg_steps": 2, "holdout_patients": 2}}
    sweep.update(changes)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-site, 4-patient, 16^3 federation config with one round (its cohort included)."""
    federation = write_tiny_federation(tmp_path_factory.mktemp("base"), sites=2, patients=4,
                                       rounds=1, min_sites=2)
    return federation.config_path


@pytest.mark.slow
def test_sweep_logs_nested_runs_summary_and_plot_then_skips_finished(tmp_path, tiny_base):
    sweep_file = write_sweep(tmp_path, tiny_base)
    lines: list[str] = []
    summary = run_sweep(sweep_file, echo=lines.append)

    out = tmp_path / "out"
    assert [r.values for r in summary.results] == [{"epsilon": "3"}, {"epsilon": "10"}]
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["fedsynth.sweep"] == "tiny"
    assert parent.info.status == "FINISHED"

    experiment = parent.info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                      f"and tags.`fedsynth.sweep.role` = 'setting'")
    by_epsilon = {run.data.params["sweep.epsilon"]: run for run in children}
    assert sorted(by_epsilon) == ["10", "3"]
    for cap, run in by_epsilon.items():
        metrics = run.data.metrics
        for site in ("site_0", "site_1"):
            assert 0 < metrics[f"final/epsilon/{site}"] <= float(cap)
            history = client.get_metric_history(run.info.run_id, f"epsilon/{site}")
            assert [m.step for m in history] == [1]       # one federated round, logged per round
        for name in ("kid", "conditional_dice", "utility_dice", "ms_ssim_diversity", "rf_fid"):
            assert f"quality/{name}" in metrics
            assert f"baseline/collapse/{name}" in metrics and f"baseline/real/{name}" in metrics
        assert run.data.tags["fedsynth.sweep.status"] == "finished"
        assert run.data.tags["mlflow.runName"] == f"epsilon={cap}"
    # Stronger privacy, more noise: the epsilon-3 run spent less than the epsilon-10 run.
    assert by_epsilon["3"].data.metrics["final/epsilon/site_0"] < \
        by_epsilon["10"].data.metrics["final/epsilon/site_0"]
    # Both settings started from one shared pretraining, itself nested under the parent.
    pretraining = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                      f"and tags.`fedsynth.sweep.role` = 'pretrain'")
    assert len(pretraining) == 1
    assert len(list((out / "pretrain").iterdir())) == 1

    plot = Path(client.download_artifacts(parent.info.run_id, "tradeoff.png", str(tmp_path)))
    data = plot.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 200
    assert matplotlib.image.imread(plot).shape[:2] == (height, width)
    table = Path(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.open()))
    settings = [row for row in rows if not row["setting"].startswith("baseline: ")]
    baselines = {row["setting"]: row for row in rows if row["setting"].startswith("baseline: ")}
    assert [row["epsilon"] for row in settings] == ["3", "10"]
    assert {row["mlflow_run_id"] for row in settings} == {run.info.run_id for run in children}
    assert all(float(row["rf_fid"]) >= 0 and row["kid"] for row in settings)
    # Baselines measured once (cached) and shared: one row each; both settings share one
    # pretraining, so one pretrained-only row too.
    assert set(baselines) == {"baseline: real", "baseline: collapse", "baseline: copy",
                              "baseline: pretrained_only"}
    assert all(row["kid"] and row["utility_dice"] for row in baselines.values())
    assert "baseline: collapse" in (out / "summary.md").read_text()
    assert list((out / "metrics_cache").glob("public_segmenter_*.pt"))
    # Every setting kept its own ledgers.
    for setting in ("epsilon-3", "epsilon-10"):
        assert (out / "settings" / setting / "ledgers" / "site_0.jsonl").exists()

    rerun: list[str] = []
    again = run_sweep(sweep_file, echo=rerun.append)
    assert sum("finished before, skipped" in line for line in rerun) == 2
    assert again.parent_run_id == summary.parent_run_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = "
                                                f"'{parent.info.run_id}'")) == 3

    # A setting cut after its federation resumes there: same run, no new federation or run.
    (out / "settings" / "epsilon-10" / "result.json").unlink()
    resumed: list[str] = []
    third = run_sweep(sweep_file, echo=resumed.append)
    assert "      federation: reused" in resumed
    assert any(line.startswith("      pretraining") and line.endswith(": reused") for line in resumed)
    assert third.results[1].run_id == summary.results[1].run_id
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = "
                                                f"'{parent.info.run_id}'")) == 3

    # A finished setting whose definition changed is refused before anything runs.
    changed = write_sweep(tmp_path, tiny_base, set={"privacy": {"learning_rate": 1e-3}})
    with pytest.raises(SweepError, match="was run with another config"):
        run_sweep(changed, echo=rerun.append)


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"epsilonn": [1]}}, "epsilonn: unknown axis; use one of epsilon"),
    ({"grid": {"epsilon": [-1]}}, "setting epsilon=-1: federation.sites[0].budget.target_epsilon: "
                                  "must be > 0 (got -1.0)"),
    ({"grid": {"model_size": ["xl"]}}, "model_size: expected one of xs, s, m (got 'xl')"),
    ({"grid": {"epsilon": []}}, "grid.epsilon: expected a non-empty list of values"),
    ({"grid": {}, "settings": []}, "no settings; give a grid"),
    ({"quality": {"samples": 1}}, "quality.samples: the metrics need at least 2 volumes"),
    ({"quality": {"sample": 4}}, "quality.sample: unknown; use samples"),
    ({"set": {"privacy": {"max_grad_nrm": 2}}}, "privacy.max_grad_nrm: unknown key"),
    ({"grid": {"epsilon": [1, 1.0]}}, "setting epsilon-1 appears twice"),
    ({"colour": 1}, "colour: unknown key"),
])
def test_bad_sweep_files_are_refused_with_one_line(tmp_path, tiny_base, changes, message, capsys):
    sweep_file = write_sweep(tmp_path, tiny_base, **changes)
    with pytest.raises(SweepError, match=None) as error:
        load_sweep(sweep_file)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert main(["sweep", str(sweep_file), "--list"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_no_dp_setting_disables_privacy_and_opts_every_site_in(tmp_path, tiny_base):
    plan = load_sweep(write_sweep(tmp_path, tiny_base, grid={"epsilon": [5, "none"]}))
    dp, no_dp = (setting.config for setting in plan.settings)
    assert dp["privacy"]["enabled"] is True
    assert [site["budget"]["target_epsilon"] for site in dp["federation"]["sites"]] == [5.0, 5.0]
    assert not any(site.get("allow_non_private") for site in dp["federation"]["sites"])
    assert no_dp["privacy"]["enabled"] is False
    assert all(site["allow_non_private"] for site in no_dp["federation"]["sites"])
    assert [s.name for s in plan.settings] == ["epsilon=5", "epsilon=none"]


def test_list_shows_the_grid_without_running(tmp_path, tiny_base, capsys):
    sweep_file = write_sweep(tmp_path, tiny_base,
                             grid={"epsilon": [1, 10], "pretraining": [True, False]},
                             settings=[{"epsilon": 10, "model_size": "xs"}])
    assert main(["sweep", str(sweep_file), "--list"]) == 0
    shown = capsys.readouterr().out
    assert "5 settings" in shown
    assert "epsilon=1, pretraining=no" in shown
    assert "epsilon=10, model_size=xs" in shown
    assert not (tmp_path / "out").exists()
