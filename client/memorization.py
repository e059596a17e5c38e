"""The memorization audit, run AT a site on its own data (DCR-style: distance to closest record).

Two distributions of nearest-scan distances, in the gate's distance space and shift tolerance
(:mod:`privacy.gate`):

- **synthetic -> site**: each synthetic sample's distance to its nearest scan at this site;
- **held-out -> rest**: each real scan's distance to its nearest scan of ANOTHER patient (every
  patient held out in turn, as the gate's calibration does). This is how close a new, unseen
  patient typically comes to the site's data.

A model that memorised this site's patients produces samples closer to its scans than new patients
come: the synthetic distribution shifts towards zero. The audit reports both distributions'
quantiles, the share of synthetic samples below the held-out distribution's 5th percentile
(about 5 % when nothing is memorised), the samples closer than half the closest pair of different
patients ("near copies"), and a one-sided Mann-Whitney U test (synthetic closer than held-out).
It writes a JSON summary and a histogram PNG. Everything it computes is private to the site: it
stays in the site's output folder and is never sent.

Exit rule of ``fedsynth audit memorization``: a problem (exit 1) when the test's p-value is below
:data:`P_VALUE_ALARM` or when any near copy is found.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from client.gate import data_config_of
from client.site_data import SiteDataError, load_site
from configs.schema import SiteConfig
from models.checkpoint import Checkpoint
from privacy.durable import atomic_write_bytes
from privacy.gate import (IMAGE_DISTANCES, NO_SHIFT, between_patient_distances, check_distance,
                          latent_views, nearest_scans, summary, translations, views_of)

log = logging.getLogger(__name__)

P_VALUE_ALARM = 0.01
NEAR_COPY_FRACTION = 0.5
SUMMARY_FILE = "memorization_audit.json"
HISTOGRAM_FILE = "memorization_audit.png"


class MemorizationAuditError(ValueError):
    """Audit inputs that cannot be used. One line: what, where, and the fix."""


@dataclass(frozen=True)
class MemorizationAudit:
    site_id: str
    distance: str
    max_shift: int
    model_sha256: str
    num_synthetic: int
    num_scans: int
    num_patients: int
    synthetic: list[float]
    heldout: list[float]
    synthetic_summary: dict[str, float]
    heldout_summary: dict[str, float]
    heldout_p5: float
    fraction_below_heldout_p5: float
    near_copies: list[str]
    mann_whitney_p: float

    @property
    def problem(self) -> bool:
        return self.mann_whitney_p < P_VALUE_ALARM or bool(self.near_copies)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "problem": self.problem}


def read_synthetic(folder: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[str]]:
    """The images listed by a release folder's ``manifest.csv``, RAS: (N, 1, D, H, W) float32."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.is_file():
        raise MemorizationAuditError(f"{manifest}: not found; pass the output folder of "
                                     f"`fedsynth release` (or any folder with a manifest.csv "
                                     f"listing images)")
    with manifest.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or "image" not in rows[0]:
        raise MemorizationAuditError(f"{manifest}: lists no images; it needs an 'image' column "
                                     f"and one row per sample")
    images, names = [], []
    for row in rows:
        path = Path(folder) / row["image"]
        try:
            volume = nib.as_closest_canonical(nib.load(str(path))).get_fdata(dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise MemorizationAuditError(f"{path}: unreadable NIfTI ({type(err).__name__}); "
                                         f"restore the release folder") from None
        if tuple(volume.shape) != tuple(shape):
            raise MemorizationAuditError(f"{path}: grid {list(volume.shape)} differs from the "
                                         f"model's {list(shape)}; audit with the checkpoint the "
                                         f"samples came from")
        images.append(torch.from_numpy(np.ascontiguousarray(volume))[None])
        names.append(row.get("patient_id") or path.name)
    return torch.stack(images), names


def audit_memorization(site: SiteConfig, synthetic_dir: Path, checkpoint: Checkpoint, *,
                       distance: str = "latent", max_shift: int = 1, chunk_size: int = 64,
                       intensity_percentiles: tuple[float, float] = (0.5, 99.5)
                       ) -> MemorizationAudit:
    """Compare synthetic-to-site distances with the site's own held-out-to-rest distances."""
    from scipy.stats import mannwhitneyu

    check_distance(distance)
    grid = checkpoint.data
    data = {"shape": list(grid.shape), "spacing": list(grid.spacing),
            "label_names": list(grid.label_names),
            "intensity_percentiles": list(intensity_percentiles)}
    synthetic, names = read_synthetic(Path(synthetic_dir), grid.shape)
    dataset = load_site(site.data_dir, data_config_of(data), site.manifest)
    scans = torch.stack([dataset[i]["image"].float() for i in range(len(dataset))])
    patients = [dataset[i]["patient_id"] for i in range(len(dataset))]
    if len(set(patients)) < 2:
        raise SiteDataError(f"{site.data_dir}: the audit needs scans of at least 2 patients (got "
                            f"{len(set(patients))}); a held-out distance needs another patient")
    shifts = translations(max_shift)
    if distance in IMAGE_DISTANCES:
        bank, offsets = scans, shifts
        synthetic_views, scan_views = views_of(synthetic), views_of(scans)
    else:
        encoder = checkpoint.build_autoencoder()
        scale = checkpoint.latent_scale_factor
        bank, offsets = latent_views(encoder, scans, scale)[:, 0], NO_SHIFT
        synthetic_views = latent_views(encoder, synthetic, scale, shifts)
        scan_views = latent_views(encoder, scans, scale, shifts)
    to_site = nearest_scans(synthetic_views, bank, distance, offsets=offsets, chunk_size=chunk_size,
                            progress=True).distance
    heldout = between_patient_distances(scan_views, bank, patients, distance, offsets=offsets,
                                        chunk_size=chunk_size, progress=True)
    p5 = float(np.percentile(heldout, 5))
    closest_pair = float(heldout.min())
    near = [name for name, d in zip(names, to_site) if d < NEAR_COPY_FRACTION * closest_pair]
    p_value = float(mannwhitneyu(to_site, heldout, alternative="less").pvalue)
    return MemorizationAudit(
        site_id=site.site_id, distance=distance, max_shift=max_shift,
        model_sha256=checkpoint.content_hash,
        num_synthetic=len(names), num_scans=len(patients), num_patients=len(set(patients)),
        synthetic=[float(d) for d in to_site], heldout=[float(d) for d in heldout],
        synthetic_summary=summary(to_site), heldout_summary=summary(heldout), heldout_p5=p5,
        fraction_below_heldout_p5=float(np.mean(to_site < p5)), near_copies=near,
        mann_whitney_p=p_value)


def histogram_png(audit: MemorizationAudit) -> bytes:
    """Both distributions on shared bins, with the held-out 5th percentile marked (PNG bytes)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    values = np.concatenate([audit.synthetic, audit.heldout])
    bins = np.linspace(0.0, float(values.max()) * 1.05 or 1.0, 30)
    axes.hist(audit.heldout, bins=bins, alpha=0.6, density=True,
              label=f"held-out patient -> other patients (n={len(audit.heldout)})")
    axes.hist(audit.synthetic, bins=bins, alpha=0.6, density=True,
              label=f"synthetic -> nearest scan (n={len(audit.synthetic)})")
    axes.axvline(audit.heldout_p5, color="crimson", linestyle=":", label="held-out 5th percentile")
    axes.set_xlabel(f"distance to the nearest scan ({audit.distance}, shift <= {audit.max_shift})")
    axes.set_ylabel("density")
    axes.set_title(f"{audit.site_id}: memorization audit "
                   f"(Mann-Whitney p = {audit.mann_whitney_p:.3g})", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_audit(audit: MemorizationAudit, out: Path) -> tuple[Path, Path]:
    """``memorization_audit.json`` and ``.png`` in ``out`` (written atomically)."""
    out = Path(out)
    summary_path, histogram_path = out / SUMMARY_FILE, out / HISTOGRAM_FILE
    text = json.dumps(audit.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(summary_path, text.encode())
    atomic_write_bytes(histogram_path, histogram_png(audit))
    return summary_path, histogram_path
