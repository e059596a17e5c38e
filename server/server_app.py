"""The consortium's one Flower ServerApp: load the experiment YAML, then run the mode it is asked for.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden with ``flwr run --run-config``):

- ``mode``: ``federate`` (the default: the round loop, :mod:`server.federation`) or ``release``
  (sample, gate at every site over the same Grid, write: :mod:`server.release`);
- ``config-path``: the experiment YAML;
- ``run-dir``: the run folder (``""``: the config's ``run_dir``, else ``runs/<config name>``);
- ``checkpoint``: ``federate``: the pretrained starting checkpoint (``""``:
  ``<run-dir>/checkpoint.pt``); ``release``: the model to release from (``""``: the federation's
  final ``<run-dir>/federation/checkpoint.pt``);
- ``resume``: continue the federation saved in the run folder (a release always resumes the
  release found in ``release-out``);
- ``tracking``: log to MLflow;
- ``release-num``: samples to release (``0``: ``release.num_samples`` of the config);
- ``release-out``: the release folder (``""``: ``<run-dir>/release``);
- ``release-batch-size``: volumes per sampling pass.

A relative path is resolved against the app folder (the folder holding this package: the
repository, or the FAB Flower installed), never against the SuperLink's working folder.

In simulation, ``fedsynth federate`` / ``fedsynth release`` build the app with
:func:`make_server_app` / :func:`server.release.make_release_app` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from configs import load_config
from models.logs import show_in_flower_log
from server.federation import FederationError, FederationResult, FederationSettings, run_federation

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
"""The app folder: the repository in a checkout, the installed FAB in a deployment."""

MODES = ("federate", "release")


class RunConfigError(ValueError):
    """A run-config value that cannot be used. One line naming the key and the fix."""


def default_run_dir(config_path: Path, configured: Path | None) -> Path:
    """The config's ``run_dir``, else ``runs/<config name>`` (as every fedsynth command)."""
    return Path(configured) if configured else Path("runs") / Path(config_path).stem


def app_path(value: Any) -> Path:
    """A run-config path: absolute as given, relative against :data:`APP_DIR`."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else APP_DIR / path


def _text(run_config: Mapping[str, Any], key: str) -> str:
    return str(run_config.get(key, "") or "")


def _config_and_run_dir(run_config: Mapping[str, Any]):
    config_path = _text(run_config, "config-path")
    if not config_path:
        raise RunConfigError("run config 'config-path' is empty; pass --run-config "
                             "'config-path=\"/abs/path/experiment.yaml\"' to flwr run")
    path = app_path(config_path)
    if not path.is_file():
        raise RunConfigError(f"run config 'config-path': {path} does not exist; pass the experiment "
                             f"YAML (absolute, or relative to the app folder {APP_DIR})")
    config = load_config(path, check_paths=False)   # the sites' folders are theirs, not here
    run_dir = app_path(_text(run_config, "run-dir")) if _text(run_config, "run-dir") else \
        app_path(default_run_dir(path, config.run_dir))
    return path, config, run_dir


def settings_from_run_config(run_config: Mapping[str, Any]) -> FederationSettings:
    """:class:`FederationSettings` from a Flower run config (see the module docstring)."""
    config_path, config, run_dir = _config_and_run_dir(run_config)
    checkpoint = app_path(_text(run_config, "checkpoint")) if _text(run_config, "checkpoint") else \
        run_dir / "checkpoint.pt"
    if not Path(checkpoint).exists() and not (run_dir / "federation" / "state.json").exists():
        raise RunConfigError(f"run config 'checkpoint': {checkpoint} does not exist; make it with "
                             f"`fedsynth pretrain --config {config_path}` or pass "
                             f"'checkpoint=\"/abs/path/checkpoint.pt\"'")
    return FederationSettings(config=config, run_dir=run_dir, checkpoint=Path(checkpoint),
                              resume=bool(run_config.get("resume", False)),
                              tracking=bool(run_config.get("tracking", True)),
                              config_file=config_path)


def release_plan_from_run_config(run_config: Mapping[str, Any]):
    """A validated :class:`server.release.ReleasePlan` from a Flower run config (``mode=release``).

    The public maps are read here, on the server, from ``data.public_dir`` (public data); nothing
    of a site is read from this disk.
    """
    from models.checkpoint import CheckpointError, load_checkpoint
    from server.federation import FINAL_CHECKPOINT, federation_dir
    from server.release import ReleaseError, load_public_maps, prepare_release

    _, config, run_dir = _config_and_run_dir(run_config)
    if not config.federation.sites:
        raise RunConfigError("run config 'config-path': federation.sites is empty; every site must "
                             "gate the release, list one entry per site")
    checkpoint_path = app_path(_text(run_config, "checkpoint")) if _text(run_config, "checkpoint") \
        else federation_dir(run_dir) / FINAL_CHECKPOINT
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as err:
        raise RunConfigError(_run_config_names(f"run config 'checkpoint': {err}")) from None
    num = int(run_config.get("release-num", 0) or 0) or config.release.num_samples
    out = app_path(_text(run_config, "release-out")) if _text(run_config, "release-out") else \
        run_dir / "release"
    batch_size = int(run_config.get("release-batch-size", 4) or 4)
    try:
        return prepare_release(config, checkpoint, load_public_maps(config, checkpoint.data), num,
                               out, checkpoint_path=checkpoint_path, run_dir=run_dir,
                               batch_size=batch_size)
    except ReleaseError as err:
        raise RunConfigError(_run_config_names(str(err))) from None


_FLAGS = {"release": (("--num", "'release-num'"), ("--out", "'release-out'"),
                      ("--batch-size", "'release-batch-size'"), ("--checkpoint", "'checkpoint'")),
          "federate": (("--resume", "'resume=true'"), ("--out", "'run-dir'"),
                       ("--checkpoint", "'checkpoint'"))}


def _run_config_names(message: str, mode: str = "release") -> str:
    """An error in run-config terms: the CLI's flags are not what a deployment passes."""
    for flag, key in _FLAGS[mode]:
        message = message.replace(flag, f"run config {key}")
    return message


class _NoTraceback(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; a fedsynth error already said what
    is wrong in one line, so its record loses the traceback (the run still ends as failed)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            record.exc_info, record.exc_text = None, None
        return True


def run_mode(grid: Grid, run_config: Mapping[str, Any]) -> Any:
    """Run the mode the run config names (see the module docstring); its result."""
    mode = _text(run_config, "mode") or "federate"
    if mode not in MODES:
        raise RunConfigError(f"run config 'mode': {mode!r} is not one of {', '.join(MODES)}; pass "
                             f"--run-config 'mode=\"federate\"' or 'mode=\"release\"'")
    if mode == "release":
        from server.release import run_release
        return run_release(grid, release_plan_from_run_config(run_config))
    return run_federation(grid, settings_from_run_config(run_config))


def make_server_app(settings: FederationSettings | None = None,
                    on_result: Callable[[FederationResult], None] | None = None) -> ServerApp:
    """A ServerApp running :func:`server.federation.run_federation` with ``settings``.

    ``settings`` None: the mode and its settings come from the run config at run time (deployment).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if settings is not None:
            result = run_federation(grid, settings)
        else:
            from server.federation import FederationHalted
            from server.release import ReleaseError, ReleaseHalted
            run_config = dict(context.run_config)
            show_in_flower_log()
            try:
                result = run_mode(grid, run_config)
            except (RunConfigError, FederationError, FederationHalted, ReleaseError,
                    ReleaseHalted) as err:
                # One line in run-config terms; re-raised so that the run ends as failed.
                mode = "release" if _text(run_config, "mode") == "release" else "federate"
                message = _run_config_names(str(err), mode)
                flwr_log(logging.ERROR, "fedsynth: %s", message)
                error = type(err)(message)
                logging.getLogger("flwr").addFilter(_NoTraceback(error))
                raise error from None
        if on_result is not None:
            on_result(result)

    return server_app


app = make_server_app()
