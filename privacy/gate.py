"""The release gate's distances: how close is a synthetic candidate to a site's nearest real scan?

A site answers a gate query by measuring, for every candidate, the distance to its NEAREST scan and
comparing it with a threshold. Everything here is plain torch/numpy (no Flower): the site
(:mod:`client.gate`) and the server (:mod:`server.release`) both use it.

Distance spaces (``release.distance``)
--------------------------------------
- ``latent`` (default): relative L2 distance ``||E(x) - E(s)||_2 / ||E(s)||_2`` between embeddings
  by the frozen PUBLIC encoder ``E`` (the autoencoder's posterior mean times the latent scale
  factor, (Cz, d, h, w)). The encoder never saw private data, so the embedding is a fixed, public
  feature map; it is smaller than the image (2.7x for the demo's 3 channels at half resolution,
  more with deeper autoencoders), and it smooths away voxel noise.
- ``nrmse``: normalised RMSE in image space, ``||x - s||_2 / ||s||_2`` with ``s`` the site's scan
  (the error as a fraction of the scan's own signal; scale-free, no model involved).
- ``ssim``: ``1 - SSIM(x, s)`` in image space, MONAI's :class:`~monai.metrics.SSIMMetric`
  (Gaussian window, data range 1: site images are normalised to [0, 1]). The most noise-robust of
  the three but one 3D convolution per pair: use it for small releases.

Why ``latent`` by default (measured on the demo cohort at 16^3, 8 patients, a public autoencoder
trained briefly): planted copies with Gaussian noise (sigma 0.02) land at 0.018 of the scan's
latent norm against a nearest OTHER patient at 0.17 or more (a 10x margin); in ``nrmse`` the same
copies land at 0.06 against 0.22 (3.6x), in ``ssim`` at 0.004 against 0.08 (20x, but ~100x the
cost). Exact and shifted copies land at 0 in every space once the shift tolerance below is on.

Shift tolerance (``release.max_shift``)
---------------------------------------
A copy moved by a voxel is still a copy, but a plain voxel-wise distance calls it far: at 6-12 mm
voxels a one-voxel shift of a brain costs more than the difference between two registered
patients. So each candidate is compared under every integer translation of up to ``max_shift``
voxels per axis ((2k+1)^3 offsets, circular :func:`torch.roll`), and its distance is the minimum.
In image space the site rolls the candidates itself; in latent space a translation of the image is
not a translation of the latent grid, so the server encodes every translate of a candidate and
sends them all as that candidate's *views* ``(N, T, Cz, d, h, w)``.

Threshold policy (``release.threshold``)
----------------------------------------
- ``fixed``: one distance ``value`` for every site.
- ``calibrated`` (default): each site computes, for every one of its scans, the distance to the
  nearest scan of a DIFFERENT patient (same distance, same shift tolerance), and takes the
  ``percentile`` (default 5) of those distances. A candidate closer to a real scan than almost all
  real patients are to each other is a likely copy. (Dar et al. use the 95th percentile of a
  training-to-validation *similarity*; a low percentile of a *distance* is the same rule.) It needs
  at least two patients at the site, and the threshold never leaves the site.

A candidate PASSES a site when its nearest-scan distance is at or above the threshold
(:func:`decide`); the server keeps only candidates that pass every site.

Search (:mod:`privacy.nearest_scan`): for ``latent`` and ``nrmse`` an EXACT search returns the
same nearest distances as comparing every pair, for both the gate and the calibration. Every
candidate x scan pair first gets a rigorous lower bound from exact int8 matrix products of the
quantised (centred) vectors plus a Cauchy-Schwarz bound on the quantisation residuals; the scans
that bound cannot rule out against the best exact distance found so far get float32 products with
a rigorous rounding bound, and the few still undecided the float64 distance brute force uses.
SSIM (no such bound) compares every pair, in batches of ``chunk_size`` pairs
(:func:`brute_force_nearest_scans`, also the reference in tests).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric
from tqdm.auto import tqdm

from models.autoencoder import encode_latents
from privacy.nearest_scan import ScanIndex, ViewSource, relative_l2
from privacy.protocol import (ARRAYS, CONFIG, GATE_ACCOUNTING, GATE_ACCOUNTING_KEYS, GATE_PASSED,
                              GATE_STATUS, GATE_STATUS_KEYS, METRICS, PROTOCOL_VERSION,
                              ProtocolViolation, check_accounting_numbers, compact_json,
                              record_field, record_json_field)

Distance = Literal["latent", "nrmse", "ssim"]
DISTANCES: tuple[str, ...] = ("latent", "nrmse", "ssim")
IMAGE_DISTANCES: tuple[str, ...] = ("nrmse", "ssim")
POLICIES: tuple[str, ...] = ("calibrated", "fixed")
Offset = tuple[int, int, int]
NO_SHIFT: tuple[Offset, ...] = ((0, 0, 0),)
# SSIM's Gaussian window (Wang et al. 2004; MONAI's default), shrunk for grids smaller than 11.
_SSIM_WINDOW = 11


class GateError(ValueError):
    """A gate computation that cannot run. One line: what is wrong and how to fix it."""


@dataclass(frozen=True)
class ThresholdPolicy:
    """How a site sets its threshold: ``fixed`` at ``value``, or ``calibrated`` at a percentile."""

    policy: str = "calibrated"
    value: float | None = None
    percentile: float = 5.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise GateError(f"threshold policy must be one of {', '.join(POLICIES)} "
                            f"(got {self.policy!r})")
        if self.policy == "fixed" and (self.value is None or not math.isfinite(self.value)
                                       or self.value < 0):
            raise GateError(f"a fixed threshold needs a finite value >= 0 (got {self.value!r}); "
                            f"set release.threshold.value")
        if not 0 < self.percentile < 100:
            raise GateError(f"threshold percentile must be in (0, 100) (got {self.percentile})")

    @classmethod
    def from_config(cls, threshold: Any) -> "ThresholdPolicy":
        """From a ``ThresholdConfig``-like object (policy, value, percentile)."""
        value = None if threshold.value is None else float(threshold.value)
        return cls(str(threshold.policy), value, float(threshold.percentile))

    def describe(self) -> str:
        if self.policy == "fixed":
            return f"fixed at {self.value:g}"
        return (f"calibrated at each site: the {self.percentile:g}th percentile of the distances "
                f"between each scan and the nearest scan of a different patient")

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "value": self.value, "percentile": self.percentile}


@dataclass(frozen=True)
class NearestScans:
    """Per candidate: the distance to the nearest scan (float64 (N,)), that scan's index into the
    bank (int64 (N,), -1 when every pair was excluded) and the translation that reached it."""

    distance: np.ndarray
    index: np.ndarray
    offset: list[Offset]


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise GateError(f"release.distance must be one of {', '.join(DISTANCES)} "
                        f"(got {distance!r})")
    return distance


def translations(max_shift: int) -> tuple[Offset, ...]:
    """Every integer offset with ``|o_i| <= max_shift`` per axis, (0, 0, 0) first: (2k+1)^3."""
    if max_shift < 0:
        raise GateError(f"max_shift must be >= 0 (got {max_shift})")
    span = range(-max_shift, max_shift + 1)
    offsets = sorted(itertools.product(span, span, span), key=lambda o: (sum(map(abs, o)), o))
    return tuple(offsets)


def shifted(volumes: torch.Tensor, offset: Offset) -> torch.Tensor:
    """Volumes (..., D, H, W) translated circularly by ``offset`` voxels along (D, H, W)."""
    if not any(offset):
        return volumes
    return torch.roll(volumes, shifts=tuple(offset), dims=(-3, -2, -1))


def views_of(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, D, H, W) as single-view candidates (N, 1, C, D, H, W)."""
    if images.ndim != 5:
        raise GateError(f"expected volumes (N, C, D, H, W), got shape {tuple(images.shape)}")
    return images[:, None]


@torch.no_grad()
def latent_views(autoencoder: torch.nn.Module, images: torch.Tensor, latent_scale_factor: float,
                 offsets: Sequence[Offset] = NO_SHIFT, batch_size: int = 8) -> torch.Tensor:
    """Embeddings of every translate of every image by the frozen public encoder.

    images (N, 1, D, H, W) -> (N, T, Cz, d, h, w), T = len(offsets), scaled by
    ``latent_scale_factor`` (the posterior mean for KL, the quantised embedding for VQ:
    :func:`models.autoencoder.encode_latents`).
    """
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    per_offset = []
    for offset in offsets:
        latents = []
        for start in range(0, images.shape[0], batch_size):
            batch = shifted(images[start:start + batch_size], offset).to(device)
            latents.append(encode_latents(autoencoder, batch).cpu())
        per_offset.append(torch.cat(latents) * float(latent_scale_factor))
    return torch.stack(per_offset, dim=1)


class _SSIMDistance:
    """``1 - SSIM`` of every (query, scan) pair of two blocks, ``chunk_size`` pairs per call."""

    def __init__(self, spatial: Sequence[int], chunk_size: int):
        window = min(_SSIM_WINDOW, min(spatial))
        window -= 1 - window % 2  # odd
        if window < 3:
            raise GateError(f"SSIM needs volumes of at least 3 voxels per side "
                            f"(got {list(spatial)}); use release.distance: nrmse")
        self.metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=window,
                                 reduction="none")
        self.chunk_size = chunk_size

    def __call__(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        a, b = queries.shape[0], bank.shape[0]
        pairs_q = torch.arange(a, device=queries.device).repeat_interleave(b)
        pairs_s = torch.arange(b, device=queries.device).repeat(a)
        values = []
        for start in range(0, a * b, self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            ssim = self.metric(y_pred=queries[pairs_q[rows]].float(),
                               y=bank[pairs_s[rows]].float())
            values.append(torch.as_tensor(ssim).reshape(-1).to(torch.float64))
            self.metric.reset()
        return (1.0 - torch.cat(values)).reshape(a, b)


def nearest_scans(candidates: torch.Tensor | ViewSource, bank: torch.Tensor | ScanIndex,
                  distance: str, *, offsets: Sequence[Offset] = NO_SHIFT, chunk_size: int = 64,
                  candidate_groups: Sequence[int] | None = None,
                  bank_groups: Sequence[int] | None = None, num_candidates: int | None = None,
                  device: torch.device | str | None = None,
                  progress: bool = False) -> NearestScans:
    """For each candidate, the distance to its nearest scan in ``bank``.

    candidates: views (N, T, C, *S) - the minimum is taken over the T views (latent translates)
    and over ``offsets`` (circular translations applied to every view, image space) - or a
    callable ``(start, stop) -> views`` with ``num_candidates`` given (computed block by block);
    bank: (R, C, *S), the site's scans (or their embeddings), or a prepared
    :class:`~privacy.nearest_scan.ScanIndex` of them.
    ``candidate_groups`` (N,) and ``bank_groups`` (R,): pairs in the same group are skipped (the
    calibration's "a different patient"). Blocks of at most ``chunk_size`` views.

    ``latent`` and ``nrmse`` use the exact search of :mod:`privacy.nearest_scan` (int8 bounds
    for every pair, float32 bounds and float64 only where the cheaper bound cannot decide; same
    distances as brute force), on ``device`` (default: the bank's);
    ``ssim`` has no such bound and compares every pair.
    """
    check_distance(distance)
    if chunk_size <= 0:
        raise GateError(f"chunk_size must be > 0 (got {chunk_size})")
    if distance == "ssim":
        if not isinstance(candidates, torch.Tensor):
            raise GateError("the ssim distance needs the candidate views as a tensor")
        scans = bank.bank if isinstance(bank, ScanIndex) else bank
        return brute_force_nearest_scans(candidates, scans, distance, offsets=offsets,
                                         chunk_size=chunk_size, candidate_groups=candidate_groups,
                                         bank_groups=bank_groups, progress=progress)
    index = bank if isinstance(bank, ScanIndex) else ScanIndex(bank, device=device)
    if isinstance(candidates, torch.Tensor):
        if candidates.ndim < 3 or candidates.shape[2:] != index.bank.shape[1:]:
            expected = ", ".join(map(str, index.bank.shape[1:]))
            raise GateError(f"candidate views {tuple(candidates.shape)} do not match the site's "
                            f"scans {tuple(index.bank.shape)}: expected (N, T, {expected})")
        num_candidates = candidates.shape[0]
    elif num_candidates is None:
        raise GateError("candidate views computed on demand need num_candidates")
    with tqdm(total=num_candidates, desc="gate distances", unit="candidate",
              disable=None if progress else True, leave=False) as bar:
        try:
            found = index.search(candidates, num_candidates, offsets=offsets,
                                 chunk_size=chunk_size, query_groups=candidate_groups,
                                 bank_groups=bank_groups, progress=bar.update)
        except ValueError as err:
            raise GateError(str(err)) from None
    offset_of = [tuple(offsets[int(j) // found.views_per_offset]) if i >= 0 else NO_SHIFT[0]
                 for i, j in zip(found.index, found.view)]
    return NearestScans(found.distance, found.index, offset_of)


def brute_force_nearest_scans(candidates: torch.Tensor, bank: torch.Tensor, distance: str, *,
                  offsets: Sequence[Offset] = NO_SHIFT, chunk_size: int = 64,
                  candidate_groups: Sequence[int] | None = None,
                  bank_groups: Sequence[int] | None = None,
                  progress: bool = False) -> NearestScans:
    """Reference: every candidate-scan pair, block by block (``ssim``, and tests/benchmarks).

    candidates: views (N, T, C, *S) - the minimum is taken over the T views (latent translates)
    and over ``offsets`` (circular translations applied to every view, image space);
    bank: (R, C, *S), the site's scans (or their embeddings).
    ``candidate_groups`` (N,) and ``bank_groups`` (R,): pairs in the same group are skipped (the
    calibration's "a different patient"). Blocks of at most ``chunk_size`` views and scans.
    """
    check_distance(distance)
    if candidates.ndim < 3 or candidates.shape[2:] != bank.shape[1:]:
        expected = ", ".join(map(str, bank.shape[1:]))
        raise GateError(f"candidate views {tuple(candidates.shape)} do not match the site's scans "
                        f"{tuple(bank.shape)}: expected (N, T, {expected})")
    if chunk_size <= 0:
        raise GateError(f"chunk_size must be > 0 (got {chunk_size})")
    n, views = candidates.shape[:2]
    device = bank.device
    best = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    best_index = torch.full((n,), -1, dtype=torch.long, device=device)
    best_offset = [NO_SHIFT[0]] * n
    if n == 0 or bank.shape[0] == 0:
        return NearestScans(best.cpu().numpy(), best_index.cpu().numpy(), best_offset)
    grouped = candidate_groups is not None and bank_groups is not None
    if grouped:
        groups_q = torch.as_tensor(list(candidate_groups), device=device)
        groups_b = torch.as_tensor(list(bank_groups), device=device)
    ssim = _SSIMDistance(bank.shape[2:], chunk_size) if distance == "ssim" else None
    flat_bank = bank.reshape(bank.shape[0], -1).to(torch.float64)
    bank_norm = flat_bank.norm(dim=1)
    query_rows = max(1, chunk_size // views)  # candidates per block: <= chunk_size views in it
    blocks = [(offset, q0, b0) for offset in offsets for q0 in range(0, n, query_rows)
              for b0 in range(0, bank.shape[0], chunk_size)]
    for offset, q0, b0 in tqdm(blocks, desc="gate distances", unit="block",
                               disable=None if progress else True, leave=False):
        q1, b1 = min(q0 + query_rows, n), min(b0 + chunk_size, bank.shape[0])
        block = shifted(candidates[q0:q1].to(device), offset)            # (q, T, C, *S)
        flat = block.reshape((q1 - q0) * views, *block.shape[2:])
        if ssim is None:
            flat = flat.reshape(flat.shape[0], -1).to(torch.float64)
            d = relative_l2(flat, flat_bank[b0:b1], bank_norm[b0:b1])
        else:
            d = ssim(flat, bank[b0:b1])
        d = d.reshape(q1 - q0, views, b1 - b0).amin(dim=1)                # best view per pair
        if grouped:
            d = d.masked_fill(groups_q[q0:q1, None] == groups_b[None, b0:b1], math.inf)
        value, where = d.min(dim=1)
        better = value < best[q0:q1]
        best[q0:q1] = torch.where(better, value, best[q0:q1])
        best_index[q0:q1] = torch.where(better, where + b0, best_index[q0:q1])
        for i in torch.nonzero(better).flatten().tolist():
            best_offset[q0 + i] = tuple(offset)
    return NearestScans(best.cpu().numpy(), best_index.cpu().numpy(), best_offset)


def between_patient_distances(views: torch.Tensor | ViewSource, bank: torch.Tensor | ScanIndex,
                              patients: Sequence[str], distance: str, *,
                              offsets: Sequence[Offset] = NO_SHIFT, chunk_size: int = 64,
                              device: torch.device | str | None = None,
                              progress: bool = False) -> np.ndarray:
    """For every scan, the distance to the nearest scan of a DIFFERENT patient: float64 (M,).

    views (M, T, C, *S) are the scans as queries (their translates in latent space; or a callable
    ``(start, stop) -> views`` computing them block by block), bank (M, C, *S) the same scans as
    references (or their :class:`~privacy.nearest_scan.ScanIndex`), ``patients`` (M,) their
    patient ids. Needs two patients or more. Exact, same kernel as :func:`nearest_scans`.
    """
    if len(set(patients)) < 2:
        raise GateError(f"calibrating a threshold needs scans of at least 2 patients (got "
                        f"{len(set(patients))}); add patients or use "
                        f"release.threshold.policy: fixed")
    codes = {pid: i for i, pid in enumerate(dict.fromkeys(patients))}
    groups = [codes[p] for p in patients]
    return nearest_scans(views, bank, distance, offsets=offsets, chunk_size=chunk_size,
                         candidate_groups=groups, bank_groups=groups, num_candidates=len(groups),
                         device=device, progress=progress).distance


def calibrated_threshold(distances: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of between-patient nearest-neighbour distances (linear interpolation)."""
    distances = np.asarray(distances, dtype=np.float64)
    distances = distances[np.isfinite(distances)]
    if distances.size == 0:
        raise GateError("no between-patient distance to calibrate on; the site needs scans of "
                        "at least 2 patients")
    return float(np.percentile(distances, percentile))


def decide(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Pass (True) where a candidate's nearest-scan distance is at or above ``threshold``."""
    return np.asarray(distances, dtype=np.float64) >= float(threshold)


def summary(distances: np.ndarray) -> dict[str, float]:
    """Quantiles of a distance sample, for the site's local log (never sent)."""
    values = np.asarray(distances, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    q = np.percentile(values, [0, 5, 25, 50, 75, 100])
    return {"n": int(values.size), "min": float(q[0]), "p5": float(q[1]), "p25": float(q[2]),
            "median": float(q[3]), "p75": float(q[4]), "max": float(q[5])}


# --- what crosses the wire (record names and allowed keys: privacy.protocol) ---------------------

class GateStatus(str, Enum):
    """How a site answered a gate query. Every answer is a normal reply, never an error."""

    OK = "ok"                            # answered: a pass/fail per candidate is attached
    REFUSED = "refused"                  # not answered; ``reason`` says why (a fixed code)
    BUDGET_EXHAUSTED = "budget-exhausted"  # DP gate: the charge would take the site past its cap


class GateRefusal(str, Enum):
    """Fixed reason codes of a refused gate query (the details stay in the site's log)."""

    NONE = ""
    TOO_FEW_PATIENTS = "too-few-patients"  # calibration needs scans of two patients or more
    LEDGER_DAMAGED = "ledger-damaged"      # DP gate: the site's ledger failed its chain check
    ROLLBACK_ALARM = "rollback-alarm"      # DP gate: a ledger rollback alarm is pending
    LEDGER_ROLLBACK = "ledger-rollback"    # the ledger lacks an entry the consortium saw
    NO_SITE_BUDGET = "no-site-budget"      # DP gate: a deployed site's own config sets no budget
    PROTOCOL_MISMATCH = "protocol-mismatch"  # malformed query or another protocol version
    MODEL_MISMATCH = "model-mismatch"      # candidates or autoencoder do not match their hashes
    SITE_ERROR = "site-error"              # anything else


_NUMBER = (int, float)


@dataclass(frozen=True)
class GateQuery:
    """A gate query (server -> site), sent with the candidates' views.

    ``data`` is the consortium grid (shape, spacing, label_names, intensity_percentiles) the site
    preprocesses its scans to; ``autoencoder`` (latent distance only) the public autoencoder's
    config section, whose weights travel in the query's ``autoencoder`` ArrayRecord with hash
    ``autoencoder_sha256``. ``candidates_sha256`` is :func:`privacy.outbox.weights_hash` of
    ``{"views": views}``. ``default_target_epsilon``/``default_delta``: the consortium's default
    budget, which only a simulated site whose config sets none takes, and only until a cap is
    locked in its ledger (DP gate only; :func:`privacy.budget.resolve_cap`). ``expected_heads``
    maps each site id to the ``(seq, hash)`` of the newest entry of its ledger the consortium has
    seen (train replies and gate answers): a site whose ledger lacks it was rolled back and refuses.
    """

    query_id: str
    distance: str
    threshold: ThresholdPolicy
    max_shift: int
    chunk_size: int
    num_candidates: int
    candidates_sha256: str
    data: dict[str, Any]
    model_sha256: str
    autoencoder: dict[str, Any] = field(default_factory=dict)
    autoencoder_sha256: str = ""
    latent_scale_factor: float = 1.0
    dp_enabled: bool = False
    dp_epsilon: float = 0.0
    default_target_epsilon: float = 10.0
    default_delta: float = 1e-5
    expected_heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION

    def to_record(self) -> dict[str, Any]:
        """ConfigRecord content: scalars as is, nested values as canonical JSON strings."""
        return {"protocol": self.protocol, "query-id": self.query_id, "distance": self.distance,
                "expected-heads": compact_json({k: [int(s), str(h)]
                                                for k, (s, h) in self.expected_heads.items()}),
                "threshold": compact_json(self.threshold.to_json()), "max-shift": int(self.max_shift),
                "chunk-size": int(self.chunk_size), "num-candidates": int(self.num_candidates),
                "candidates-sha256": self.candidates_sha256, "data": compact_json(self.data),
                "model-sha256": self.model_sha256, "autoencoder": compact_json(self.autoencoder),
                "autoencoder-sha256": self.autoencoder_sha256,
                "latent-scale-factor": float(self.latent_scale_factor),
                "dp-enabled": bool(self.dp_enabled), "dp-epsilon": float(self.dp_epsilon),
                "default-target-epsilon": float(self.default_target_epsilon),
                "default-delta": float(self.default_delta)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "GateQuery":
        """Parse :meth:`to_record` output; :class:`ProtocolViolation` names a missing/bad key."""
        protocol = record_field(record, "protocol", int)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolViolation(f"gate-config.protocol: the server speaks protocol {protocol}, "
                                    f"this site {PROTOCOL_VERSION}; run the same fedsynth version "
                                    f"at both ends")
        threshold = record_json_field(record, "threshold")
        try:
            policy = ThresholdPolicy(str(threshold["policy"]), threshold["value"],
                                     float(threshold["percentile"]))
            distance = check_distance(record_field(record, "distance", str))
        except (GateError, KeyError, TypeError) as err:
            raise ProtocolViolation(f"gate-config: bad distance or threshold ({err})") from None
        return cls(
            query_id=record_field(record, "query-id", str), distance=distance, threshold=policy,
            max_shift=record_field(record, "max-shift", int),
            chunk_size=record_field(record, "chunk-size", int),
            num_candidates=record_field(record, "num-candidates", int),
            candidates_sha256=record_field(record, "candidates-sha256", str),
            data=record_json_field(record, "data"), model_sha256=record_field(record, "model-sha256", str),
            autoencoder=record_json_field(record, "autoencoder"),
            autoencoder_sha256=record_field(record, "autoencoder-sha256", str),
            latent_scale_factor=float(record_field(record, "latent-scale-factor", _NUMBER)),
            dp_enabled=record_field(record, "dp-enabled", bool),
            dp_epsilon=float(record_field(record, "dp-epsilon", _NUMBER)),
            default_target_epsilon=float(record_field(record, "default-target-epsilon", _NUMBER)),
            default_delta=float(record_field(record, "default-delta", _NUMBER)),
            expected_heads={str(k): (int(v[0]), str(v[1]))
                            for k, v in record_json_field(record, "expected-heads").items()},
            protocol=protocol)


@dataclass(frozen=True)
class GateAnswer:
    """A site's answer without the pass/fail array: status, counts, DP-gate accounting figures.

    Nothing here depends on the scans except the count of passes (which the pass/fail array gives
    anyway): no distance, no threshold, no statistic of the data. ``epsilon_*`` are accounting
    figures of the site's own ledger: this query's DP-gate charge (0 without the DP gate), the
    site's DP-gate total, and its DP-SGD + DP-gate total.
    """

    status: GateStatus
    site_id: str
    query_id: str
    reason: GateRefusal = GateRefusal.NONE
    num_candidates: int = 0
    num_passed: int = 0
    epsilon_charged: float = 0.0
    epsilon_gate: float = 0.0
    epsilon_total: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    ledger_seq: int = 0
    ledger_head: str = ""
    replayed: bool = False

    def accounting(self) -> dict[str, int | float]:
        """MetricRecord content (every key in :data:`privacy.protocol.GATE_ACCOUNTING_KEYS`)."""
        return {"num-candidates": int(self.num_candidates), "num-passed": int(self.num_passed),
                "epsilon-charged": float(self.epsilon_charged),
                "epsilon-gate": float(self.epsilon_gate),
                "epsilon-total": float(self.epsilon_total),
                "target-epsilon": float(self.target_epsilon), "delta": float(self.delta)}

    def status_fields(self) -> dict[str, int | str | bool]:
        """ConfigRecord content (every key in :data:`privacy.protocol.GATE_STATUS_KEYS`)."""
        return {"protocol": PROTOCOL_VERSION, "status": self.status.value,
                "reason": self.reason.value, "site-id": self.site_id, "query-id": self.query_id,
                "ledger-seq": int(self.ledger_seq), "ledger-head": self.ledger_head,
                "replayed": bool(self.replayed)}

    @classmethod
    def from_records(cls, accounting: Mapping[str, Any], status: Mapping[str, Any]) -> "GateAnswer":
        """Parse the two records of an answer (after :func:`check_gate_reply`)."""
        try:
            gate_status = GateStatus(record_field(status, "status", str))
            reason = GateRefusal(record_field(status, "reason", str))
        except ValueError as err:
            raise ProtocolViolation(f"gate-status.status/reason: unknown code ({err})") from None
        return cls(status=gate_status, reason=reason, site_id=record_field(status, "site-id", str),
                   query_id=record_field(status, "query-id", str),
                   num_candidates=int(record_field(accounting, "num-candidates", _NUMBER)),
                   num_passed=int(record_field(accounting, "num-passed", _NUMBER)),
                   epsilon_charged=float(record_field(accounting, "epsilon-charged", _NUMBER)),
                   epsilon_gate=float(record_field(accounting, "epsilon-gate", _NUMBER)),
                   epsilon_total=float(record_field(accounting, "epsilon-total", _NUMBER)),
                   target_epsilon=float(record_field(accounting, "target-epsilon", _NUMBER)),
                   delta=float(record_field(accounting, "delta", _NUMBER)),
                   ledger_seq=int(record_field(status, "ledger-seq", int)),
                   ledger_head=record_field(status, "ledger-head", str),
                   replayed=bool(record_field(status, "replayed", bool)))

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["status"], values["reason"] = self.status.value, self.reason.value
        return values


GATE_REPLY_RECORDS: dict[str, str] = {GATE_PASSED: ARRAYS, GATE_ACCOUNTING: METRICS,
                                      GATE_STATUS: CONFIG}


def check_gate_reply(records: Mapping[str, tuple[str, Mapping[str, Any]]],
                     num_candidates: int) -> None:
    """Refuse a gate answer that holds anything outside the allow-list.

    ``records`` maps each record name to ``(kind, content)``: ``"arrays"`` with ``{name: shape}``,
    ``"metrics"``/``"config"`` with ``{key: value}``. Allowed: the pass/fail array (``passed``,
    shape ``(num_candidates,)``, 'ok' answers only), the counts and accounting figures of
    :data:`~privacy.protocol.GATE_ACCOUNTING_KEYS` and the codes of
    :data:`~privacy.protocol.GATE_STATUS_KEYS`. Raises :class:`ProtocolViolation`.
    """
    for name, (kind, _) in records.items():
        expected = GATE_REPLY_RECORDS.get(name)
        if expected is None:
            raise ProtocolViolation(f"gate answer record {name!r} is not allowed to leave a site "
                                    f"(allowed: {sorted(GATE_REPLY_RECORDS)})")
        if kind != expected:
            raise ProtocolViolation(f"gate answer record {name!r} must be a {expected} record "
                                    f"(got {kind})")
    if GATE_ACCOUNTING not in records or GATE_STATUS not in records:
        raise ProtocolViolation(f"a gate answer needs the {GATE_ACCOUNTING!r} and "
                                f"{GATE_STATUS!r} records")
    for name, allowed in ((GATE_ACCOUNTING, GATE_ACCOUNTING_KEYS), (GATE_STATUS, GATE_STATUS_KEYS)):
        keys = set(records[name][1])
        if keys != allowed:
            raise ProtocolViolation(f"gate answer record {name!r}: keys not allowed "
                                    f"{sorted(keys - allowed)}, missing {sorted(allowed - keys)}")
    check_accounting_numbers(GATE_ACCOUNTING, records[GATE_ACCOUNTING][1])
    ok = records[GATE_STATUS][1].get("status") == GateStatus.OK.value
    if ok != (GATE_PASSED in records):
        raise ProtocolViolation("an 'ok' gate answer must carry the pass/fail array, any other "
                                "must not")
    if ok:
        arrays = dict(records[GATE_PASSED][1])
        if set(arrays) != {"passed"} or tuple(arrays["passed"]) != (int(num_candidates),):
            raise ProtocolViolation(f"gate-passed: must hold exactly one array 'passed' of shape "
                                    f"({num_candidates},) (got {arrays})")
