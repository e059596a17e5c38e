"""``fedsynth sweep``: privacy/quality trade-offs, one nested MLflow run per setting.

A sweep file (YAML; paths relative to the file)::

    name: privacy_quality            # default: the file's stem
    base: ../../configs/demo.yaml    # the experiment config every setting starts from
    out: ../../runs/sweeps/privacy_quality   # default: runs/sweeps/<name> (from the cwd)
    set:                             # overrides for every setting (nested, or dotted keys)
      federation: {rounds: 3}
    grid:                            # the cartesian product of these axes ...
      epsilon: [1, 3, 10, none]
      pretraining: [true, false]
    settings:                        # ... and/or an explicit list, run after the grid
      - {epsilon: 10, model_size: m}
    quality:
      samples: 16                    # volumes sampled per setting
      seg_steps: 400                 # most steps of each quality segmenter (early stopping)
      holdout_patients: 8            # per site, for the default reference (below)
      reference: null                # a site-format folder; default: held-out demo patients
    cohort: {patients: 40, public_patients: 40}   # generate the demo cohort if it is missing

Axes (:data:`AXES`): ``epsilon`` (every site's cap; ``none`` = no DP, the sites opt in to
non-private training), ``max_grad_norm``, ``noise_multiplicity``, ``trainable``,
``pretraining`` (the latent UNet's public pretraining; the autoencoder is always pretrained),
``model_size`` (latent-UNet width preset, :data:`MODEL_SIZES`); any dotted config key
(``privacy.learning_rate``) works too.

Each setting, under ``out/settings/<slug>/``:

1. its experiment config (``config.yaml``), validated before anything runs; every site gets its
   own ledger in the setting's folder, so settings never share a budget;
2. public pretraining, shared by every setting with the same data/model/pretrain sections
   (``out/pretrain/<hash>/``);
3. the federation in Flower's simulation (its MLflow run IS the setting's nested run: params,
   per-round epsilon and public validation metrics);
4. quality: ``quality.samples`` volumes conditioned on PUBLIC maps, measured against the
   reference (by default held-out patients of every site, from the same generator, that no site
   trained on: :func:`experiments.cohort.generate_holdout`) with :mod:`models.metrics.quality`
   (feature KID, conditional Dice, utility Dice, MS-SSIM diversity; rf_fid secondary), next to
   the baselines measured the same way: real (half of the reference patients), collapse (each
   site's mean scan), copy (nearest site scans), pretrained-only (samples of the setting's
   pretraining checkpoint); final epsilon per site from the site ledgers. Logged to the
   setting's run, then ``result.json`` marks it finished. The public segmenter and every
   measured set are cached in ``out/metrics_cache`` (baselines are measured once).

A rerun skips finished settings and resumes an interrupted one. At the end the parent run gets
``summary.csv``, ``summary.md`` (one row per setting, then one per baseline) and
``tradeoff.png`` (quality against epsilon, one line per combination of the other axes, the
baselines as horizontal lines).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from configs import (Config, ConfigError, TrackingConfig, config_from_dict, config_to_dict,
                     flatten_config, load_config)
from configs.strict_yaml import YamlFileError, read_yaml
from experiments.preflight import check_output_folder

log = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
RESULT_FILE = "result.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
TRADEOFF_PNG = "tradeoff.png"
QUALITY_METRICS = ("kid", "conditional_dice", "utility_dice", "ms_ssim_diversity", "rf_fid")
TABLE_METRICS = ("kid", "kid_std", "conditional_dice", "utility_dice", "ms_ssim_diversity",
                 "intensity_dice", "sharpness", "rf_fid", "conditional_dice_ratio",
                 "utility_dice_ratio", "diversity_ratio", "intensity_dice_ratio",
                 "sharpness_ratio")
_METRIC_LABELS = {"kid": "feature KID (lower is better)",
                  "conditional_dice": "conditional Dice (higher is better)",
                  "utility_dice": "utility Dice, trained on set (higher)",
                  "ms_ssim_diversity": "MS-SSIM diversity (real = target)",
                  "rf_fid": "rf_fid, secondary (lower is better)"}
BASELINE_STYLES = {"real": ("black", "-"), "collapse": ("tab:red", "--"),
                   "copy": ("tab:green", ":"), "pretrained_only": ("tab:purple", "-.")}
NO_DP = "none"
_TOP_KEYS = {"name", "base", "out", "set", "grid", "settings", "quality", "cohort", "experiment"}
_QUALITY_DEFAULTS = {"samples": 16, "seg_steps": 400, "holdout_patients": 8, "reference": None}
_COHORT_KEYS = {"patients", "public_patients"}
# Latent-UNet width presets of the ``model_size`` axis (channels per level; heads of 8 or 16).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "xs": {"channels": [8, 16, 16], "num_head_channels": 8},
    "s": {"channels": [16, 32, 32], "num_head_channels": 16},
    "m": {"channels": [32, 64, 64], "num_head_channels": 16},
}
_PRETRAIN_DEFINING = ("seed", "data.", "model.", "pretrain.")


class SweepError(ValueError):
    """A sweep file or folder that cannot be run. One line: where, what, the fix."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(dotted)
    node[leaf] = value


def _merge(tree: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Deep-merge ``overrides`` (nested mappings and/or dotted keys) into ``tree``."""
    for key, value in overrides.items():
        if "." in key:
            _set_dotted(tree, key, value)
        elif isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def _is_no_dp(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in (NO_DP, "no_dp", "off"))


def _epsilon(tree: dict[str, Any], value: Any) -> None:
    sites = tree["federation"]["sites"]
    if _is_no_dp(value):
        tree["privacy"]["enabled"] = False
        for site in sites:
            site["allow_non_private"] = True  # the (simulated) sites' own opt-in
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or {NO_DP!r} (got {value!r})")
    tree["privacy"]["enabled"] = True
    tree["privacy"]["target_epsilon"] = float(value)
    for site in sites:
        budget = site.get("budget") or {"delta": tree["privacy"]["delta"]}
        site["budget"] = {**budget, "target_epsilon": float(value)}


def _model_size(tree: dict[str, Any], value: Any) -> None:
    if value not in MODEL_SIZES:
        raise ValueError(f"expected one of {', '.join(MODEL_SIZES)} (got {value!r})")
    preset = MODEL_SIZES[value]
    unet = tree["model"]["unet"]
    levels = len(preset["channels"])
    attention = list(unet.get("attention_levels", []))
    unet.update(channels=list(preset["channels"]), num_head_channels=preset["num_head_channels"],
                attention_levels=attention if len(attention) == levels else
                [False] * (levels - 1) + [True])


def _plain(key: str) -> Callable[[dict[str, Any], Any], None]:
    return lambda tree, value: _set_dotted(tree, key, value)


# Axis name -> how a value changes the experiment config (as a plain dict).
AXES: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "epsilon": _epsilon,
    "max_grad_norm": _plain("privacy.max_grad_norm"),
    "noise_multiplicity": _plain("privacy.noise_multiplicity"),
    "trainable": _plain("privacy.trainable"),
    "pretraining": _plain("pretrain.enabled"),
    "model_size": _model_size,
}


def _value_text(value: Any) -> str:
    if _is_no_dp(value):
        return NO_DP
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace(" ", "")


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: its axis values and its validated experiment config.

    ``definition`` is what the user wrote that makes this setting (the base YAML as parsed, the
    sweep's overrides, the axis values): a finished setting is reused only while it is unchanged.
    It does not include defaults that a newer fedsynth may add.
    """

    values: dict[str, Any]
    config: dict[str, Any]
    definition: dict[str, Any]

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={_value_text(v)}" for k, v in self.values.items()) or "base"

    @property
    def slug(self) -> str:
        text = "_".join(f"{k.replace('.', '-')}-{_value_text(v)}" for k, v in self.values.items())
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
        return safe or "base"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.definition, sort_keys=True,
                                         default=str).encode()).hexdigest()


@dataclass(frozen=True)
class SweepPlan:
    name: str
    file: Path
    base: Path
    base_config: Config
    out: Path
    axes: list[str]
    settings: list[Setting]
    quality: dict[str, Any]
    cohort: dict[str, int] | None
    experiment: str

    def setting_dir(self, setting: Setting) -> Path:
        return self.out / "settings" / setting.slug


@dataclass
class SettingResult:
    setting: str
    values: dict[str, Any]
    epsilon: dict[str, float]
    quality: dict[str, float | None]
    run_id: str | None
    seconds: float
    baselines: dict[str, dict[str, float | None] | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "values": self.values,
                "epsilon": {k: (v if math.isfinite(v) else "inf") for k, v in self.epsilon.items()},
                "quality": self.quality, "baselines": self.baselines, "run_id": self.run_id,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SettingResult":
        return cls(data["setting"], dict(data["values"]),
                   {k: float(v) for k, v in data["epsilon"].items()}, dict(data["quality"]),
                   data.get("run_id"), float(data.get("seconds", 0.0)),
                   dict(data.get("baselines") or {}))


@dataclass
class SweepSummary:
    plan: SweepPlan
    results: list[SettingResult] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


# --- reading the sweep file ----------------------------------------------------------------------
def _where(file: Path, key: str) -> str:
    return f"{file}: {key}"


def _read_mapping(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise SweepError(f"{file}: sweep file not found; pass a YAML file such as "
                         f"experiments/sweeps/privacy_quality.yaml")
    try:
        data = read_yaml(file, "sweep file", numbers_like_yaml12=True)
    except YamlFileError as err:
        raise SweepError(str(err)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{file}: expected a mapping with base and grid or settings; see "
                         f"experiments/sweeps/privacy_quality.yaml")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SweepError(f"{_where(file, unknown[0])}: unknown key; use "
                         f"{', '.join(sorted(_TOP_KEYS))}")
    return data


def _points(file: Path, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    grid = data.get("grid") or {}
    listed = data.get("settings") or []
    if not isinstance(grid, dict):
        raise SweepError(f"{_where(file, 'grid')}: expected a mapping of axis -> list of values")
    if not isinstance(listed, list) or not all(isinstance(s, dict) for s in listed):
        raise SweepError(f"{_where(file, 'settings')}: expected a list of mappings axis -> value")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{_where(file, f'grid.{axis}')}: expected a non-empty list of values "
                             f"(got {values!r})")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    points += [dict(s) for s in listed]
    if not points:
        raise SweepError(f"{file}: no settings; give a grid (axis: [values]) or a settings list")
    for point in points:
        for axis in point:
            if axis not in AXES and "." not in axis:
                raise SweepError(f"{_where(file, axis)}: unknown axis; use one of "
                                 f"{', '.join(AXES)} or a dotted config key "
                                 f"(privacy.learning_rate)")
    return points


def _derive(base: dict[str, Any], overrides: Mapping[str, Any], values: Mapping[str, Any],
            file: Path, base_dir: Path) -> dict[str, Any]:
    """The experiment config of one setting, as a plain dict validated by the config loader."""
    tree = json.loads(json.dumps(base))
    try:
        _merge(tree, overrides)
    except KeyError as err:
        raise SweepError(f"{_where(file, f'set.{err.args[0]}')}: not a config section; check "
                         f"the key against configs/default.yaml") from None
    for axis, value in values.items():
        try:
            (AXES[axis] if axis in AXES else _plain(axis))(tree, value)
        except (ValueError, KeyError) as err:
            raise SweepError(f"{_where(file, axis)}: {err}") from None
    try:
        config_from_dict(tree, base_dir, check_paths=False)
    except ConfigError as err:
        name = ", ".join(f"{k}={_value_text(v)}" for k, v in values.items())
        raise SweepError(f"{file}: setting {name or 'base'}: {err}") from None
    return tree


def load_sweep(file: Path, out: Path | None = None) -> SweepPlan:
    """Read and validate the sweep file and every setting's config, before anything runs."""
    file = Path(file).absolute()
    data = _read_mapping(file)
    if "base" not in data:
        raise SweepError(f"{_where(file, 'base')}: missing; name the experiment config every "
                         f"setting starts from (e.g. ../../configs/demo.yaml)")
    base_path = (file.parent / str(data["base"])).resolve()
    try:
        base_config = load_config(base_path, check_paths=False)
    except ConfigError as err:
        raise SweepError(f"{_where(file, 'base')}: {err}") from None
    if not base_config.federation.sites:
        raise SweepError(f"{_where(file, 'base')}: {base_path} lists no federation.sites; a "
                         f"sweep runs the federation in simulation and needs them")
    name = str(data.get("name") or file.stem)
    if out is None:
        out = file.parent / str(data["out"]) if data.get("out") else Path("runs") / "sweeps" / name
    out = Path(out).resolve()
    overrides = data.get("set") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{_where(file, 'set')}: expected a mapping of config overrides")
    quality = dict(_QUALITY_DEFAULTS)
    given = data.get("quality") or {}
    if not isinstance(given, dict):
        raise SweepError(f"{_where(file, 'quality')}: expected a mapping with "
                         f"{', '.join(_QUALITY_DEFAULTS)}")
    unknown = sorted(set(given) - set(_QUALITY_DEFAULTS))
    if unknown:
        raise SweepError(f"{_where(file, 'quality.' + unknown[0])}: unknown; use "
                         f"{', '.join(_QUALITY_DEFAULTS)}")
    quality.update(given)
    for key in ("samples", "seg_steps", "holdout_patients"):
        if isinstance(quality[key], bool) or not isinstance(quality[key], int) or quality[key] < 1:
            raise SweepError(f"{_where(file, f'quality.{key}')}: must be a whole number >= 1 "
                             f"(got {quality[key]!r})")
    if quality["samples"] < 2:
        raise SweepError(f"{_where(file, 'quality.samples')}: the metrics need at least 2 "
                         f"volumes (got {quality['samples']})")
    if quality["reference"] is not None:
        quality["reference"] = str((file.parent / str(quality["reference"])).resolve())
    cohort = data.get("cohort")
    if cohort is not None and (not isinstance(cohort, dict) or set(cohort) - _COHORT_KEYS):
        raise SweepError(f"{_where(file, 'cohort')}: expected {{patients: N, public_patients: N}}")

    base_tree = config_to_dict(base_config)
    base_yaml = read_yaml(base_path, "config file", numbers_like_yaml12=True)
    settings = []
    for values in _points(file, data):
        tree = _derive(base_tree, overrides, values, file, base_path.parent)
        settings.append(Setting(values, tree, {"base": base_yaml, "set": overrides,
                                               "values": values}))
    slugs = [s.slug for s in settings]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise SweepError(f"{file}: setting {repeated[0]} appears twice; list each setting once")
    axes = list(dict.fromkeys(axis for s in settings for axis in s.values))
    experiment = str(data.get("experiment") or f"fedsynth-sweep-{name}")
    return SweepPlan(name, file, base_path, base_config, out, axes, settings, quality, cohort,
                     experiment)


# --- running ----------------------------------------------------------------------------------
def _setting_config(plan: SweepPlan, setting: Setting, tracking_uri: str) -> Config:
    """Write the setting's config.yaml (own run folder, own ledgers, the sweep's MLflow store)."""
    folder = plan.setting_dir(setting)
    tree = json.loads(json.dumps(setting.config))
    tree["run_dir"] = str(folder)
    for site in tree["federation"]["sites"]:
        site["ledger"] = str(folder / "ledgers" / f"{site['site_id']}.jsonl")
    tree["tracking"] = {"uri": tracking_uri, "experiment": plan.experiment}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_config(path)


def _pretrain_key(config: Config) -> str:
    defining = {k: v for k, v in flatten_config(config).items() if k.startswith(_PRETRAIN_DEFINING)}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]


def _ensure_cohort(plan: SweepPlan, echo: Callable[[str], None]) -> Path:
    """The demo cohort the base config points at: generated when missing and ``cohort`` is set."""
    from experiments.demo import demo_cohort_dir, generate_demo_cohort

    root = demo_cohort_dir(plan.base_config)
    if (root / "cohort.json").exists():
        return root
    if plan.cohort is None:
        raise SweepError(f"{plan.file}: {root} holds no demo cohort; run `fedsynth demo` (or "
                         f"`fedsynth cohort`) first, or add cohort: {{patients: 40}} to the sweep")
    patients = int(plan.cohort.get("patients", 40))
    echo(f"demo cohort -> {root}")
    generate_demo_cohort(plan.base_config, patients=patients,
                         public_patients=int(plan.cohort.get("public_patients", patients)))
    return root


def _reference(plan: SweepPlan, echo: Callable[[str], None]) -> Path:
    if plan.quality["reference"] is not None:
        reference = Path(plan.quality["reference"])
        if not reference.is_dir():
            raise SweepError(f"{plan.file}: quality.reference: {reference} is not a folder; pass a "
                             f"site-format folder of real scans")
        return reference
    from experiments.cohort import generate_holdout

    root = _ensure_cohort(plan, echo)
    echo(f"reference: {plan.quality['holdout_patients']} held-out patients per site -> "
         f"{plan.out / 'reference'}")
    return generate_holdout(root, plan.out / "reference", plan.quality["holdout_patients"])


def _site_epsilons(config: Config) -> dict[str, float]:
    from privacy.report import build_report

    return {site.site_id: float(build_report(site.ledger_path).spent)
            for site in config.federation.sites if site.ledger_path.exists()}


class _Parent:
    """The sweep's parent MLflow run, created once and found again on a rerun."""

    def __init__(self, plan: SweepPlan):
        from server.tracking import TrackedRun, open_tracking, resolve_tracking_uri

        uri = resolve_tracking_uri(plan.base_config.tracking, plan.out)
        plan.out.mkdir(parents=True, exist_ok=True)
        state_path = plan.out / SWEEP_STATE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state and state.get("name") != plan.name:
            raise SweepError(f"{plan.out}: holds sweep {state.get('name')!r}, not {plan.name!r}; "
                             f"choose another output folder")
        client, experiment_id = open_tracking(TrackingConfig(uri, plan.experiment), plan.out)
        self.run = None
        if state.get("parent_run_id") and state.get("tracking_uri") == uri:
            try:
                self.run = TrackedRun.resume(client, state["parent_run_id"])
            except Exception:  # noqa: BLE001 - a store that lost the run gets a new one
                log.warning("MLflow run %s not found; the sweep gets a new parent run",
                            state["parent_run_id"])
        if self.run is None:
            self.run = TrackedRun.start(client, experiment_id, run_name=plan.name,
                                        tags={"stage": "sweep", "fedsynth.sweep": plan.name})
        state.update(name=plan.name, parent_run_id=self.run.run_id, tracking_uri=uri,
                     experiment=plan.experiment, file=str(plan.file))
        state_path.write_text(json.dumps(state, indent=1) + "\n")
        # Tags, not params: a rerun may add settings or change the quality settings.
        self.run.set_tags({"sweep.base": str(plan.base), "sweep.axes": ",".join(plan.axes),
                           "sweep.settings": str(len(plan.settings)),
                           **{f"sweep.quality.{k}": str(v) for k, v in plan.quality.items()}})
        self.run.log_artifact(plan.file, "sweep")
        self.uri = uri

    def child_tags(self, plan: SweepPlan, role: str, run_name: str) -> dict[str, str]:
        """Tags that nest a new run under this one (``mlflow.runName`` names it)."""
        return {"mlflow.parentRunId": self.run.run_id, "fedsynth.sweep": plan.name,
                "fedsynth.sweep.role": role, "mlflow.runName": run_name}


def _pretrained(plan: SweepPlan, config: Config, parent: _Parent,
                echo: Callable[[str], None]) -> Path:
    """The pretraining checkpoint of ``config``, shared by settings with the same definition."""
    from experiments.pretrain import CHECKPOINT_FILE, STATE_FILE, pretrain

    key = _pretrain_key(config)
    folder = plan.out / "pretrain" / key
    checkpoint = folder / CHECKPOINT_FILE
    if checkpoint.exists():
        echo(f"      pretraining {key}: reused")
        return checkpoint
    unet = "yes" if config.pretrain.enabled else "no (random init)"
    echo(f"      pretraining {key} (autoencoder; latent UNet: {unet})")
    pretrain(config, folder, resume=(folder / STATE_FILE).exists(),
             run_tags=parent.child_tags(plan, "pretrain", f"pretrain {key}"))
    return checkpoint


def _federated(plan: SweepPlan, setting: Setting, config: Config, checkpoint: Path,
               parent: _Parent, echo: Callable[[str], None]) -> tuple[Path, str | None]:
    """The setting's final global checkpoint and the MLflow run of its federation."""
    from experiments.federate import simulate
    from server.federation import FINAL_CHECKPOINT, federation_dir, load_state
    from server.round_checkpoint import STATE_FILE

    folder = plan.setting_dir(setting)
    fed_dir = federation_dir(folder)
    if (fed_dir / FINAL_CHECKPOINT).exists():
        echo("      federation: reused")
    else:
        caps = ", ".join(f"{s.site_id} {config.site_budget(s).target_epsilon:g}"
                         for s in config.federation.sites)
        echo(f"      federation: {config.federation.rounds} rounds, "
             f"{len(config.federation.sites)} sites, "
             + (f"epsilon caps {caps}" if config.privacy.enabled else "no DP"))
        simulate(folder / "config.yaml", folder, checkpoint=checkpoint,
                 resume=(fed_dir / STATE_FILE).exists(),
                 run_tags={**parent.child_tags(plan, "setting", setting.name),
                           "fedsynth.sweep.setting": setting.name})
    state = load_state(fed_dir)
    return fed_dir / FINAL_CHECKPOINT, state.mlflow_run_id if state else None


def _sampled(checkpoint: Path, config: Config, count: int, out: Path) -> Path:
    """``count`` samples of ``checkpoint`` on the public maps in ``out`` (reused when there)."""
    from experiments.sampling import sample_folder

    if not (out / "manifest.csv").exists():
        sample_folder(checkpoint, config.data.public_dir, count, out, seed=config.seed,
                      device=config.device, precision=config.precision, memory=config.memory)
    return out


def _measured(plan: SweepPlan, setting: Setting, config: Config, final: Path, pretrained: Path,
              reference: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """Quality of samples on public maps and of the baselines against the reference;
    ``quality.json`` in the folder. Returns its JSON content."""
    from experiments.evaluate import evaluate_folders, write_json_atomic

    folder = plan.setting_dir(setting)
    count = plan.quality["samples"]
    echo(f"      sampling {count} volumes on public maps (and the pretrained-only baseline)")
    samples = _sampled(final, config, count, folder / "samples")
    baseline = _sampled(pretrained, config, count, pretrained.parent / f"samples_{count}")
    echo(f"      quality against {reference}")
    evaluation = evaluate_folders(
        reference, samples, config.data, public_dir=Path(config.data.public_dir),
        train_dirs=tuple(Path(s.data_dir) for s in config.federation.sites),
        pretrained_dir=baseline, seg_steps=plan.quality["seg_steps"], seed=config.seed,
        cache_dir=plan.out / "metrics_cache", device=config.device, precision=config.precision)
    content = evaluation.to_json_dict()
    write_json_atomic(folder / "quality.json", content)
    return content


def _log_result(uri: str, result: SettingResult, config: Config, folder: Path) -> None:
    """Sweep values, final epsilon per site and quality on the setting's (federation) run."""
    from mlflow import MlflowClient
    from server.tracking import TrackedRun

    run = TrackedRun(MlflowClient(uri), result.run_id)
    run.log_params({f"sweep.{k}": v for k, v in result.values.items()})
    baselines = {f"baseline/{name}/{k}": v for name, values in result.baselines.items()
                 for k, v in (values or {}).items() if v is not None}
    run.log_metrics({**{f"final/epsilon/{k}": v for k, v in result.epsilon.items()},
                     **{f"quality/{k}": v for k, v in result.quality.items() if v is not None},
                     **baselines},
                    step=config.federation.rounds)   # infinite (no DP) epsilons are not logged
    run.log_artifact(folder / "quality.json", "quality")
    run.log_artifact(folder / "samples" / "preview.png", "quality")
    run.set_tags({"fedsynth.sweep.status": "finished",
                  "fedsynth.sweep.dp": "yes" if config.privacy.enabled else "no"})


def _run_setting(plan: SweepPlan, setting: Setting, parent: _Parent, reference: Path,
                 echo: Callable[[str], None]) -> SettingResult:
    from experiments.evaluate import write_json_atomic

    started = time.perf_counter()
    config = _setting_config(plan, setting, parent.uri)
    checkpoint = _pretrained(plan, config, parent, echo)
    final, run_id = _federated(plan, setting, config, checkpoint, parent, echo)
    quality = _measured(plan, setting, config, final, checkpoint, reference, echo)
    result = SettingResult(setting.name, {k: _value_text(v) for k, v in setting.values.items()},
                           _site_epsilons(config), quality["metrics"], run_id,
                           time.perf_counter() - started, quality["baselines"])
    if run_id:
        _log_result(parent.uri, result, config, plan.setting_dir(setting))
    write_json_atomic(plan.setting_dir(setting) / RESULT_FILE,
                      {"definition_sha256": setting.sha256, **result.to_json()})
    return result


def _finished(plan: SweepPlan, setting: Setting) -> SettingResult | None:
    path = plan.setting_dir(setting) / RESULT_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("definition_sha256") != setting.sha256:
        raise SweepError(f"{path}: setting {setting.name} was run with another config (the base "
                         f"config or the sweep file changed); use another output folder (--out) or "
                         f"delete {plan.setting_dir(setting)}")
    return SettingResult.from_json(data)


def run_sweep(file: Path, *, out: Path | None = None,
              echo: Callable[[str], None] = print) -> SweepSummary:
    """Run (or continue) every setting of the sweep file; see the module docstring."""
    plan = load_sweep(file, out)
    check_output_folder(plan.out, option="--out", own=(SWEEP_STATE,),
                        inputs=(plan.file, plan.base))
    finished = {s.slug: _finished(plan, s) for s in plan.settings}  # refuses changed settings now
    parent = _Parent(plan)
    summary = SweepSummary(plan, parent_run_id=parent.run.run_id, tracking_uri=parent.uri)
    echo(f"sweep {plan.name}: {len(plan.settings)} settings over {', '.join(plan.axes)} "
         f"-> {plan.out}")
    reference = None
    for number, setting in enumerate(plan.settings, 1):
        header = f"[{number}/{len(plan.settings)}] {setting.name}"
        done = finished[setting.slug]
        if done is not None:
            echo(f"{header}: finished before, skipped")
            summary.results.append(done)
            continue
        echo(f"{header} ...")
        if reference is None:
            reference = _reference(plan, echo)
        result = _run_setting(plan, setting, parent, reference, echo)
        echo(f"{header}: {result.seconds:.0f} s")
        summary.results.append(result)
    summary.paths = write_outputs(summary)
    for path in summary.paths.values():
        parent.run.log_artifact(path)
    parent.run.finish()
    return summary


# --- outputs ----------------------------------------------------------------------------------
def _epsilon_text(value: float) -> str:
    return "inf (no DP)" if not math.isfinite(value) else f"{value:.4g}"


def baseline_results(summary: SweepSummary) -> list[tuple[str, dict[str, float | None]]]:
    """Each distinct baseline measurement once, named ``baseline: <name>`` (with the first
    setting that got it when a baseline differs between settings: pretrained-only samples come
    from each setting's own pretraining)."""
    found: dict[str, list[tuple[str, dict[str, float | None]]]] = {}
    for result in summary.results:
        for name, values in result.baselines.items():
            if values is not None and all(values != v for _, v in found.get(name, [])):
                found.setdefault(name, []).append((result.setting, values))
    rows = []
    for name, variants in found.items():
        for setting, values in variants:
            label = f"baseline: {name}" + (f" ({setting})" if len(variants) > 1 else "")
            rows.append((label, values))
    return rows


def summary_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    """One row per setting, then one per baseline (measured the same way, same reference)."""
    sites = sorted({site for r in summary.results for site in r.epsilon})

    def metrics(values: Mapping[str, Any]) -> dict[str, str]:
        return {name: "" if values.get(name) is None else f"{values[name]:.4g}"
                for name in TABLE_METRICS}

    rows = []
    for result in summary.results:
        row: dict[str, Any] = {"setting": result.setting}
        row.update({axis: result.values.get(axis, "") for axis in summary.plan.axes})
        row.update({f"epsilon_{site}": _epsilon_text(result.epsilon[site])
                    if site in result.epsilon else "" for site in sites})
        row.update(metrics(result.quality))
        row["seconds"] = f"{result.seconds:.0f}"
        row["mlflow_run_id"] = result.run_id or ""
        rows.append(row)
    empty = {key: "" for key in (rows[0] if rows else {})}
    for label, values in baseline_results(summary):
        rows.append({**empty, "setting": label, **metrics(values)})
    return rows


def render_markdown(summary: SweepSummary) -> str:
    rows = summary_rows(summary)
    columns = [c for c in rows[0] if c not in ("mlflow_run_id", "seconds")] if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _x_position(value: str, finite: list[float]) -> float:
    return float(len(finite)) if value == NO_DP else float(finite.index(float(value)))


def plot_tradeoff(summary: SweepSummary) -> bytes:
    """PNG: each quality metric against epsilon, one line per combination of the other axes,
    every baseline as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary.results
    use_axis = "epsilon" in summary.plan.axes
    others = [a for a in summary.plan.axes if a != "epsilon"]

    def epsilon_of(result: SettingResult) -> str:
        if use_axis:
            return str(result.values.get("epsilon", NO_DP))
        finite = [v for v in result.epsilon.values() if math.isfinite(v)]
        return f"{max(finite):.3g}" if finite and len(finite) == len(result.epsilon) else NO_DP

    finite = sorted({float(epsilon_of(r)) for r in results if epsilon_of(r) != NO_DP})
    has_no_dp = any(epsilon_of(r) == NO_DP for r in results)
    groups: dict[str, list[SettingResult]] = {}
    for result in results:
        label = ", ".join(f"{a}={result.values.get(a, '')}" for a in others) or "all settings"
        groups.setdefault(label, []).append(result)
    figure, axes = plt.subplots(1, len(QUALITY_METRICS), figsize=(4.2 * len(QUALITY_METRICS), 4.2))
    ticks = [f"{v:g}" for v in finite] + (["no DP"] if has_no_dp else [])
    for axis, metric in zip(axes, QUALITY_METRICS):
        for label, members in groups.items():
            points = sorted((_x_position(epsilon_of(r), finite), r.quality.get(metric))
                            for r in members if r.quality.get(metric) is not None)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for label, values in baseline_results(summary):
            name = label.split(": ", 1)[1].split(" (")[0]
            if values.get(metric) is not None:
                color, style = BASELINE_STYLES.get(name, ("grey", "-"))
                axis.axhline(values[metric], color=color, linestyle=style, linewidth=1,
                             label=label)
        axis.set_xticks(range(len(ticks)), ticks)
        axis.set_xlabel("epsilon per site" + ("" if use_axis else " (spent, max over sites)"))
        axis.set_title(_METRIC_LABELS[metric], fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"sweep {summary.plan.name}: quality against privacy")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_outputs(summary: SweepSummary) -> dict[str, Path]:
    """``summary.csv``, ``summary.md`` and ``tradeoff.png`` in the sweep folder."""
    out = summary.plan.out
    rows = summary_rows(summary)
    csv_path, md_path, png_path = out / SUMMARY_CSV, out / SUMMARY_MD, out / TRADEOFF_PNG
    with csv_path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(render_markdown(summary))
    png_path.write_bytes(plot_tradeoff(summary))
    return {"summary (CSV)": csv_path, "summary (Markdown)": md_path, "trade-off plot": png_path}


def format_summary(summary: SweepSummary) -> str:
    lines = ["", f"fedsynth sweep {summary.plan.name}: done", "", render_markdown(summary)]
    for name, path in summary.paths.items():
        lines.append(f"{name:<20}{path}")
    lines.append(f"{'settings':<20}{summary.plan.out / 'settings'}")
    lines.append(f"{'MLflow parent run':<20}{summary.parent_run_id}")
    lines.append(f"MLflow UI           mlflow ui --backend-store-uri {summary.tracking_uri}")
    return "\n".join(lines)
