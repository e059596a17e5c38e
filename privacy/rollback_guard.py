"""The site's defence against a rolled-back ledger: the consortium's echo and a durable alarm.

A ledger's own head record (``<ledger>.head``) catches entries cut from the end of the file. It cannot
catch a rollback that keeps the two files consistent: an old backup of the whole folder restored, or
the tail cut and the head record rewritten. The budget would then silently restart from an older,
smaller spend.

The consortium's ledger mirrors every site's ledger head, so the server sends each site, with every
train instruction, the ``(seq, hash)`` of the newest entry of that site's ledger it has seen. Before
training, the site checks that its verified ledger holds exactly that entry (:func:`check_expected_head`).
If not, the ledger was rolled back (or replaced): the site

1. writes a durable alarm file next to the ledger (``<ledger>.rollback-alarm.json``), and
2. refuses every round while the alarm exists, whatever the server later sends.

Only a privacy officer clears the alarm (:func:`clear_alarm`), and only once the ledger again holds the
entry the consortium saw (restored from a trusted copy); the cleared alarm is kept as an archived
record. A site whose ledger cannot be restored does not train again under that ledger: the spend it
lost is only known to the consortium, and starting a new ledger is a policy decision, not a software
one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from privacy.durable import atomic_write_bytes
from privacy.ledger import LedgerEntry, canonical_bytes
from privacy.site_ledger import utc_timestamp

ALARM_SUFFIX = ".rollback-alarm.json"


class LedgerRollback(ValueError):
    """The site ledger lacks an entry the consortium saw. One line: what, where, and the fix."""


class AlarmNotResolved(ValueError):
    """An officer tried to clear an alarm whose cause is still there. One line with the fix."""


@dataclass(frozen=True)
class RollbackAlarm:
    """What the site expected (from the consortium) and what its ledger held when it noticed."""

    ledger: str
    expected_seq: int
    expected_hash: str
    found_seq: int
    found_hash: str
    detected_at: str
    round: int

    def describe(self) -> str:
        return (f"the consortium saw entry seq {self.expected_seq} ({self.expected_hash[:12]}) but the "
                f"ledger holds {self.found_seq} entries" +
                (f" and a different hash there ({self.found_hash[:12]})" if self.found_hash else ""))


def alarm_path(ledger_path: Path | str) -> Path:
    """``<ledger>.rollback-alarm.json`` next to the site's ledger."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ALARM_SUFFIX)


def pending_alarm(ledger_path: Path | str) -> RollbackAlarm | None:
    """The alarm that blocks this ledger, or None. An unreadable alarm file still blocks."""
    path = alarm_path(ledger_path)
    if not path.exists():
        return None
    try:
        return RollbackAlarm(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return RollbackAlarm(str(ledger_path), -1, "", -1, "", "unknown (unreadable alarm file)", -1)


def _contains(entries: Sequence[LedgerEntry], seq: int, digest: str) -> bool:
    return 1 <= seq <= len(entries) and entries[seq - 1].hash == digest


def check_expected_head(ledger_path: Path | str, entries: Sequence[LedgerEntry], expected_seq: int,
                        expected_hash: str, round: int) -> None:
    """Raise :class:`LedgerRollback` (after writing the alarm) unless ``entries`` (the verified ledger)
    hold entry ``expected_seq`` with hash ``expected_hash``. ``expected_seq`` 0 means nothing seen."""
    if expected_seq <= 0 or _contains(entries, expected_seq, expected_hash):
        return
    found_hash = entries[expected_seq - 1].hash if expected_seq <= len(entries) else ""
    alarm = RollbackAlarm(str(ledger_path), int(expected_seq), str(expected_hash), len(entries),
                          found_hash, utc_timestamp(), int(round))
    atomic_write_bytes(alarm_path(ledger_path), canonical_bytes(alarm.__dict__))
    raise LedgerRollback(f"{ledger_path}: rolled back or replaced: {alarm.describe()}; the site refuses "
                         f"to train - restore the ledger from a trusted copy, then a privacy officer "
                         f"runs 'fedsynth audit reconcile' with --clear-alarm")


def clear_alarm(ledger_path: Path | str, entries: Sequence[LedgerEntry], *, officer: str) -> Path:
    """Archive the alarm once the (verified) ledger ``entries`` hold the entry the consortium saw.

    Returns the archived alarm's path (``<alarm>.resolved-<timestamp>.json``, with the officer's name).
    """
    if not officer.strip():
        raise AlarmNotResolved("clearing a rollback alarm needs the officer's name; pass --officer NAME")
    path = alarm_path(ledger_path)
    alarm = pending_alarm(ledger_path)
    if alarm is None:
        raise AlarmNotResolved(f"{path}: no rollback alarm to clear")
    if alarm.expected_seq < 0 or not _contains(entries, alarm.expected_seq, alarm.expected_hash):
        raise AlarmNotResolved(f"{ledger_path}: still lacks the entry the consortium saw "
                               f"(seq {alarm.expected_seq}); restore the ledger from a trusted copy first")
    stamp = utc_timestamp()
    record: dict[str, Any] = {**alarm.__dict__, "resolved_at": stamp, "resolved_by": officer.strip()}
    archived = path.with_name(f"{path.name}.resolved-{stamp.replace(':', '')}.json")
    atomic_write_bytes(archived, canonical_bytes(record))
    path.unlink()
    return archived
