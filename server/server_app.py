"""The consortium's Flower ServerApp: load the experiment YAML, then run the round loop.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden with ``flwr run --run-config``):

- ``config-path``: the experiment YAML (absolute, or relative to the working directory);
- ``run-dir``: the run folder (``""``: the config's ``run_dir``, else ``runs/<config name>``);
- ``checkpoint``: the pretrained starting checkpoint (``""``: ``<run-dir>/checkpoint.pt``);
- ``resume``: continue the federation saved in the run folder;
- ``tracking``: log to MLflow.

In simulation, ``fedsynth federate`` builds the app with :func:`make_server_app` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from configs import load_config
from server.federation import FederationError, FederationResult, FederationSettings, run_federation


def default_run_dir(config_path: Path, configured: Path | None) -> Path:
    """The config's ``run_dir``, else ``runs/<config name>`` (as every fedsynth command)."""
    return Path(configured) if configured else Path("runs") / Path(config_path).stem


def settings_from_run_config(run_config: Mapping[str, Any]) -> FederationSettings:
    """:class:`FederationSettings` from a Flower run config (see the module docstring)."""
    config_path = str(run_config.get("config-path", "") or "")
    if not config_path:
        raise FederationError("run config 'config-path' is empty; pass "
                              "--run-config 'config-path=\"/abs/path/experiment.yaml\"' to flwr run")
    config = load_config(config_path)
    run_dir = Path(str(run_config.get("run-dir", "") or "")) if run_config.get("run-dir") else \
        default_run_dir(Path(config_path), config.run_dir)
    checkpoint = Path(str(run_config["checkpoint"])) if run_config.get("checkpoint") else \
        run_dir / "checkpoint.pt"
    return FederationSettings(config=config, run_dir=run_dir, checkpoint=checkpoint,
                              resume=bool(run_config.get("resume", False)),
                              tracking=bool(run_config.get("tracking", True)),
                              config_file=Path(config_path))


def make_server_app(settings: FederationSettings | None = None,
                    on_result: Callable[[FederationResult], None] | None = None) -> ServerApp:
    """A ServerApp running :func:`server.federation.run_federation`.

    ``settings`` None: read them from the run config at run time (deployment).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, settings or settings_from_run_config(dict(context.run_config)))
        if on_result is not None:
            on_result(result)

    return server_app


app = make_server_app()
