"""Membership inference against the final model, run AT a site (``fedsynth audit membership``).

Members are the patients the site trained on; non-members are patients the site HELD OUT from
training from its first round on (``SiteConfig.membership_holdout``, a fraction of its patients).
The held-out set is drawn once, before the site's first plan, by ranking patients on
SHA-256(salt | patient id) with a random salt, and recorded in the site's ledger as a
``membership-holdout`` entry (fraction, salt, counts, a hash of the held-out ids) next to the plan,
so the split is fixed before any training and reproducible by the officer; a changed fraction
later is refused. The DP plan then counts only the training patients (N and q are theirs).

Two attacks score each patient (higher = "member"), averaged over the patient's scans:

- **loss**: minus the denoising loss (``models.diffusion.diffusion_loss``) at fixed timesteps and
  fixed noise seeds (the classic loss attack, Yeom et al. 2018, as used on diffusion models);
- **step error** (SecMI, Duan et al., ICML 2023): minus the t-error of a deterministic DDIM step:
  x_t by DDIM inversion of the latent up to t, one more inversion step to t+k, one DDIM denoising
  step back to t; members are reconstructed more exactly. t = T/10 and k = T/100 (SecMI's t = 100,
  k = 10 at T = 1000).

Reported per attack: ROC AUC and TPR at 1 % and 0.1 % FPR, each with a 95 % bootstrap interval
(patients resampled within each group). Only these aggregate figures are written (a local JSON);
no per-patient score leaves this module. With few non-members the low-FPR points are coarse: the
JSON states the number of non-members, and TPR at an FPR below 1/non-members is the TPR above the
highest non-member score.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from privacy.durable import atomic_write_bytes
from privacy.site_ledger import SiteLedger, utc_timestamp

log = logging.getLogger(__name__)

HOLDOUT_KIND = "membership-holdout"
SUMMARY_FILE = "membership_audit.json"
FPR_POINTS = (0.01, 0.001)
BOOTSTRAP = 1000


class MembershipAuditError(ValueError):
    """Audit inputs or a holdout setting that cannot be used. One line: what, where, the fix."""


@dataclass(frozen=True)
class HoldoutRecord:
    """The ledger entry fixing the membership-audit split (payload of a ``membership-holdout``)."""

    fraction: float
    salt: str
    num_patients: int
    num_held_out: int
    held_out_sha256: str
    timestamp: str


def _rank_key(salt: str, patient_id: str) -> str:
    return hashlib.sha256(f"{salt}|{patient_id.strip().casefold()}".encode()).hexdigest()


def held_out_ids(patient_ids: Sequence[str], fraction: float, salt: str) -> list[str]:
    """The ``round(fraction * N)`` patients with the smallest SHA-256(salt | id), sorted."""
    count = int(round(fraction * len(patient_ids)))
    ranked = sorted(patient_ids, key=lambda pid: _rank_key(salt, pid))
    return sorted(ranked[:count])


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def recorded_holdout(ledger: SiteLedger) -> HoldoutRecord | None:
    """The site's ``membership-holdout`` entry, if its ledger has one (the chain is verified)."""
    for entry in ledger.state().other:
        if entry.kind == HOLDOUT_KIND:
            return HoldoutRecord(**entry.payload)
    return None


def apply_holdout(ledger: SiteLedger, fraction: float, patients: Mapping[str, Sequence[int]]
                  ) -> dict[str, list[int]]:
    """The training patients of a site whose config holds out ``fraction`` of its patients.

    Records the split in the ledger on first use (before the plan: a ledger that already has a
    plan or round and no holdout entry is refused, since N and q are fixed); afterwards reuses the
    recorded salt, and refuses a changed fraction or patient list.
    """
    with ledger.locked():
        recorded = recorded_holdout(ledger)
        if recorded is None:
            if fraction == 0:
                return {pid: list(rows) for pid, rows in patients.items()}
            state = ledger.state()
            if state.plans or state.rounds or state.non_private:
                raise MembershipAuditError(
                    f"{ledger.path}: membership_holdout={fraction:g} set after the site's first "
                    f"round; the split must be fixed before training - remove the key or start a "
                    f"new research ledger")
            salt = secrets.token_hex(16)
            held = held_out_ids(list(patients), fraction, salt)
            if len(held) in (0, len(patients)):
                raise MembershipAuditError(
                    f"membership_holdout={fraction:g} of {len(patients)} patients holds out "
                    f"{len(held)}; choose a fraction that keeps both groups non-empty")
            recorded = HoldoutRecord(float(fraction), salt, len(patients), len(held),
                                     _ids_hash(held), utc_timestamp())
            ledger.ledger.append(HOLDOUT_KIND, asdict(recorded))
            log.info("%s: holding out %d of %d patients for the membership audit", ledger.path,
                     len(held), len(patients))
        elif recorded.fraction != fraction:
            raise MembershipAuditError(
                f"{ledger.path}: the ledger fixed membership_holdout={recorded.fraction:g}, the "
                f"site config says {fraction:g}; restore membership_holdout: {recorded.fraction:g}")
    held = set(held_out_ids(list(patients), recorded.fraction, recorded.salt))
    if len(patients) != recorded.num_patients or _ids_hash(sorted(held)) != \
            recorded.held_out_sha256:
        raise MembershipAuditError(
            f"{ledger.path}: the site's patients changed since the membership holdout was recorded "
            f"({recorded.num_patients} then, {len(patients)} now); restore the manifest")
    return {pid: list(rows) for pid, rows in patients.items() if pid not in held}


# ---------------------------------------------------------------- attack scores (per scan)

def _conditioning(batch: Mapping[str, torch.Tensor], has_attributes: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    return batch["labels"], batch["attributes"] if has_attributes else None


@torch.no_grad()
def loss_scores(denoiser: nn.Module, scheduler: Any, scans: Dataset, *, has_attributes: bool,
                timesteps: int = 10, seed: int = 0) -> np.ndarray:
    """Minus the mean denoising loss of each scan over ``timesteps`` evenly spaced timesteps with
    fixed noise (seeded per scan index): (num_scans,)."""
    from models.diffusion import diffusion_loss

    total = scheduler.num_train_timesteps
    grid = torch.linspace(0, total - 1, timesteps).round().long()
    scores = []
    for index in range(len(scans)):
        item = scans[index]
        latents = item["latents"][None].expand(timesteps, *item["latents"].shape)
        labels = item["labels"][None].expand(timesteps, *item["labels"].shape)
        attributes = item["attributes"][None].expand(timesteps, -1) if has_attributes else None
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noise = torch.randn(latents.shape, generator=generator)
        losses = diffusion_loss(denoiser, scheduler, latents, labels, attributes, noise=noise,
                                timesteps=grid)
        scores.append(-float(losses.mean()))
    return np.asarray(scores)


def _x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
            prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model output at x_t (alpha = alphas_cumprod[t])."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    return (x_t - s * output) / a, output


def _ddim(denoiser: nn.Module, x: torch.Tensor, t_from: int, t_to: int, labels: torch.Tensor,
          attributes: torch.Tensor | None, alphas: torch.Tensor, prediction: str) -> torch.Tensor:
    """One deterministic DDIM move from timestep ``t_from`` to ``t_to`` (either direction)."""
    timesteps = torch.full((x.shape[0],), t_from, dtype=torch.long)
    output = denoiser(x, timesteps, labels, attributes)
    x0, eps = _x0_eps(output, x, alphas[t_from], prediction)
    return alphas[t_to].sqrt() * x0 + (1 - alphas[t_to]).sqrt() * eps


@torch.no_grad()
def step_error_scores(denoiser: nn.Module, scheduler: Any, scans: Dataset, *,
                      has_attributes: bool, batch_size: int = 8) -> np.ndarray:
    """Minus SecMI's t-error of each scan (module doc): (num_scans,)."""
    total = scheduler.num_train_timesteps
    t, k = max(1, total // 10), max(1, total // 100)
    alphas = scheduler.alphas_cumprod.float()
    prediction = scheduler.prediction_type
    scores = []
    for start in range(0, len(scans), batch_size):
        items = [scans[i] for i in range(start, min(start + batch_size, len(scans)))]
        x = torch.stack([item["latents"] for item in items])
        labels = torch.stack([item["labels"] for item in items])
        attributes = torch.stack([item["attributes"] for item in items]) \
            if has_attributes else None
        # Inversion from x_0 (t = 0 is the clean latent's nearest timestep) up to t.
        for here in range(0, t, k):
            x = _ddim(denoiser, x, here, min(here + k, t), labels, attributes, alphas, prediction)
        x_t = x
        x_next = _ddim(denoiser, x_t, t, t + k, labels, attributes, alphas, prediction)
        x_back = _ddim(denoiser, x_next, t + k, t, labels, attributes, alphas, prediction)
        error = (x_back - x_t).pow(2).flatten(1).sum(dim=1)
        scores.extend((-error).tolist())
    return np.asarray(scores)


def per_patient(scores: np.ndarray, patients: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """A patient's score: the mean over its scans' rows."""
    return {pid: float(np.mean(scores[list(rows)])) for pid, rows in patients.items()}


# ---------------------------------------------------------------- metrics

def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P[member score > non-member score] + 0.5 P[tie] (the Mann-Whitney AUC)."""
    greater = (members[:, None] > nonmembers[None, :]).mean()
    ties = (members[:, None] == nonmembers[None, :]).mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """TPR at the strictest threshold whose FPR is <= ``fpr`` (score > threshold = member)."""
    allowed = int(np.floor(fpr * len(nonmembers)))  # non-members allowed above the threshold
    ranked = np.sort(nonmembers)[::-1]
    threshold = ranked[allowed] if allowed < len(ranked) else -np.inf
    return float((members > threshold).mean())


def attack_metrics(members: np.ndarray, nonmembers: np.ndarray, *, seed: int = 0,
                   bootstrap: int = BOOTSTRAP) -> dict[str, Any]:
    """AUC and TPR at :data:`FPR_POINTS`, each with a 95 % percentile bootstrap interval."""
    rng = np.random.default_rng(seed)

    def figures(m: np.ndarray, n: np.ndarray) -> list[float]:
        return [roc_auc(m, n)] + [tpr_at_fpr(m, n, f) for f in FPR_POINTS]

    point = figures(members, nonmembers)
    draws = np.array([figures(rng.choice(members, len(members)),
                              rng.choice(nonmembers, len(nonmembers))) for _ in range(bootstrap)])
    low, high = np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)
    names = ["auc"] + [f"tpr_at_{f:g}_fpr" for f in FPR_POINTS]
    return {name: {"value": point[i], "ci95": [float(low[i]), float(high[i])]}
            for i, name in enumerate(names)}


@dataclass(frozen=True)
class MembershipAudit:
    """Aggregate figures only (no per-patient score)."""

    site_id: str
    model_sha256: str
    members: int
    nonmembers: int
    holdout_fraction: float
    attacks: dict[str, dict[str, Any]]
    bootstrap: int = BOOTSTRAP

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def membership_attacks(denoiser: nn.Module, scheduler: Any, scans: Dataset,
                       members: Mapping[str, Sequence[int]],
                       nonmembers: Mapping[str, Sequence[int]], *, has_attributes: bool,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
    """Both attacks' metrics; ``members`` / ``nonmembers`` map patient ids to scan indices."""
    if not members or not nonmembers:
        raise MembershipAuditError(f"the audit needs members and non-members (got {len(members)} "
                                   f"and {len(nonmembers)}); set membership_holdout in the site "
                                   f"config before the first round")
    denoiser.eval()
    results = {}
    for name, scores in (
            ("loss", loss_scores(denoiser, scheduler, scans, has_attributes=has_attributes,
                                 seed=seed)),
            ("step_error", step_error_scores(denoiser, scheduler, scans,
                                             has_attributes=has_attributes))):
        m = np.array(list(per_patient(scores, members).values()))
        n = np.array(list(per_patient(scores, nonmembers).values()))
        results[name] = attack_metrics(m, n, seed=seed)
    return results


def audit_membership(site: Any, checkpoint: Any, *, seed: int = 0,
                     intensity_percentiles: tuple[float, float] = (0.5, 99.5)
                     ) -> MembershipAudit:
    """Load and encode the site's scans, split them by the ledger's recorded holdout, attack."""
    from client.gate import data_config_of
    from client.site_runtime import encode_site
    from models.diffusion import build_scheduler

    ledger = SiteLedger(site.ledger_path)
    if not site.ledger_path.exists() or (recorded := recorded_holdout(ledger)) is None:
        raise MembershipAuditError(f"{site.ledger_path}: records no membership holdout; set "
                                   f"membership_holdout in the site config before its first round")
    grid = checkpoint.data
    data = data_config_of({"shape": list(grid.shape), "spacing": list(grid.spacing),
                           "label_names": list(grid.label_names),
                           "intensity_percentiles": list(intensity_percentiles)})
    attributes = list(grid.attributes)
    encoded = encode_site(site, data, attributes, checkpoint.build_autoencoder(),
                          checkpoint.latent_scale_factor)
    held = set(held_out_ids(list(encoded.patients), recorded.fraction, recorded.salt))
    if _ids_hash(sorted(held)) != recorded.held_out_sha256:
        raise MembershipAuditError(f"{site.ledger_path}: the site's patients changed since the "
                                   f"holdout was recorded; audit with the manifest it trained on")
    members = {p: r for p, r in encoded.patients.items() if p not in held}
    nonmembers = {p: r for p, r in encoded.patients.items() if p in held}
    attacks = membership_attacks(checkpoint.build_denoiser(), build_scheduler(
        checkpoint.model_config), encoded.scans, members, nonmembers,
        has_attributes=bool(attributes), seed=seed)
    return MembershipAudit(site.site_id, checkpoint.content_hash, len(members), len(nonmembers),
                           recorded.fraction, attacks)


def write_membership_audit(audit: MembershipAudit, out: Path) -> Path:
    """``membership_audit.json`` in ``out`` (atomic)."""
    path = Path(out) / SUMMARY_FILE
    atomic_write_bytes(path, (json.dumps(audit.to_json(), indent=2, sort_keys=True) + "\n")
                       .encode())
    return path
