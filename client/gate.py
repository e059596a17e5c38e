"""The site's side of the release gate: answer a gate query with a pass/fail per candidate.

For a query (:class:`privacy.gate.GateQuery`) and its candidates' views, the site

1. checks the candidates (and, for the latent distance, the public autoencoder) against the
   hashes in the query;
2. answers a query it already answered (same query id, same candidates) with the SAME answer from
   its gate log, without computing or charging anything again (a resumed release re-sends its
   last query);
3. loads its scans with :func:`client.site_data.load_site` on the consortium grid (cached in
   memory), and embeds them with the received public encoder when the distance is ``latent``;
4. sets its threshold: the fixed value, or calibrated on its own data (a low percentile of the
   nearest-neighbour distances between scans of DIFFERENT patients, see :mod:`privacy.gate`);
5. measures each candidate's distance to its nearest scan (shift-tolerant) and passes it when
   that distance is at or above the threshold - or, with the DP gate, charges the site ledger
   first (refusing past the cap) and answers with AboveThreshold (:mod:`privacy.dp_gate`). Before
   anything, it checks that its ledger holds the entry the consortium last saw from it (the
   query's expected head); a rolled-back ledger raises the durable rollback alarm and refuses;
6. writes the EXACT distances, the nearest patient and the threshold to its local gate log
   (``gate_log.jsonl`` next to its ledger; never sent), and returns only the pass/fail array, the
   counts, and accounting figures from its own ledger (:class:`privacy.gate.GateAnswer`).

Every failure becomes a refusal with a fixed reason code; the details stay in the site's log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from client.site_data import SiteDataError, load_site
from configs.schema import DataConfig, SiteConfig
from models.autoencoder import build_autoencoder
from models.device import resolve_device
from privacy.budget import CapSetting, NoSiteBudget
from privacy.dp_gate import (GateBudgetExhausted, above_threshold, charge_gate, closeness,
                             noise_generator)
from privacy.durable import fsync_directory
from privacy.gate import (IMAGE_DISTANCES, NO_SHIFT, GateAnswer, GateError, GateQuery,
                          GateRefusal, GateStatus, between_patient_distances,
                          calibrated_threshold, decide, latent_views, nearest_scans, summary,
                          translations, views_of)
from privacy.ledger import Ledger, LedgerError
from privacy.nearest_scan import ScanIndex
from privacy.outbox import weights_hash
from privacy.packed_state import unpack_state
from privacy.rollback_guard import LedgerRollback, check_expected_head, pending_alarm
from privacy.site_ledger import SiteLedger, utc_timestamp
from privacy.spend import site_spend

log = logging.getLogger(__name__)

GATE_LOG_NAME = "gate_log.jsonl"
_CACHE_SIZE = 4


@dataclass(frozen=True)
class SiteScans:
    """The site's scans on the consortium grid: images (M, 1, D, H, W) in [0, 1], and per scan its
    patient id and image file name."""

    images: torch.Tensor
    patients: list[str]
    names: list[str]


@dataclass(frozen=True)
class GateReference:
    """What candidates are compared with: the bank (M, C, *S) (images or embeddings) prepared for
    the exact GEMM search, the offsets the site applies to candidates, the threshold and
    (calibrated) the calibration's quantiles."""

    bank: ScanIndex
    offsets: tuple[tuple[int, int, int], ...]
    threshold: float
    calibration: dict[str, float]


@dataclass(frozen=True)
class GateOutcome:
    """The answer and, for an 'ok' answer, the pass/fail array bool (N,)."""

    answer: GateAnswer
    passed: np.ndarray | None


class _Refusal(Exception):
    def __init__(self, reason: GateRefusal, status: GateStatus = GateStatus.REFUSED):
        super().__init__(reason.value)
        self.reason, self.status = reason, status


_scans: "OrderedDict[tuple, SiteScans]" = OrderedDict()
_references: "OrderedDict[tuple, GateReference]" = OrderedDict()


def gate_log_path(site: SiteConfig) -> Path:
    """``gate_log.jsonl`` in the site's state folder, next to its ledger."""
    return Path(site.ledger_path).parent / GATE_LOG_NAME


def _remember(cache: OrderedDict, key: tuple, value: Any) -> Any:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def data_config_of(data: Mapping[str, Any]) -> DataConfig:
    """The consortium grid of a gate query as a DataConfig."""
    return DataConfig(shape=tuple(int(s) for s in data["shape"]),
                      spacing=tuple(float(s) for s in data["spacing"]),
                      label_names=[str(n) for n in data["label_names"]],
                      intensity_percentiles=tuple(float(p) for p in data["intensity_percentiles"]))


def _site_key(site: SiteConfig, data: Mapping[str, Any]) -> tuple:
    return str(Path(site.data_dir).resolve()), site.manifest, json.dumps(data, sort_keys=True)


def load_scans(site: SiteConfig, data: Mapping[str, Any]) -> SiteScans:
    """The site's scans preprocessed to the query's grid (cached per site and grid)."""
    key = _site_key(site, data)
    if key in _scans:
        _scans.move_to_end(key)
        return _scans[key]
    dataset = load_site(site.data_dir, data_config_of(data), site.manifest)
    items = [dataset[i] for i in range(len(dataset))]
    scans = SiteScans(torch.stack([item["image"].float() for item in items]),
                      [item["patient_id"] for item in items],
                      [record.image.name for record in dataset.records])
    return _remember(_scans, key, scans)


def _reference(site: SiteConfig, query: GateQuery, scans: SiteScans,
               autoencoder: torch.nn.Module | None) -> GateReference:
    key = (*_site_key(site, query.data), query.distance, query.autoencoder_sha256,
           query.latent_scale_factor, query.max_shift,
           json.dumps(query.threshold.to_json(), sort_keys=True))
    if key in _references:
        _references.move_to_end(key)
        return _references[key]
    shifts = translations(query.max_shift)
    calibrated = query.threshold.policy == "calibrated"
    if query.distance in IMAGE_DISTANCES:
        bank, offsets, queries = scans.images, shifts, views_of(scans.images)
    else:
        scale = query.latent_scale_factor
        bank, offsets = latent_views(autoencoder, scans.images, scale)[:, 0], NO_SHIFT

        def queries(start: int, stop: int) -> torch.Tensor:
            # The scans' translates, embedded block by block as the calibration reaches them
            # (all of them at once would be 27x the bank).
            return latent_views(autoencoder, scans.images[start:stop], scale, shifts)
    calibration: dict[str, float] = {}
    index = ScanIndex(bank)  # built once per reference, used by calibration and every query
    if not calibrated:
        threshold = float(query.threshold.value)
    else:
        if len(set(scans.patients)) < 2:
            raise _Refusal(GateRefusal.TOO_FEW_PATIENTS)
        distances = between_patient_distances(queries, index, scans.patients, query.distance,
                                              offsets=offsets, chunk_size=query.chunk_size,
                                              progress=True)
        threshold = calibrated_threshold(distances, query.threshold.percentile)
        calibration = summary(distances)
    return _remember(_references, key, GateReference(index, offsets, threshold, calibration))


def _autoencoder(query: GateQuery, state: Mapping[str, torch.Tensor] | None
                 ) -> torch.nn.Module | None:
    if query.distance in IMAGE_DISTANCES:
        return None
    if state is None or weights_hash(state) != query.autoencoder_sha256:
        log.error("gate query %s: the autoencoder does not match its hash in the query",
                  query.query_id)
        raise _Refusal(GateRefusal.MODEL_MISMATCH)
    autoencoder = build_autoencoder(query.autoencoder)
    autoencoder.load_state_dict(dict(state))
    return autoencoder.requires_grad_(False).eval()


def _previous_answer(path: Path, query: GateQuery, site_id: str) -> GateOutcome | None:
    """The answer this site already gave to the same query (id and candidates), from its log.

    Keyed by the site too: sites that share a state folder (a research sweep) share the log."""
    if not path.exists():
        return None
    found = None
    with path.open() as stream:
        for line in stream:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that query was never answered
            if entry.get("query_id") == query.query_id and "answer" in entry and \
                    entry["answer"].get("site_id") == site_id and \
                    entry.get("candidates_sha256") == query.candidates_sha256:
                found = entry
    if found is None:
        return None
    answer = {**found["answer"], "replayed": True}
    answer["status"], answer["reason"] = GateStatus(answer["status"]), GateRefusal(answer["reason"])
    return GateOutcome(GateAnswer(**answer), np.asarray(found["passed"], dtype=bool))


def _append_log(path: Path, entry: Mapping[str, Any]) -> None:
    """One JSON line, appended with one write and fsync'd (a crash leaves at most a cut line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if created:
        fsync_directory(path.parent)


def _caps(site: SiteConfig, query: GateQuery,
          deployment: bool) -> tuple[CapSetting | None, CapSetting | None]:
    """The site's own cap setting, and the query's default (never taken in deployment)."""
    own = CapSetting(site.budget.target_epsilon, site.budget.delta) if site.budget else None
    consortium = None if deployment else CapSetting(query.default_target_epsilon,
                                                    query.default_delta)
    return own, consortium


def _ledger_figures(site: SiteConfig) -> dict[str, Any]:
    """Accounting figures of the site's ledger (:func:`privacy.spend.site_spend`: DP-SGD + DP
    gate, the cap in force, the head); {} when it cannot be read."""
    try:
        entries = Ledger(site.ledger_path).entries() if Path(site.ledger_path).exists() else []
        state = SiteLedger(site.ledger_path).state() if entries else None
    except (LedgerError, ValueError):
        return {}
    seq, head = (entries[-1].seq, entries[-1].hash) if entries else (0, "")
    figures: dict[str, Any] = {"ledger_seq": seq, "ledger_head": head}
    if state is not None and state.cap_in_force is not None:
        spend = site_spend(state)
        figures.update(epsilon_gate=spend.gate, epsilon_total=spend.total,
                       target_epsilon=state.cap,
                       delta=spend.delta if spend.delta is not None else state.cap_in_force[1])
    return figures


def _refused(site: SiteConfig, query: GateQuery, reason: GateRefusal,
             status: GateStatus = GateStatus.REFUSED, **figures: Any) -> GateOutcome:
    return GateOutcome(GateAnswer(status=status, reason=reason, site_id=site.site_id,
                                  query_id=query.query_id, num_candidates=query.num_candidates,
                                  **figures), None)


def _check_expected_head(site: SiteConfig, query: GateQuery) -> None:
    """Refuse (and raise the durable rollback alarm) when the site's ledger lacks the entry the
    consortium last saw from it (its newest train reply or gate answer)."""
    seq, digest = query.expected_heads.get(site.site_id, (0, ""))
    if seq <= 0:
        return
    try:
        entries = Ledger(site.ledger_path).entries() if Path(site.ledger_path).exists() else []
    except LedgerError as err:
        log.error("%s: refusing gate query %s: %s", site.site_id, query.query_id, err)
        raise _Refusal(GateRefusal.LEDGER_DAMAGED) from None
    try:
        check_expected_head(site.ledger_path, entries, seq, digest, 0)
    except LedgerRollback as err:
        log.error("%s: refusing gate query %s: %s", site.site_id, query.query_id, err)
        raise _Refusal(GateRefusal.LEDGER_ROLLBACK) from None


def _check_dp_ledger(site: SiteConfig, query: GateQuery) -> None:
    alarm = pending_alarm(site.ledger_path)
    if alarm is not None:
        log.error("%s: refusing DP gate query %s: a rollback alarm is pending (%s)", site.site_id,
                  query.query_id, alarm.describe())
        raise _Refusal(GateRefusal.ROLLBACK_ALARM)
    try:
        Ledger(site.ledger_path).entries()
    except LedgerError as err:
        log.error("%s: refusing DP gate query %s: %s", site.site_id, query.query_id, err)
        raise _Refusal(GateRefusal.LEDGER_DAMAGED) from None


def _answer(site: SiteConfig, query: GateQuery, views: torch.Tensor,
            autoencoder_state: Mapping[str, torch.Tensor] | None, deployment: bool = False
            ) -> tuple[GateOutcome, dict[str, Any]]:
    if views.shape[0] != query.num_candidates or \
            weights_hash({"views": views}) != query.candidates_sha256:
        log.error("%s: gate query %s: the candidates do not match the query's count or hash",
                  site.site_id, query.query_id)
        raise _Refusal(GateRefusal.MODEL_MISMATCH)
    _check_expected_head(site, query)
    if query.dp_enabled:
        _check_dp_ledger(site, query)
    autoencoder = _autoencoder(query, autoencoder_state)
    if autoencoder is not None:  # the site's own device embeds candidates and scans alike
        autoencoder.to(resolve_device(site.device))
    scans = load_scans(site, query.data)
    reference = _reference(site, query, scans, autoencoder)
    try:
        nearest = nearest_scans(views.float(), reference.bank, query.distance,
                                offsets=reference.offsets, chunk_size=query.chunk_size,
                                progress=True)
    except GateError as err:
        log.error("%s: gate query %s: %s", site.site_id, query.query_id, err)
        raise _Refusal(GateRefusal.PROTOCOL_MISMATCH) from None
    exact = decide(nearest.distance, reference.threshold)
    passed, charged = exact, None
    if query.dp_enabled:
        own, consortium = _caps(site, query, deployment)
        try:
            charged = charge_gate(site.ledger_path, query_id=query.query_id,
                                  epsilon=query.dp_epsilon, num_candidates=query.num_candidates,
                                  threshold_policy=query.threshold.policy,
                                  candidates_sha256=query.candidates_sha256, own=own,
                                  consortium=consortium, where=site.site_id)
        except GateBudgetExhausted as err:
            log.warning("%s: %s", site.site_id, err)
            raise _Refusal(GateRefusal.NONE, GateStatus.BUDGET_EXHAUSTED) from None
        except NoSiteBudget as err:
            log.error("%s: refusing DP gate query %s: %s", site.site_id, query.query_id, err)
            raise _Refusal(GateRefusal.NO_SITE_BUDGET) from None
        passed = above_threshold(closeness(nearest.distance, reference.threshold),
                                 query.dp_epsilon, noise_generator())
    answer = GateAnswer(status=GateStatus.OK, site_id=site.site_id, query_id=query.query_id,
                        num_candidates=query.num_candidates, num_passed=int(passed.sum()),
                        epsilon_charged=charged.epsilon if charged else 0.0,
                        **_ledger_figures(site))
    candidates = []
    for d, i, o, e, p in zip(nearest.distance, nearest.index, nearest.offset, exact, passed):
        candidates.append({"distance": float(d), "offset": list(o), "passed_exact": bool(e),
                           "passed": bool(p),
                           "nearest_patient": scans.patients[i] if i >= 0 else None,
                           "nearest_scan": scans.names[i] if i >= 0 else None})
    details = {"threshold_value": reference.threshold, "calibration": reference.calibration,
               "candidates": candidates}
    return GateOutcome(answer, passed), details


def answer_gate_query(site: SiteConfig, query: GateQuery, views: torch.Tensor,
                      autoencoder_state: Mapping[str, torch.Tensor] | None = None, *,
                      deployment: bool = False) -> GateOutcome:
    """Answer one gate query. Never raises: every outcome is a :class:`GateAnswer`.

    views: (N, T, C, *S) candidate views (images (N, 1, 1, D, H, W) for ``nrmse``/``ssim``,
    embeddings of T translates for ``latent``). See the module docstring for the steps.
    """
    started = time.perf_counter()
    log_path = gate_log_path(site)
    try:
        previous = _previous_answer(log_path, query, site.site_id)
    except OSError as err:
        log.warning("%s: cannot read the gate log %s (%s)", site.site_id, log_path, err)
        previous = None
    if previous is not None:
        log.info("%s: gate query %s was answered before; sending the same answer", site.site_id,
                 query.query_id)
        return previous
    details: dict[str, Any] = {}
    try:
        outcome, details = _answer(site, query, views, autoencoder_state, deployment)
    except _Refusal as refusal:
        outcome = _refused(site, query, refusal.reason, refusal.status, **_ledger_figures(site))
    except SiteDataError as err:
        log.error("%s: refusing gate query %s: %s", site.site_id, query.query_id, err)
        outcome = _refused(site, query, GateRefusal.SITE_ERROR)
    except Exception:  # noqa: BLE001 - the details stay in the site's log, never in the answer
        log.exception("%s: gate query %s failed", site.site_id, query.query_id)
        outcome = _refused(site, query, GateRefusal.SITE_ERROR)
    entry = {"timestamp": utc_timestamp(), "query_id": query.query_id,
             "candidates_sha256": query.candidates_sha256, "model_sha256": query.model_sha256,
             "distance": query.distance, "max_shift": query.max_shift,
             "threshold": query.threshold.to_json(),
             "dp_gate": {"enabled": query.dp_enabled, "epsilon": query.dp_epsilon},
             "seconds": time.perf_counter() - started, **details}
    if outcome.passed is not None:
        entry.update(answer=outcome.answer.to_json(), passed=[bool(p) for p in outcome.passed])
    else:
        entry.update(refused=outcome.answer.to_json())
    try:
        _append_log(log_path, entry)
    except OSError as err:
        # An answer the site cannot log is not given: the log is the site's record of what it said.
        log.error("%s: cannot write the gate log %s (%s); refusing", site.site_id, log_path, err)
        return _refused(site, query, GateRefusal.SITE_ERROR)
    log.info("%s: gate query %s: %s, %d of %d candidates passed", site.site_id, query.query_id,
             outcome.answer.status.value, outcome.answer.num_passed, query.num_candidates)
    return outcome


def answer_gate_message(site: SiteConfig, content: Any, *, deployment: bool = False) -> Any:
    """Flower glue: a gate query's RecordDict -> the answer's RecordDict (checked against the
    allow-list of :func:`privacy.gate.check_gate_reply` before it is returned)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from privacy.gate import check_gate_reply
    from privacy.protocol import (ARRAYS, CONFIG, GATE_ACCOUNTING, GATE_AUTOENCODER,
                                  GATE_CANDIDATES, GATE_CONFIG, GATE_PASSED, GATE_STATUS, METRICS,
                                  ProtocolViolation)

    try:
        query = GateQuery.from_record(dict(content[GATE_CONFIG]))
        views = content[GATE_CANDIDATES].to_torch_state_dict()["views"]
        autoencoder = unpack_state(content[GATE_AUTOENCODER]) \
            if GATE_AUTOENCODER in content else None
        outcome = answer_gate_query(site, query, views, autoencoder, deployment=deployment)
        num_candidates = query.num_candidates
    except (ProtocolViolation, KeyError) as err:
        log.error("%s: refusing a malformed gate query: %s", site.site_id, err)
        config = content.get(GATE_CONFIG, {}) if hasattr(content, "get") else {}
        query_id = str(config.get("query-id", "")) if hasattr(config, "get") else ""
        outcome = GateOutcome(GateAnswer(status=GateStatus.REFUSED, site_id=site.site_id,
                                         reason=GateRefusal.PROTOCOL_MISMATCH, query_id=query_id),
                              None)
        num_candidates = 0
    answer = outcome.answer
    layout: dict[str, tuple[str, Mapping[str, Any]]] = {
        GATE_ACCOUNTING: (METRICS, answer.accounting()),
        GATE_STATUS: (CONFIG, answer.status_fields())}
    records: dict[str, Any] = {GATE_ACCOUNTING: MetricRecord(answer.accounting()),
                               GATE_STATUS: ConfigRecord(answer.status_fields())}
    if outcome.passed is not None:
        passed = outcome.passed.astype(np.uint8)
        layout[GATE_PASSED] = (ARRAYS, {"passed": passed.shape})
        records[GATE_PASSED] = ArrayRecord({"passed": Array(passed)})
    check_gate_reply(layout, num_candidates)
    return RecordDict(records)
