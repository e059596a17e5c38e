"""The site's on-disk copies of the PUBLIC weights it received, keyed by their hash.

Two kinds, both in the site's state folder (``<ledger folder>/cache``, next to its ledger):

- ``autoencoder-<sha256>.pt``: the frozen public autoencoder. The server sends it only to sites
  that do not hold it (:func:`frozen_autoencoder`).
- ``denoiser-<sha256>.pt``: the last FULL global denoiser the site received. When only a subset of
  the denoiser is trained (``privacy.trainable: attention_conditioning``), the frozen rest never
  changes within a run, so after the first round the server sends only the trainable subset and
  the hash of the full model the site holds (``RoundConfig.base_sha256``). The site overlays the
  subset on that copy and checks that the result has the hash of the global model
  (``RoundConfig.global_sha256``) before it trains on it (:func:`rebuild_global`).

Every copy is checked against its hash when it is read; a copy that fails is deleted. Files are
written through a temporary file (mode 0600) renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from configs.schema import SiteConfig
from models.checkpoint import atomic_torch_save
from privacy.outbox import weights_hash
from privacy.protocol import RoundConfig

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class AutoencoderMissing(Exception):
    """The train message left out the autoencoder and the site's cache does not hold it."""

    def __init__(self, server_round: int):
        super().__init__(f"round {server_round}: no autoencoder in the message nor in the cache")
        self.server_round = server_round


class DenoiserMissing(Exception):
    """The train message carries only the trainable subset and the site's cache does not hold the
    full model it builds on."""

    def __init__(self, server_round: int, base_sha256: str):
        super().__init__(f"round {server_round}: the message carries only the trained subset of the "
                         f"denoiser and the cache does not hold the model {base_sha256[:12]} it "
                         f"completes")
        self.server_round = server_round


class RebuiltModelMismatch(Exception):
    """The trainable subset applied to the cached model does not give the announced global model."""

    def __init__(self, server_round: int, detail: str):
        super().__init__(f"round {server_round}: {detail}")
        self.server_round = server_round


def cache_folder(site: SiteConfig) -> Path:
    """``<ledger folder>/cache``: the site's copies of public weights (and its encoded scans)."""
    return Path(site.ledger_path).parent / "cache"


def autoencoder_cache_path(site: SiteConfig, sha256: str) -> Path:
    """The site's on-disk copy of the public autoencoder with hash ``sha256``."""
    return cache_folder(site) / f"autoencoder-{sha256}.pt"


def denoiser_cache_path(site: SiteConfig, sha256: str) -> Path:
    """The site's on-disk copy of the full global denoiser with hash ``sha256``."""
    return cache_folder(site) / f"denoiser-{sha256}.pt"


def _read_verified(path: Path, sha256: str, site_id: str, what: str) -> StateDict | None:
    """The state dict in ``path`` if it has hash ``sha256``; a copy that does not is deleted."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if weights_hash(state) == sha256:
        return state
    log.warning("%s: %s does not hold the %s %s; discarding it", site_id, path, what, sha256[:12])
    path.unlink(missing_ok=True)
    return None


def frozen_autoencoder(site: SiteConfig, received: StateDict | None, sha256: str) -> StateDict | None:
    """The frozen public autoencoder: ``received`` (then cached on disk, keyed by its hash) or,
    when the server left it out because this site holds it, the cached copy. None when neither
    has the autoencoder of hash ``sha256``."""
    path = autoencoder_cache_path(site, sha256)
    if received is not None:
        if not path.exists() and weights_hash(received) == sha256:
            atomic_torch_save(received, path)
        return received
    return _read_verified(path, sha256, site.site_id, "autoencoder")


def rebuild_global(site: SiteConfig, received: StateDict, config: RoundConfig) -> StateDict:
    """The full global denoiser of round ``config.server_round``.

    ``config.base_sha256`` empty: ``received`` is the full model; when it has the announced hash it
    becomes the site's cached copy (replacing the previous one). Otherwise ``received`` is the
    trainable subset, overlaid on the cached model of hash ``base_sha256``; the result must have
    hash ``global_sha256``. Raises :class:`DenoiserMissing` (no such copy) or
    :class:`RebuiltModelMismatch` (names or shapes that do not fit, or the wrong hash).
    """
    if not config.base_sha256:
        if weights_hash(received) == config.global_sha256:
            path = denoiser_cache_path(site, config.global_sha256)
            if not path.exists():
                atomic_torch_save(received, path)
            for older in path.parent.glob("denoiser-*.pt"):
                if older != path:
                    older.unlink(missing_ok=True)
        return received
    base = _read_verified(denoiser_cache_path(site, config.base_sha256), config.base_sha256,
                          site.site_id, "denoiser")
    if base is None:
        raise DenoiserMissing(config.server_round, config.base_sha256)
    for name, tensor in received.items():
        if name not in base or tuple(base[name].shape) != tuple(tensor.shape):
            raise RebuiltModelMismatch(config.server_round,
                                       f"the received tensor {name} {tuple(tensor.shape)} is not a "
                                       f"parameter of the cached model {config.base_sha256[:12]}")
    rebuilt = {**base, **received}
    if weights_hash(rebuilt) != config.global_sha256:
        raise RebuiltModelMismatch(config.server_round,
                                   f"the trained subset on the cached model {config.base_sha256[:12]} "
                                   f"does not rebuild the global model {config.global_sha256[:12]}")
    return rebuilt
