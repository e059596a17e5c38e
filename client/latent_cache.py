"""The site's encoded scans, cached on its own disk between rounds (and between ClientApp processes).

Encoding every scan with the frozen autoencoder is the same work every round, and in deployment
Flower starts a fresh ClientApp process for every message, so an in-memory cache never survives a
round. The encoded scans (latents (N, Cz, d, h, w), maps encoded on the latent grid
(N, C', d, h, w), attributes (N, A) and the patient -> rows map) are written to
``<ledger folder>/cache/latents/latents-<key>.pt``.

They are computed from the site's scans, so they are private data: they never leave the site, the
folder is created with mode 0700 and each file is written with mode 0600 (a temporary file renamed
into place). The key is a SHA-256 over everything the encoding depends on:

- the data: the manifest's bytes and, for every scan and label file it names, its path, size and
  modification time (an edited, replaced or touched file changes the key);
- the grid and preprocessing: the round config's ``data`` (shape, spacing, labels, percentiles) and
  attribute names;
- the autoencoder's hash and the latent scale factor;
- the denoiser's map encoding (``model.conditioning.map_encoding``).

Only the newest entry is kept: writing one deletes the site's other ``latents-*.pt`` files, so a
change of any key part invalidates the old copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from configs.schema import DataConfig, SiteConfig
from models.checkpoint import atomic_torch_save
from models.data.manifest import read_manifest

log = logging.getLogger(__name__)

FOLDER_MODE = 0o700


def latents_folder(site: SiteConfig) -> Path:
    """``<ledger folder>/cache/latents``: the site's encoded scans (private, mode 0700)."""
    return Path(site.ledger_path).parent / "cache" / "latents"


def data_fingerprint(site: SiteConfig, data: DataConfig) -> dict[str, Any]:
    """The manifest's SHA-256 and (path, size, mtime in ns) of every file it names.

    Raises :class:`models.data.manifest.SiteDataError` on a manifest that cannot be read."""
    records = read_manifest(Path(site.data_dir), site.manifest,
                            allow_outside=data.allow_outside_paths)
    manifest = Path(site.data_dir) / site.manifest
    files = []
    for path in sorted({p.resolve() for record in records for p in (record.image, record.label)}):
        found = path.stat()
        files.append([str(path), found.st_size, found.st_mtime_ns])
    return {"manifest": hashlib.sha256(manifest.read_bytes()).hexdigest(), "files": files}


def cache_key(site: SiteConfig, data: DataConfig, grid: Mapping[str, Any],
              attributes: Sequence[str], autoencoder_sha256: str, latent_scale_factor: float,
              *, map_encoding: str = "fractions") -> str:
    """SHA-256 (hex) over the data fingerprint, the grid, the attributes, the autoencoder and
    how maps are encoded on the latent grid."""
    parts = {"data": data_fingerprint(site, data), "grid": dict(grid),
             "attributes": list(attributes), "autoencoder": autoencoder_sha256,
             "latent_scale_factor": float(latent_scale_factor), "map_encoding": map_encoding}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _path(site: SiteConfig, key: str) -> Path:
    return latents_folder(site) / f"latents-{key}.pt"


def load_encoded(site: SiteConfig, key: str) -> dict[str, Any] | None:
    """The cached encoding with key ``key`` (tensors on the CPU), or None."""
    path = _path(site, key)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged copy is only re-encoded
        log.warning("%s: cannot read the encoded scans in %s (%s); encoding again", site.site_id,
                    path, err)
        path.unlink(missing_ok=True)
        return None


def store_encoded(site: SiteConfig, key: str, encoded: Mapping[str, Any]) -> Path:
    """Write ``encoded`` under ``key`` (file 0600 in a 0700 folder); delete the older entries."""
    folder = latents_folder(site)
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    os.chmod(folder, FOLDER_MODE)   # mkdir's mode is masked by the umask, and skipped if it exists
    path = _path(site, key)
    atomic_torch_save(dict(encoded), path)   # mkstemp: mode 0600
    for older in folder.glob("latents-*.pt"):
        if older != path:
            older.unlink(missing_ok=True)
    return path
