"""``fedsynth demo``: the whole mission on one machine, stage by stage.

cohort -> data check -> public pretraining -> federated DP fine-tuning (Flower simulation)
-> gated release -> quality evaluation -> summary. Every stage writes under the config's
``run_dir`` and is reused when run again: a finished stage is skipped, an interrupted one
resumes. Quality is measured against held-out patients of every site that no site and no
pretraining saw (:func:`experiments.cohort.generate_holdout`, as the sweep does), next to the
baselines of :mod:`models.metrics.quality` (real, collapse, copy, pretrained-only samples).
On a CPU-only machine the four quality segmenters that need no model train beside pretraining
(:class:`RealSideTraining`, :class:`CoreSharing`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from configs import Config, load_config

log = logging.getLogger(__name__)

RELEASE_DIR = "release"
EVALUATION_FILE = "evaluation.json"
# The demo's six quality segmenters train at most this many steps (early stopping may end them
# sooner) to keep the demo within 10 minutes on 2 cores; `fedsynth evaluate` defaults to 400.
# 250 until 2026-12-02: the 30-epoch autoencoder took the demo to 10 min 35 s from a fresh clone.
DEMO_SEG_STEPS = 200
HOLDOUT_DIR = "holdout"
PRETRAINED_SAMPLES_DIR = "pretrained_samples"
METRICS_CACHE_DIR = "metrics_cache"
HOLDOUT_PATIENTS_PER_SITE = 8


class DemoError(ValueError):
    """The demo config does not describe a layout the demo can build."""


@dataclass
class DemoSummary:
    run_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    caps: dict[str, float] = field(default_factory=dict)
    release: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    tracking_uri: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]


def demo_cohort_dir(config: Config) -> Path:
    """The demo cohort's folder: public_dir's parent, which must also hold every site."""
    if config.data.public_dir is None or not config.federation.sites:
        raise DemoError("the demo config needs data.public_dir and federation.sites "
                        "(see configs/demo.yaml)")
    root = Path(config.data.public_dir).parent
    for i, site in enumerate(config.federation.sites):
        if Path(site.data_dir) != root / f"site_{i}":
            raise DemoError(f"federation.sites[{i}].data_dir: the demo writes site {i} to "
                            f"{root / f'site_{i}'}; point data_dir there (got {site.data_dir})")
    return root


def generate_demo_cohort(config: Config, *, patients: int, public_patients: int) -> Path:
    """Write (or reuse) the demo cohort the config points at: its public set and one folder per
    site, on the config's grid and seed."""
    from experiments.cohort import generate_cohort

    return generate_cohort(demo_cohort_dir(config), sites=len(config.federation.sites),
                           patients=patients, size=config.data.shape[0], seed=config.seed,
                           public_patients=public_patients).out


def run_demo(config_path: Path, *, patients: int = 40, public_patients: int = 40,
             seg_steps: int | None = None, echo: Callable[[str], None] = print) -> DemoSummary:
    """Run (or continue) every stage of the demo described by ``config_path``."""
    from client.site_data import check_site
    from server.federation import FINAL_CHECKPOINT, federation_dir
    from server.server_app import default_run_dir
    from server.tracking import resolve_tracking_uri

    config_path = Path(config_path).resolve()
    config = load_config(config_path, check_paths=False)
    cohort_dir = demo_cohort_dir(config)
    run_dir = default_run_dir(config_path, config.run_dir)
    summary = DemoSummary(run_dir=run_dir, tracking_uri=resolve_tracking_uri(config.tracking, run_dir))
    pretrained = run_dir / "checkpoint.pt"
    fed_dir = federation_dir(run_dir)
    release_dir = run_dir / RELEASE_DIR
    evaluation = run_dir / EVALUATION_FILE

    def cohort() -> None:
        generate_demo_cohort(config, patients=patients, public_patients=public_patients)

    def data_check() -> None:
        for folder in [Path(config.data.public_dir)] + [s.data_dir for s in config.federation.sites]:
            report = check_site(folder, config.data, config.data.manifest,
                                config.model.conditioning.attributes)
            if report.problems:
                raise DemoError(f"{folder}: {len(report.problems)} problem(s), first: "
                                f"{report.problems[0]}; run `fedsynth data check {folder}`")
            echo(f"      {folder.name}: {len(report.records)} scans ok")

    def pretrain() -> None:
        from experiments.pretrain import STATE_FILE, pretrain as train
        with CoreSharing():
            train(load_config(config_path), run_dir, resume=(run_dir / STATE_FILE).exists())

    def federate() -> None:
        from experiments.federate import simulate
        from server.round_checkpoint import STATE_FILE
        from server.federation import FederationHalted
        try:
            simulate(config_path, run_dir, resume=(fed_dir / STATE_FILE).exists())
        except FederationHalted as err:
            if "budget-exhausted" not in str(err):
                raise
            # The sites' ledgers live in the cohort folders and outlive a deleted run folder.
            raise DemoError(f"{err}; the sites' budgets are spent in their ledgers "
                            f"({cohort_dir}/site_*/.fedsynth): delete {cohort_dir} to start "
                            f"again with new sites") from None

    def release() -> None:
        from experiments.commands.release import simulate_release
        from models.checkpoint import load_checkpoint
        from server.release import load_public_maps, prepare_release
        checkpoint_path = fed_dir / FINAL_CHECKPOINT
        checkpoint = load_checkpoint(checkpoint_path)
        full = load_config(config_path)
        plan = prepare_release(full, checkpoint, load_public_maps(full, checkpoint.data),
                               full.release.num_samples, release_dir,
                               checkpoint_path=checkpoint_path, run_dir=run_dir)
        simulate_release(config_path, plan)

    def evaluate() -> None:
        from experiments.cohort import generate_holdout
        from experiments.evaluate import evaluate_folders, write_json_atomic
        from experiments.sampling import sample_folder
        if real_side is not None:
            real_side.join(echo)
        holdout = generate_holdout(cohort_dir, run_dir / HOLDOUT_DIR, HOLDOUT_PATIENTS_PER_SITE)
        pretrained_samples = run_dir / PRETRAINED_SAMPLES_DIR
        if not (pretrained_samples / "manifest.csv").exists():
            # The pretrained model gets the released samples' own maps and attributes (the
            # deformed public maps), so the baseline differs from the model only in federation.
            report = json.loads((release_dir / "release_report.json").read_text())
            released = report.get("counts", {}).get("released") or config.release.num_samples
            sample_folder(pretrained, release_dir, max(2, int(released)),
                          pretrained_samples, seed=config.seed)
        result = evaluate_folders(
            holdout, release_dir, config.data, public_dir=Path(config.data.public_dir),
            train_dirs=tuple(Path(s.data_dir) for s in config.federation.sites),
            pretrained_dir=pretrained_samples, seed=config.seed,
            seg_steps=seg_steps or DEMO_SEG_STEPS, cache_dir=run_dir / METRICS_CACHE_DIR)
        write_json_atomic(evaluation, result.to_json_dict())

    stages = [
        Stage("demo cohort (public + sites)", lambda: (cohort_dir / "cohort.json").exists(), cohort),
        Stage("data check", lambda: False, data_check),
        Stage("public pretraining", pretrained.exists, pretrain),
        Stage("federated DP fine-tuning", (fed_dir / FINAL_CHECKPOINT).exists, federate),
        Stage("gated release", (release_dir / "release_report.json").exists, release),
        Stage("quality evaluation", evaluation.exists, evaluate),
    ]
    real_side: RealSideTraining | None = None
    try:
        for number, stage in enumerate(stages, 1):
            header = f"[{number}/{len(stages)}] {stage.name}"
            if stage.done():
                echo(f"{header}: done before, reused")
                summary.reused.append(stage.name)
                continue
            if stage.run is pretrain and not evaluation.exists() and RealSideTraining.worth_it():
                real_side = RealSideTraining.start(config_path, cohort_dir, run_dir,
                                                   seg_steps or DEMO_SEG_STEPS)
                echo("      quality segmenters that need no model (public, real, collapse, copy): "
                     "training beside pretraining, on a core of their own")
            echo(f"{header} ...")
            start = time.perf_counter()
            stage.run()
            summary.seconds[stage.name] = time.perf_counter() - start
            echo(f"{header}: {summary.seconds[stage.name]:.0f} s")
    finally:
        if real_side is not None:
            real_side.stop()

    _collect(summary, config, fed_dir, release_dir, evaluation)
    return summary


class CoreSharing:
    """Pretraining's threads on a CPU-only machine with a core to spare: all of pretraining runs
    on one torch thread fewer, leaving a core to :class:`RealSideTraining`. Used as a context
    manager; restores the thread count on exit.

    Fixed, not switched when the job ends: thread count changes the floating-point summation
    order, so a switch timed by the job would make the model depend on the machine's speed;
    fixed, a rerun (or a resumed run) on the same machine trains the same model. All of it,
    because the job lasts about as long as pretraining: on 2026-12-03's 2-core machine its four
    segmenters (public, real, collapse, copy) took 264-283 s, pretraining 283-306 s. Giving the
    last 10 UNet epochs both threads back ran them beside the job's end, 3 threads on 2 cores, at
    3.0 s an epoch on average against 2.3 s on one thread.
    """

    def __init__(self) -> None:
        import torch
        self._threads = torch.get_num_threads()
        self._shared = RealSideTraining.worth_it()

    def __enter__(self) -> CoreSharing:
        import torch
        if self._shared:
            torch.set_num_threads(max(1, self._threads - 1))
        return self

    def __exit__(self, *_exc: object) -> None:
        import torch
        torch.set_num_threads(self._threads)


def _train_real_side(report: Any, config_path: Path, cohort_dir: Path, run_dir: Path,
                     seg_steps: int) -> None:
    """Background process body: the held-out patients, then the public segmenter and the
    ``real``, ``collapse`` and ``copy`` baselines' figures (the last two for the release's
    first-attempt maps), into the run's metrics cache. Sends its seconds, or the error's line."""
    import torch
    start = time.perf_counter()
    torch.set_num_threads(1)
    sys.stderr = open(os.devnull, "w")  # its progress bars would garble the pretraining's
    try:
        from experiments.cohort import generate_holdout
        from experiments.evaluate import prepare_real_side
        from server.release import first_attempt_maps
        config = load_config(config_path)
        holdout = generate_holdout(cohort_dir, run_dir / HOLDOUT_DIR, HOLDOUT_PATIENTS_PER_SITE)

        def planned_maps(public_labels: torch.Tensor) -> torch.Tensor:
            return first_attempt_maps(config, public_labels[:, 0], config.release.num_samples,
                                      config.data.num_classes)[:, None]

        prepare_real_side(holdout, config.data, public_dir=Path(config.data.public_dir),
                          seed=config.seed, seg_steps=seg_steps,
                          cache_dir=run_dir / METRICS_CACHE_DIR,
                          train_dirs=tuple(Path(s.data_dir) for s in config.federation.sites),
                          planned_maps=planned_maps)
    except Exception as err:  # noqa: BLE001 - reported to the demo, which trains them itself
        report.send(f"{type(err).__name__}: {err}")
        return
    report.send(time.perf_counter() - start)


class RealSideTraining:
    """The quality figures that need no model, computed in a one-thread background process
    while the model pretrains on the other cores (:class:`CoreSharing`): the public segmenter
    and the ``real`` baseline, and the ``collapse`` and ``copy`` baselines for the maps the
    release will condition its first attempts on (:func:`server.release.first_attempt_maps`,
    fixed by the seed; :func:`experiments.evaluate.prepare_real_side`). The evaluation stage then
    trains two segmenters instead of six. The evaluation's cache is keyed by content: if the
    gate rejected a first attempt, the released maps differ and the evaluation measures
    ``collapse`` and ``copy`` itself; should the job fail or be stopped, it computes every
    figure itself.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess, report: Any) -> None:
        self._process = process
        self._report = report

    @staticmethod
    def worth_it() -> bool:
        """Only on a CPU-only machine with a core to spare (the evaluation would use the GPU)."""
        from models.device import resolve_device
        from models.metrics.segmenter_pool import available_cores
        return resolve_device(None).type == "cpu" and available_cores() >= 2

    @classmethod
    def start(cls, config_path: Path, cohort_dir: Path, run_dir: Path,
              seg_steps: int) -> RealSideTraining:
        context = multiprocessing.get_context("spawn")  # no fork of a process running OpenMP
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_train_real_side, daemon=True,
                                  args=(send, config_path, cohort_dir, run_dir, seg_steps))
        process.start()
        send.close()
        return cls(process, receive)

    def join(self, echo: Callable[[str], None]) -> None:
        """Wait for the job; say so when it failed (the evaluation then does its work)."""
        start = time.perf_counter()
        message = "exited without a word"
        try:
            message = self._report.recv()
        except EOFError:
            pass
        self._process.join()
        waited = time.perf_counter() - start
        if isinstance(message, float):
            echo(f"      quality segmenters that need no model: ready, trained in {message:.0f} s "
                 f"beside pretraining (waited {waited:.0f} s)")
        else:
            echo(f"      quality segmenters that need no model: the background job failed "
                 f"({message}); training them now")

    def stop(self) -> None:
        """End the job if it still runs (the demo stopped before its evaluation)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()


def _collect(summary: DemoSummary, config: Config, fed_dir: Path, release_dir: Path,
             evaluation: Path) -> None:
    """Read the figures of the summary back from what the stages wrote."""
    from privacy.report import build_report

    for site in config.federation.sites:
        if site.ledger_path.exists():
            report = build_report(site.ledger_path)
            summary.epsilon[site.site_id] = report.spent
            summary.caps[site.site_id] = report.cap
            summary.paths[f"ledger {site.site_id}"] = site.ledger_path
    report_json = release_dir / "release_report.json"
    if report_json.exists():
        summary.release = json.loads(report_json.read_text())
    if evaluation.exists():
        summary.quality = json.loads(evaluation.read_text())
    summary.paths.update({
        "synthetic NIfTI": release_dir / "images",
        "release report": release_dir / "release_report.md",
        "preview": release_dir / "preview.png",
        "epsilon reports": fed_dir / "reports",
        "consortium ledger": fed_dir / "consortium_ledger.jsonl",
        "quality": evaluation,
        "reference (held out)": summary.run_dir / HOLDOUT_DIR,
    })


_SUMMARY_METRICS = (("kid", "feature KID (lower better)"),
                    ("conditional_dice", "conditional Dice"),
                    ("utility_dice", "utility Dice (trained on set)"),
                    ("ms_ssim_diversity", "MS-SSIM diversity"),
                    ("intensity_dice", "intensity Dice (no network)"),
                    ("sharpness", "sharpness (no network)"),
                    ("rf_fid", "rf_fid (secondary)"))


def _quality_lines(quality: dict[str, Any]) -> list[str]:
    """The model's headline metrics next to every baseline, and the bars."""
    if not quality.get("metrics"):
        return []
    sets = {"model": quality["metrics"], **quality.get("baselines", {})}
    lines = ["quality     vs held-out patients: " + " ".join(f"{n:>15}" for n in sets)]
    for name, label in _SUMMARY_METRICS:
        values = [(s or {}).get(name) for s in sets.values()]
        lines.append(f"  {label:<32}" + " ".join(
            f"{'n/a' if v is None else format(v, '.4g'):>15}" for v in values))
    bars = quality.get("bars", {})
    if bars:
        lines.append("bars        " + ", ".join(f"{k} {'met' if v else 'NOT met'}"
                                                for k, v in bars.items()))
    return lines


def format_summary(summary: DemoSummary) -> str:
    lines = ["", "fedsynth demo: done", ""]
    if summary.seconds:
        total = sum(summary.seconds.values())
        lines.append(f"time        {total:.0f} s this run"
                     + (f" (reused: {', '.join(summary.reused)})" if summary.reused else ""))
    for site, spent in summary.epsilon.items():
        lines.append(f"epsilon     {site}: {spent:.3f} of {summary.caps[site]:g}")
    counts = summary.release.get("counts", {})
    if counts:
        lines.append("gate        " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += _quality_lines(summary.quality)
    for name, path in summary.paths.items():
        lines.append(f"{name:<20}{path}")
    lines.append(f"MLflow UI   mlflow ui --backend-store-uri {summary.tracking_uri}")
    return "\n".join(lines)
