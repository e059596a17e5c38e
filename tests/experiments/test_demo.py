"""``fedsynth demo`` end to end on a tiny config: every stage, then a rerun that reuses them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from experiments.demo import CoreSharing, DemoError, RealSideTraining, format_summary, run_demo
from experiments.tiny_federation import SIZE, SPACING, tiny_model_section

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_demo_config(folder: Path) -> Path:
    cohort = folder / "cohort"
    data = {
        "seed": 0, "run_dir": "run",
        "data": {"public_dir": "cohort/public", "shape": [SIZE] * 3, "spacing": [SPACING] * 3},
        "model": tiny_model_section(["age", "sex"]),
        "pretrain": {"autoencoder": {"epochs": 1, "batch_size": 2},
                     "unet": {"epochs": 1, "batch_size": 4}},
        "federation": {"rounds": 1, "min_sites": 2, "sites": [
            {"site_id": f"site_{k}", "data_dir": str(cohort / f"site_{k}"),
             "budget": {"target_epsilon": 10.0, "delta": 1e-3}} for k in range(2)]},
        "privacy": {"expected_batch_size": 4, "max_physical_batch_size": 8},
        "release": {"num_samples": 2, "max_attempts": 1,
                    "attribute_ranges": {"age": [20, 90], "sex": [0, 1]}},
        "tracking": {"experiment": "demo-test"},
    }
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_demo_runs_every_stage_then_reuses_them(tmp_path, monkeypatch):
    # The background job runs on any CPU-only machine with 2 cores; say so on a 1-core one too.
    monkeypatch.setattr("models.metrics.segmenter_pool.available_cores", lambda: 2)
    config = tiny_demo_config(tmp_path)
    lines: list[str] = []
    summary = run_demo(config, patients=4, public_patients=4, seg_steps=4, echo=lines.append)

    assert not summary.reused
    # The public segmenter and the real baseline were trained beside pretraining and read back.
    assert any("quality segmenters that need no model: ready" in line for line in lines), lines
    assert len(list((tmp_path / "run" / "metrics_cache").glob("public_segmenter_*.pt"))) == 1
    assert set(summary.seconds) == {"demo cohort (public + sites)", "data check",
                                    "public pretraining", "federated DP fine-tuning",
                                    "gated release", "quality evaluation"}
    assert set(summary.epsilon) == {"site_0", "site_1"}
    for site, spent in summary.epsilon.items():
        assert 0 < spent <= summary.caps[site]
        assert summary.paths[f"ledger {site}"].exists()
    assert summary.release["counts"]["requested"] == 2
    quality = summary.quality
    assert set(quality["baselines"]) == {"real", "collapse", "copy", "pretrained_only"}
    assert all(quality["baselines"][name]["kid"] is not None for name in quality["baselines"])
    assert quality["metrics"]["utility_dice"] is not None
    assert "beats_collapse_kid" in quality["bars"]
    assert quality["real"]["folder"] == str(tmp_path / "run" / "holdout")  # no site trained on it
    assert quality["training"]["folders"] == [str(tmp_path / "cohort" / f"site_{k}")
                                              for k in range(2)]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "federation" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "release" / "release_report.md").exists()
    # The pretrained-only baseline was sampled on the released samples' own maps.
    released = sorted((tmp_path / "run" / "release" / "labels").glob("*.nii.gz"))
    baseline = sorted((tmp_path / "run" / "pretrained_samples" / "labels").glob("*.nii.gz"))
    assert len(released) == len(baseline) == 2
    for ours, theirs in zip(released, baseline):
        assert np.array_equal(np.asarray(nib.load(ours).dataobj),
                              np.asarray(nib.load(theirs).dataobj))
    text = format_summary(summary)
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    assert "epsilon     site_0:" in text
    assert "feature KID" in text and "pretrained_only" in text and "bars " in text

    again = run_demo(config, patients=4, public_patients=4, seg_steps=4, echo=lines.append)
    assert set(again.reused) == set(summary.seconds) - {"data check"}
    assert again.epsilon == summary.epsilon  # nothing was trained or charged twice


def test_demo_refuses_a_site_outside_the_cohort(tmp_path):
    config = tiny_demo_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["federation"]["sites"][1]["data_dir"] = str(tmp_path / "elsewhere")
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(DemoError, match=r"federation.sites\[1\].data_dir: the demo writes site 1"):
        run_demo(config, echo=lambda _: None)


def test_core_sharing_gives_all_of_pretraining_one_thread_fewer(monkeypatch):
    """Fixed, whatever the background job does: the model must not depend on the machine's
    speed."""
    monkeypatch.setattr(RealSideTraining, "worth_it", staticmethod(lambda: True))
    torch.set_num_threads(2)
    with CoreSharing():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # restored on exit

    monkeypatch.setattr(RealSideTraining, "worth_it", staticmethod(lambda: False))
    with CoreSharing():
        assert torch.get_num_threads() == 2  # a GPU machine or one core: nothing to share


def test_a_failed_background_job_is_one_line_and_the_evaluation_takes_over(tmp_path):
    job = RealSideTraining.start(tmp_path / "absent.yaml", tmp_path / "cohort", tmp_path / "run",
                                 seg_steps=4)
    lines: list[str] = []
    job.join(lines.append)
    job.stop()  # already ended: nothing to terminate
    assert len(lines) == 1, lines
    assert "the background job failed" in lines[0] and "absent.yaml" in lines[0]
    assert lines[0].endswith("training them now")
    assert not (tmp_path / "run").exists()  # it wrote nothing
