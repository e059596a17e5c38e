"""Reconcile a site's own ledger with the consortium's mirror of it (``fedsynth audit reconcile``).

Every reply a site sent is mirrored in the consortium ledger with the head ``(seq, hash)`` of the
site's ledger at that time and the cumulative epsilon the site reported. For each such report:

- **rollback**: the site's ledger is shorter than the entry the consortium saw (entries were cut, or
  an older copy of the ledger was restored);
- **divergence**: the site's ledger holds a different entry at that position (it was rewritten), or
  the round entry there disagrees with what was reported (round number, epsilon; a
  ``non-private-round`` entry must have been reported with epsilon = +inf);
- the site's ledger failing its own chain check is reported as such (with the first bad line).

Every gate answer the consortium mirrored (``site-gate``) is checked the same way: the site's
ledger must hold the entry the answer named (else **rollback**: e.g. a ledger restored from before
its DP-gate charges), with the same hash (else **divergence**), and an answer that charged epsilon
must name that query's ``dp-gate`` entry with the reported total.

Round and DP-gate entries of the site that the consortium never mirrored (e.g. the server stopped
before it recorded a reply) are listed as notes: the site spent them, the consortium does not know
it yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from privacy.ledger import LedgerEntry, LedgerError, verify_ledger
from privacy.rollback_guard import AlarmNotResolved, clear_alarm, pending_alarm
from privacy.site_ledger import GateChargeRecord, NonPrivateRoundRecord, RoundRecord
from server.consortium_ledger import GateReport, SiteReport, read_consortium_ledger

ROLLBACK, DIVERGENCE, DAMAGED = "rollback", "divergence", "damaged"
# Site ledger entries that release weights: DP-SGD rounds and non-private rounds.
_RELEASES = frozenset({RoundRecord.kind, NonPrivateRoundRecord.kind})
# Site ledger entries that spend privacy: the releases and the DP-gate charges.
_SPENDS = _RELEASES | {GateChargeRecord.kind}
_EPSILON_TOLERANCE = 1e-9


class ReconcileError(ValueError):
    """The two ledgers cannot be compared. One line naming the file and the fix."""


@dataclass(frozen=True)
class Finding:
    kind: str           # rollback | divergence | damaged
    message: str


@dataclass
class ReconcileReport:
    site_id: str
    site_entries: int
    reports: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        verdict = "consistent" if self.ok else "MISMATCH"
        out = [f"site {self.site_id}: {verdict} ({self.site_entries} site ledger entries, "
               f"{self.reports} consortium reports)"]
        out += [f"  {f.kind.upper()}: {f.message}" for f in self.findings]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _check_gate(report: GateReport, entries: list[LedgerEntry]) -> Finding | None:
    seq = report.site_ledger_seq
    where = f"gate query {report.query_id} (consortium seq {report.seq})"
    if seq > len(entries):
        return Finding(ROLLBACK, f"the consortium saw site ledger entry seq {seq} in {where}, "
                                 f"reported total epsilon {report.epsilon_total:.4g}, but the site "
                                 f"ledger has only {len(entries)} entries: entries (DP-gate "
                                 f"charges) were cut or an older copy restored")
    entry = entries[seq - 1]
    if entry.hash != report.site_ledger_head:
        return Finding(DIVERGENCE, f"site ledger entry seq {seq} has hash {entry.hash[:12]}, the "
                                   f"site reported {report.site_ledger_head[:12]} in {where}: the "
                                   f"ledger was rewritten")
    if report.status == "ok" and report.epsilon_charged > 0:
        if entry.kind != GateChargeRecord.kind or entry.payload.get("query_id") != report.query_id:
            return Finding(DIVERGENCE, f"site ledger entry seq {seq} is not the DP-gate charge of "
                                       f"{where}")
        recorded = float(entry.payload.get("total_epsilon", -1.0))
        if recorded != report.epsilon_total and \
                not abs(recorded - report.epsilon_total) <= _EPSILON_TOLERANCE:
            return Finding(DIVERGENCE, f"{where}: the consortium mirrored total epsilon "
                                       f"{report.epsilon_total:.6g}, the site ledger records "
                                       f"{recorded:.6g}")
    return None


def _infer_site(reports: list, entries: list[LedgerEntry]) -> str | None:
    hashes = {e.hash for e in entries}
    matching = {r.site_id for r in reports if r.site_ledger_head in hashes}
    if len(matching) == 1:
        return matching.pop()
    sites = {r.site_id for r in reports}
    return sites.pop() if len(sites) == 1 else None


def _check_report(report: SiteReport, entries: list[LedgerEntry]) -> Finding | None:
    seq = report.site_ledger_seq
    where = f"round {report.round} (consortium seq {report.seq})"
    if seq > len(entries):
        return Finding(ROLLBACK, f"the consortium saw site ledger entry seq {seq} in {where}, reported "
                                 f"epsilon {report.epsilon:.4g}, but the site ledger has only "
                                 f"{len(entries)} entries: entries were cut or an older copy restored")
    entry = entries[seq - 1]
    if entry.hash != report.site_ledger_head:
        return Finding(DIVERGENCE, f"site ledger entry seq {seq} has hash {entry.hash[:12]}, the site "
                                   f"reported {report.site_ledger_head[:12]} in {where}: the ledger "
                                   f"was rewritten")
    if report.status == "ok":
        if entry.kind not in _RELEASES or int(entry.payload.get("round", -1)) != report.round:
            return Finding(DIVERGENCE, f"site ledger entry seq {seq} is not the round-{report.round} "
                                       f"entry the site reported in {where}")
        # A non-private round has no epsilon field: its spend is infinite.
        recorded = float(entry.payload.get("epsilon", -1.0)) if entry.kind == RoundRecord.kind \
            else math.inf
        if math.isinf(recorded) or math.isinf(report.epsilon):
            if recorded != report.epsilon:
                return Finding(DIVERGENCE, f"{where}: the consortium mirrored epsilon "
                                           f"{report.epsilon:.6g}, the site ledger records "
                                           f"{recorded:.6g} ({entry.kind} entry)")
            return None
        if abs(recorded - report.epsilon) > _EPSILON_TOLERANCE:
            return Finding(DIVERGENCE, f"{where}: the consortium mirrored epsilon {report.epsilon:.6g}, "
                                       f"the site ledger records {recorded:.6g}")
    return None


def reconcile(site_ledger: Path | str, consortium_ledger: Path | str,
              site_id: str | None = None) -> ReconcileReport:
    """Compare the two ledgers (see the module docstring). Raises :class:`ReconcileError` when the
    consortium ledger is unreadable or the site cannot be identified."""
    site_ledger = Path(site_ledger)
    try:
        view = read_consortium_ledger(consortium_ledger)
    except LedgerError as err:
        raise ReconcileError(f"{err}") from None
    try:
        result = verify_ledger(site_ledger)
    except LedgerError as err:
        raise ReconcileError(f"{err}") from None
    entries = result.entries
    reports_all = view.site_reports()
    gates_all = view.gate_reports()
    site_id = site_id or _infer_site([*reports_all, *gates_all], entries)
    if site_id is None:
        raise ReconcileError(f"{consortium_ledger}: cannot tell which site {site_ledger} belongs to "
                             f"(sites: {', '.join(view.site_ids()) or 'none'}); pass --site SITE_ID")
    reports = [r for r in reports_all if r.site_id == site_id and r.site_ledger_seq > 0]
    gates = [g for g in gates_all if g.site_id == site_id and g.site_ledger_seq > 0]
    report = ReconcileReport(site_id, len(entries), len(reports) + len(gates))
    if result.problem is not None:
        kind = ROLLBACK if "missing" in result.problem.message else DAMAGED
        report.findings.append(Finding(kind, f"the site ledger fails its own check at "
                                             f"{result.problem.describe()}"))
    seen: set[tuple[int, str]] = set()
    for item in reports:
        if (item.site_ledger_seq, item.site_ledger_head) in seen and item.status != "ok":
            continue
        seen.add((item.site_ledger_seq, item.site_ledger_head))
        finding = _check_report(item, entries)
        if finding is not None:
            report.findings.append(finding)
    for gate in gates:
        finding = _check_gate(gate, entries)
        if finding is not None:
            report.findings.append(finding)
    mirrored = {r.site_ledger_seq for r in [*reports, *gates]}
    newest = max(mirrored, default=0)
    unmirrored = [e for e in entries if e.kind in _SPENDS and e.seq > newest]
    if unmirrored:
        plural = "y" if len(unmirrored) == 1 else "ies"
        report.notes.append(f"{len(unmirrored)} round or DP-gate entr{plural} of "
                            f"the site (seq {', '.join(str(e.seq) for e in unmirrored)}) not mirrored by "
                            f"the consortium (the server stopped before recording them, or another "
                            f"federation used this ledger)")
    alarm = pending_alarm(site_ledger)
    if alarm is not None:
        report.notes.append(f"a rollback alarm is pending at the site: {alarm.describe()}")
    return report


def clear_rollback_alarm(site_ledger: Path | str, report: ReconcileReport, officer: str) -> Path:
    """The privacy officer's action on a site that detected a rollback: once ``report`` (this site
    ledger reconciled with the consortium's) is consistent again, archive the site's alarm so it
    trains again. Returns the archived alarm file; :class:`AlarmNotResolved` otherwise."""
    if not report.ok:
        raise AlarmNotResolved(f"{site_ledger}: does not reconcile with the consortium ledger yet; "
                               f"restore it from a trusted copy before clearing the alarm")
    entries = verify_ledger(site_ledger).entries
    return clear_alarm(site_ledger, entries, officer=officer)
