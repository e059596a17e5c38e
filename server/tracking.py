"""MLflow tracking through the client API (``MlflowClient``), without MLflow's global run state.

Where runs go, first match wins (as configs/default.yaml documents):
1. the ``MLFLOW_TRACKING_URI`` environment variable;
2. ``tracking.uri`` in the config;
3. a local SQLite store in the run folder, ``sqlite:///<run_dir>/mlflow.db`` (MLflow 3 refuses the
   old file store by default), with artifacts under ``<run_dir>/mlartifacts``.

Read it back with ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

log = logging.getLogger(__name__)

# MLflow's per-request limits for log_batch.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000


def default_tracking_uri(run_dir: Path) -> str:
    """The local store inside a run folder."""
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(tracking_cfg: Any, run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the run folder's SQLite store."""
    configured = getattr(tracking_cfg, "uri", None)
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri(run_dir)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def open_tracking(tracking_cfg: Any, run_dir: Path) -> tuple[MlflowClient, str]:
    """A client on the resolved store and the id of ``tracking.experiment`` (created if new)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not log.isEnabledFor(logging.DEBUG):
        # MLflow installs its own INFO handler; its database-creation notices are CLI noise.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking_cfg, run_dir)
    client = MlflowClient(tracking_uri=uri)
    name = getattr(tracking_cfg, "experiment", None) or "fedsynth"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    # A local store would otherwise put artifacts in ./mlruns of whatever folder we run from.
    location = (run_dir / "mlartifacts").resolve().as_uri() if _is_local(uri) else None
    experiment_id = client.create_experiment(name, artifact_location=location)
    log.debug("MLflow experiment %r created in %s", name, uri)
    return client, experiment_id


class TrackedRun:
    """One MLflow run, logged through the client (params, metrics per step, artifacts)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, client: MlflowClient, experiment_id: str, run_name: str,
              tags: Mapping[str, str] | None = None) -> "TrackedRun":
        tags = dict(tags or {})
        run = client.create_run(experiment_id, run_name=tags.pop("mlflow.runName", run_name),
                                tags=tags)
        return cls(client, run.info.run_id)

    @classmethod
    def resume(cls, client: MlflowClient, run_id: str) -> "TrackedRun":
        """Continue an existing run (e.g. after ``--resume``), marking it running again."""
        client.get_run(run_id)  # raises if the store does not know it
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return cls(client, run_id)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params as strings; keys the run already has are skipped (MLflow params are immutable)."""
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(str(k), str(v)[:_MAX_PARAM_VALUE]) for k, v in params.items()
                 if str(k) not in existing]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite values only (MLflow stores NaN, but plots and comparisons choke on it)."""
        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class TrackingError(ValueError):
    """The configured MLflow store cannot be opened."""


class StageRun:
    """The optional MLflow run of one stage (pretraining, a federation).

    Started, or continued when ``run_id`` names a run the store still has; the flattened config
    is logged as params; ``tags`` are set on a new run (e.g. ``mlflow.parentRunId`` to nest it
    under a sweep). With ``enabled=False`` every call is a no-op. As a context manager it
    marks the run FAILED (or KILLED on Ctrl-C) when the stage raises.
    """

    def __init__(self, tracking_cfg: Any, run_dir: Path, params: Mapping[str, Any], *,
                 stage: str, enabled: bool = True, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None):
        self.run: TrackedRun | None = None
        if not enabled:
            return
        try:
            client, experiment_id = open_tracking(tracking_cfg, run_dir)
        except Exception as err:  # noqa: BLE001 - any store problem is a bad tracking setting
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TrackingError(f"tracking.uri: cannot open the MLflow store ({first}); fix "
                                f"tracking.uri or MLFLOW_TRACKING_URI, or unset both for a "
                                f"local store") from None
        if run_id is not None:
            try:
                self.run = TrackedRun.resume(client, run_id)
            except Exception:  # noqa: BLE001 - a store that lost the run gets a new one
                log.warning("MLflow run %s not found; logging the %s to a new run", run_id, stage)
        if self.run is None:
            self.run = TrackedRun.start(client, experiment_id, run_name=stage,
                                        tags={"stage": stage, **dict(tags or {})})
        self.run.log_params(params)

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    @property
    def uri(self) -> str | None:
        return self.run.tracking_uri if self.run else None

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if self.run:
            self.run.log_metrics(values, step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.run and Path(path).exists():
            self.run.log_artifact(Path(path), folder)

    def tags(self, values: Mapping[str, str]) -> None:
        if self.run:
            self.run.set_tags(values)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run:
            self.run.finish(status)

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            self.finish("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
        return False
