"""The federation's per-round checkpoint, and what ``--resume`` reads back.

After each finished round the server writes, in this order (each step atomic):

1. ``federation/checkpoints/round_<r>.pt``: the global model (a :mod:`models.checkpoint` file: the
   frozen autoencoder and the averaged denoiser, with the round in its metadata);
2. ``federation/state.json``: the round number, that checkpoint's path and hash, the strategy's state
   (each site's last reported spend and whether it is still sampled), the position ``(seq, hash)`` of
   the consortium ledger after the round, the cumulative bytes exchanged and the MLflow run id.

``state.json`` is the commit point: a crash before it leaves the previous round's state, and the
resumed server reruns the round. Older round checkpoints are removed once a newer state is written
(the last :data:`KEEP` are kept).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from models.checkpoint import Checkpoint, save_checkpoint
from privacy.durable import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
FORMAT = "fedsynth-federation-state/1"
KEEP = 2


class StateError(ValueError):
    """A federation state file that cannot be used. One line with the fix."""


@dataclass(frozen=True)
class FederationState:
    """What a resumed server needs. ``round`` is the last finished round (0: none yet)."""

    round: int
    checkpoint: str                 # relative to the federation folder
    checkpoint_sha256: str
    initial_checkpoint_sha256: str
    ledger_seq: int
    ledger_hash: str
    standings: dict[str, dict[str, Any]]
    run_definition: dict[str, str]
    mlflow_run_id: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    stop_reason: str = ""
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


def state_path(federation_dir: Path) -> Path:
    return Path(federation_dir) / STATE_FILE


def round_checkpoint_path(federation_dir: Path, round: int) -> Path:
    return Path(federation_dir) / CHECKPOINT_DIR / f"round_{round:04d}.pt"


def load_state(federation_dir: Path) -> FederationState | None:
    """The saved state, or None when no round has finished in this folder."""
    path = state_path(federation_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise StateError(f"{path}: not a fedsynth federation state; use another run folder")
        return FederationState(**data)
    except (ValueError, TypeError) as err:
        if isinstance(err, StateError):
            raise
        raise StateError(f"{path}: unreadable federation state ({err}); restore it or start a new run "
                         f"folder") from None


def write_state(federation_dir: Path, state: FederationState) -> None:
    """Replace ``state.json`` atomically (the commit point of a round)."""
    atomic_write_bytes(state_path(federation_dir),
                       json.dumps(asdict(state), sort_keys=True, indent=1).encode())


def save_round(federation_dir: Path, round: int, base: Checkpoint,
               denoiser_state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Checkpoint:
    """Write the round's global model checkpoint (step 1 above)."""
    return save_checkpoint(round_checkpoint_path(federation_dir, round), autoencoder=base.autoencoder_state,
                           denoiser=denoiser_state, model_config=base.model_config, data=base.data,
                           latent_scale_factor=base.latent_scale_factor,
                           metadata={**dict(metadata), "stage": "federation", "round": int(round)})


def prune_checkpoints(federation_dir: Path, keep_round: int) -> None:
    """Remove round checkpoints older than the last :data:`KEEP`, never ``keep_round``'s."""
    folder = Path(federation_dir) / CHECKPOINT_DIR
    files = sorted(folder.glob("round_*.pt"))
    for path in files[:-KEEP]:
        if path != round_checkpoint_path(federation_dir, keep_round):
            path.unlink(missing_ok=True)
