"""The consortium's ledger: the server's hash-chained mirror of every site's reported spend.

Same file format as a site's ledger (:mod:`privacy.ledger`: canonical JSON lines, each entry carrying
the previous entry's hash, fsync'd appends, a head record). Entry kinds and their payloads:

- ``federation-start``: the run's identity (config and starting checkpoint hashes, planned rounds);
- ``site-round``: one site's reply in one round, as reported: status, reason code, cumulative
  epsilon, the mechanism (sigma, q, steps), patients, and the head ``(seq, hash)`` of the SITE's
  ledger after the round - what :mod:`server.reconcile` later compares with the site's own ledger;
- ``site-gate``: one site's answer to one release-gate query, as reported: status, reason code, the
  DP-gate charge and the site's totals after it (DP-SGD + gate), and the head ``(seq, hash)`` of the
  SITE's ledger after the answer - so a site ledger restored from before its gate charges is caught
  by :mod:`server.reconcile` and by the site itself (the next query's expected head);
- ``site-failure``: a site (node) that failed or did not answer in time;
- ``round``: the round closed - ``aggregated`` (with the new global weights' hash and the sites that
  took part) or ``failed`` (fewer than ``federation.min_sites`` trained; the global model is unchanged);
- ``resume``: the server restarted from its checkpoint at ``checkpoint_seq``. Entries after that
  position and before this entry describe a round whose checkpoint was never written; they are
  kept (the sites did report them) but are *superseded*: that round is run again and recorded anew;
- ``federation-end``: why the run stopped.

Because sites report their CUMULATIVE epsilon and their ledger head, mirroring a reply twice (a
superseded round and its rerun) never double-counts a spend.

A site that released non-private weights reports epsilon = +inf; the ledger's JSON holds no
non-finite number, so an infinite figure is written as the string ``"Infinity"`` (``float()`` reads
it back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from privacy.ledger import Ledger, LedgerEntry, LedgerError
from privacy.protocol import TrainReply
from privacy.site_ledger import fedsynth_version, utc_timestamp

START, SITE_ROUND, SITE_GATE, SITE_FAILURE, ROUND, RESUME, END = (
    "federation-start", "site-round", "site-gate", "site-failure", "round", "resume",
    "federation-end")
KINDS = (START, SITE_ROUND, SITE_GATE, SITE_FAILURE, ROUND, RESUME, END)


@dataclass(frozen=True)
class SiteReport:
    """A ``site-round`` entry, decoded."""

    seq: int                 # of the consortium entry
    round: int
    site_id: str
    status: str
    reason: str
    epsilon: float
    target_epsilon: float
    site_ledger_seq: int
    site_ledger_head: str
    superseded: bool


@dataclass(frozen=True)
class GateReport:
    """A ``site-gate`` entry, decoded: one site's answer to one gate query."""

    seq: int                 # of the consortium entry
    query_id: str
    site_id: str
    status: str
    reason: str
    epsilon_charged: float
    epsilon_total: float
    site_ledger_seq: int
    site_ledger_head: str
    replayed: bool


@dataclass(frozen=True)
class ConsortiumView:
    """A verified read of the consortium ledger."""

    entries: list[LedgerEntry]
    superseded: frozenset[int] = field(default_factory=frozenset)

    def effective(self, kind: str | None = None) -> list[LedgerEntry]:
        """Entries that are not superseded (of ``kind`` if given), in order."""
        return [e for e in self.entries
                if e.seq not in self.superseded and (kind is None or e.kind == kind)]

    def site_reports(self, site_id: str | None = None) -> list[SiteReport]:
        """Every ``site-round`` entry (superseded ones flagged), of one site if given."""
        reports = []
        for entry in self.entries:
            if entry.kind != SITE_ROUND:
                continue
            p = entry.payload
            if site_id is not None and p["site_id"] != site_id:
                continue
            reports.append(SiteReport(entry.seq, int(p["round"]), str(p["site_id"]), str(p["status"]),
                                      str(p["reason"]), float(p["epsilon"]), float(p["target_epsilon"]),
                                      int(p["site_ledger_seq"]), str(p["site_ledger_head"]),
                                      entry.seq in self.superseded))
        return reports

    def gate_reports(self, site_id: str | None = None) -> list[GateReport]:
        """Every ``site-gate`` entry (of one site if given), in order."""
        reports = []
        for entry in self.entries:
            if entry.kind != SITE_GATE:
                continue
            p = entry.payload
            if site_id is not None and p["site_id"] != site_id:
                continue
            reports.append(GateReport(entry.seq, str(p["query_id"]), str(p["site_id"]),
                                      str(p["status"]), str(p["reason"]),
                                      float(p["epsilon_charged"]), float(p["epsilon_total"]),
                                      int(p["site_ledger_seq"]), str(p["site_ledger_head"]),
                                      bool(p["replayed"])))
        return reports

    def site_ids(self) -> list[str]:
        return sorted({r.site_id for r in self.site_reports()} |
                      {r.site_id for r in self.gate_reports()})

    def expected_heads(self) -> dict[str, tuple[int, str]]:
        """Per site, the newest ledger head it reported in a train reply or a gate answer
        (superseded reports count: the sites did commit those entries)."""
        heads: dict[str, tuple[int, str]] = {}
        for report in [*self.site_reports(), *self.gate_reports()]:
            if report.site_ledger_seq > heads.get(report.site_id, (0, ""))[0]:
                heads[report.site_id] = (report.site_ledger_seq, report.site_ledger_head)
        return heads

    def completed_rounds(self) -> list[int]:
        """Rounds closed as ``aggregated`` (not superseded), in order."""
        return [int(e.payload["round"]) for e in self.effective(ROUND)
                if e.payload["status"] == "aggregated"]

    def latest_epsilon(self) -> dict[str, float]:
        """Per site, the largest cumulative epsilon it reported (a spend only grows)."""
        latest: dict[str, float] = {}
        for report in self.site_reports():
            latest[report.site_id] = max(report.epsilon, latest.get(report.site_id, 0.0))
        for gate in self.gate_reports():
            latest[gate.site_id] = max(gate.epsilon_total, latest.get(gate.site_id, 0.0))
        return latest


def json_number(value: float) -> float | str:
    """``value`` as the ledger may hold it: finite numbers as they are, +inf as ``"Infinity"``."""
    return "Infinity" if value == math.inf else float(value)


def _superseded(entries: Iterable[LedgerEntry]) -> frozenset[int]:
    out: set[int] = set()
    for entry in entries:
        if entry.kind == RESUME:
            start = int(entry.payload["checkpoint_seq"])
            out.update(range(start + 1, entry.seq))
    return frozenset(out)


class ConsortiumLedger:
    """Typed appends to (and verified reads of) the consortium ledger file."""

    def __init__(self, path: Path | str):
        self.ledger = Ledger(path)

    @property
    def path(self) -> Path:
        return self.ledger.path

    def view(self) -> ConsortiumView:
        """Verify the chain and decode it; :class:`privacy.ledger.LedgerError` on any problem."""
        entries = self.ledger.entries()
        unknown = [e for e in entries if e.kind not in KINDS]
        if unknown:
            raise LedgerError(f"{self.path}: seq {unknown[0].seq} has kind {unknown[0].kind!r}, which a "
                              f"consortium ledger does not hold; is this a site's ledger?")
        return ConsortiumView(entries, _superseded(entries))

    def head(self) -> tuple[int, str]:
        entries = self.ledger.entries()
        return (entries[-1].seq, entries[-1].hash) if entries else (0, "")

    def _append(self, kind: str, payload: dict[str, Any]) -> LedgerEntry:
        return self.ledger.append(kind, {**payload, "timestamp": utc_timestamp()})

    def record_start(self, *, config_sha256: str, checkpoint_sha256: str, planned_rounds: int,
                     sites: list[str]) -> LedgerEntry:
        return self._append(START, {"config_sha256": config_sha256, "checkpoint_sha256": checkpoint_sha256,
                                    "planned_rounds": int(planned_rounds), "sites": list(sites),
                                    "fedsynth_version": fedsynth_version()})

    def record_site(self, round: int, node_id: int, reply: TrainReply) -> LedgerEntry:
        return self._append(SITE_ROUND, {
            "round": int(round), "node_id": str(node_id), "site_id": reply.site_id,
            "status": reply.status.value, "reason": reply.reason.value,
            "epsilon": json_number(reply.epsilon), "epsilon_next": json_number(reply.epsilon_next),
            "target_epsilon": json_number(reply.target_epsilon),
            "delta": reply.delta, "noise_multiplier": reply.noise_multiplier,
            "sample_rate": reply.sample_rate, "steps": reply.steps, "num_patients": reply.num_patients,
            "site_ledger_seq": reply.ledger_seq, "site_ledger_head": reply.ledger_head,
            "weights_sha256": reply.weights_sha256, "resumed": reply.resumed})

    def record_gate(self, node_id: int, answer: Any) -> LedgerEntry:
        """Mirror one gate answer (a :class:`privacy.gate.GateAnswer`)."""
        return self._append(SITE_GATE, {
            "query_id": answer.query_id, "node_id": str(node_id), "site_id": answer.site_id,
            "status": answer.status.value, "reason": answer.reason.value,
            "num_candidates": int(answer.num_candidates), "num_passed": int(answer.num_passed),
            "epsilon_charged": float(answer.epsilon_charged),
            "epsilon_gate": float(answer.epsilon_gate),
            "epsilon_total": json_number(answer.epsilon_total),
            "target_epsilon": json_number(answer.target_epsilon), "delta": float(answer.delta),
            "site_ledger_seq": int(answer.ledger_seq), "site_ledger_head": answer.ledger_head,
            "replayed": bool(answer.replayed)})

    def record_failure(self, round: int, node_id: int, site_id: str, error: str) -> LedgerEntry:
        return self._append(SITE_FAILURE, {"round": int(round), "node_id": str(node_id),
                                           "site_id": site_id, "error": error[:500]})

    def record_round(self, round: int, *, status: str, participants: list[str], global_sha256: str,
                     wall_seconds: float) -> LedgerEntry:
        return self._append(ROUND, {"round": int(round), "status": status, "participants": participants,
                                    "global_sha256": global_sha256, "wall_seconds": float(wall_seconds)})

    def record_resume(self, *, round: int, checkpoint_seq: int) -> LedgerEntry:
        return self._append(RESUME, {"round": int(round), "checkpoint_seq": int(checkpoint_seq)})

    def record_end(self, *, rounds_completed: int, reason: str) -> LedgerEntry:
        return self._append(END, {"rounds_completed": int(rounds_completed), "reason": reason})


def read_consortium_ledger(path: Path | str) -> ConsortiumView:
    """The verified content of the consortium ledger at ``path``."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"{path}: no such consortium ledger; the server writes it to "
                          f"RUN_DIR/federation/consortium_ledger.jsonl")
    return ConsortiumLedger(path).view()
