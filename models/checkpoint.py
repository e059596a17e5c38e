"""The model artefact: one file holding everything needed to rebuild and cite a trained model.

A checkpoint is a ``torch.save`` of plain data (tensors, str, int, float, lists, dicts), read
back with ``weights_only=True``. It holds the autoencoder and denoiser weights, the model config as
a plain dict (enough to rebuild both networks without YAML), the data grid (shape, spacing, label
names, attribute names), the latent scale factor, the fedsynth version, free-form provenance
metadata, and a SHA-256 content hash.

The hash covers what determines the model's outputs: every weight tensor (name, dtype, shape, raw
bytes, in sorted order), the model config, the data grid and the latent scale factor, serialised
canonically. It is the model identity that ledgers and release reports cite; the version string and
the provenance metadata are informative and left out of it, so re-saving the same model gives the
same hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from models.autoencoder import build_autoencoder
from models.diffusion import LatentDiffusion
from models.latent_unet import LatentDenoiser, build_latent_unet
from models.version import fedsynth_version

log = logging.getLogger(__name__)

FORMAT = "fedsynth-checkpoint"
FORMAT_VERSION = 1
_HASHED_FIELDS = ("model_config", "data", "latent_scale_factor")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. One line: ``<file>: <problem>; <fix>``."""


@dataclass(frozen=True)
class DataGrid:
    """The grid a model was trained on: (D, H, W), spacing in mm, label and attribute names."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_names: tuple[str, ...]
    attributes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": [int(s) for s in self.shape], "spacing": [float(s) for s in self.spacing],
                "label_names": [str(n) for n in self.label_names],
                "attributes": [str(a) for a in self.attributes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataGrid":
        return cls(tuple(int(s) for s in data["shape"]), tuple(float(s) for s in data["spacing"]),
                   tuple(data["label_names"]), tuple(data.get("attributes", ())))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded (or just saved) checkpoint. ``content_hash`` is the hex SHA-256 model identity."""

    autoencoder_state: dict[str, torch.Tensor]
    denoiser_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    data: DataGrid
    latent_scale_factor: float
    fedsynth_version: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def build_autoencoder(self) -> nn.Module:
        """The autoencoder with the stored weights, in eval mode."""
        autoencoder = build_autoencoder(self.model_config["autoencoder"])
        autoencoder.load_state_dict(self.autoencoder_state, strict=True)
        return autoencoder.eval()

    def build_denoiser(self) -> LatentDenoiser:
        """The conditioned latent denoiser with the stored weights, in eval mode."""
        denoiser = build_latent_unet(self.model_config, self.data.num_classes,
                                     len(self.data.attributes))
        denoiser.load_state_dict(self.denoiser_state, strict=True)
        return denoiser.eval()

    def build_model(self, device: torch.device | str | None = None) -> LatentDiffusion:
        """Both stages, ready to sample, on ``device`` (None: the CPU)."""
        model = LatentDiffusion(self.build_autoencoder(), self.build_denoiser(), self.model_config,
                                self.latent_scale_factor).eval()
        return model if device is None else model.to(device)


def _state_dict(weights: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return {str(k): v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in state.items()}


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_hash(autoencoder_state: Mapping[str, torch.Tensor],
                 denoiser_state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any],
                 data: Mapping[str, Any], latent_scale_factor: float) -> str:
    """SHA-256 over the canonical serialisation of weights, config, data grid and scale factor."""
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}/{FORMAT_VERSION}\0".encode())
    digest.update(_canonical_json({"model_config": model_config, "data": data,
                                   "latent_scale_factor": float(latent_scale_factor)}))
    for part, state in (("autoencoder", autoencoder_state), ("denoiser", denoiser_state)):
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            digest.update(f"\0{part}.{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Config values as JSON-able plain data (tuples -> lists, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the target folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path | str, *, autoencoder: nn.Module | Mapping[str, torch.Tensor],
                    denoiser: nn.Module | Mapping[str, torch.Tensor],
                    model_config: Mapping[str, Any], data: DataGrid, latent_scale_factor: float,
                    metadata: Mapping[str, Any] | None = None) -> Checkpoint:
    """Write the checkpoint atomically and return it (with its content hash).

    ``model_config`` is the ``model`` section as a plain dict
    (``configs.config_to_dict(cfg.model)``); ``metadata`` is plain provenance data (stage, epochs,
    source run), not hashed.
    """
    autoencoder_state, denoiser_state = _state_dict(autoencoder), _state_dict(denoiser)
    model_config, data_dict = _plain(model_config), data.to_dict()
    scale = float(latent_scale_factor)
    digest = content_hash(autoencoder_state, denoiser_state, model_config, data_dict, scale)
    checkpoint = Checkpoint(autoencoder_state, denoiser_state, model_config, data, scale,
                            fedsynth_version(), digest, _plain(dict(metadata or {})))
    atomic_torch_save({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "fedsynth_version": checkpoint.fedsynth_version, "content_hash": digest,
        "model_config": model_config, "data": data_dict, "latent_scale_factor": scale,
        "autoencoder": autoencoder_state, "denoiser": denoiser_state,
        "metadata": checkpoint.metadata,
    }, Path(path))
    log.info("checkpoint %s written (sha256 %s)", path, digest[:12])
    return checkpoint


def load_checkpoint(path: Path | str, verify_build: bool = True) -> Checkpoint:
    """Read, verify and (by default) test-build a checkpoint.

    Raises :class:`CheckpointError` (one line) for a missing, unreadable, truncated or foreign file,
    a content-hash mismatch (altered contents), or a config/weights pair this code cannot build.
    """
    path = Path(path)
    fix = "point --checkpoint at a file written by `fedsynth pretrain` or the federation server"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; {fix}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncation and corruption surface as many types
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__}); "
                              f"restore the file or re-run the step that wrote it") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedsynth checkpoint; {fix}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {raw.get('format_version')!r} "
                              f"is not supported by fedsynth {fedsynth_version()} (reads "
                              f"{FORMAT_VERSION}); use the fedsynth version that wrote it")
    try:
        stored = str(raw["content_hash"])
        autoencoder_state, denoiser_state = dict(raw["autoencoder"]), dict(raw["denoiser"])
        model_config, data_dict = raw["model_config"], raw["data"]
        scale = float(raw["latent_scale_factor"])
        recomputed = content_hash(autoencoder_state, denoiser_state, model_config, data_dict, scale)
        data = DataGrid.from_dict(data_dict)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: checkpoint is missing or has malformed fields ({err}); "
                              f"{fix}") from None
    if recomputed != stored:
        raise CheckpointError(f"{path}: content hash mismatch (stored {stored[:12]}, contents "
                              f"{recomputed[:12]}); the file was altered after it was written, "
                              f"do not use it")
    checkpoint = Checkpoint(autoencoder_state, denoiser_state, model_config, data, scale,
                            str(raw.get("fedsynth_version", "unknown")), stored,
                            dict(raw.get("metadata", {})))
    if verify_build:
        try:
            checkpoint.build_autoencoder()
            checkpoint.build_denoiser()
        except Exception as err:  # noqa: BLE001 - any build failure: this code cannot use it
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path}: the stored model config cannot be built by fedsynth "
                                  f"{fedsynth_version()} ({reason}); use the fedsynth version "
                                  f"that wrote it ({checkpoint.fedsynth_version})") from None
    return checkpoint
