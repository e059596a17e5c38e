"""A durable, append-only, hash-chained ledger of JSON lines.

The format is generic: the site ledger (``plan`` and ``round`` entries, see
:mod:`privacy.site_ledger`) and the server's consortium ledger both use it. Line ``n`` holds entry
``seq = n``::

    {"hash": "<hex>", "kind": "round", "payload": {...}, "prev_hash": "<hex>", "seq": 3}

- Every line is the canonical JSON of its entry (sorted keys, no spaces, ASCII, no NaN).
- ``hash`` is the SHA-256 of the canonical bytes of the entry without its ``hash`` key, so it covers
  ``seq``, ``kind``, ``prev_hash`` and ``payload``.
- ``prev_hash`` is the previous entry's ``hash``; the first entry links to :data:`GENESIS_HASH`.
- Each append is written with one ``write`` to a file opened for appending, flushed and fsync'd; the
  folder is fsync'd when the file is created.
- A head record next to the ledger (``<ledger>.head``, replaced atomically after every append) holds
  the last ``seq`` and ``hash``, so entries cut from the end are detected too, not only a cut
  mid-line. It is written (at seq 0) before the ledger file is created, so a ledger with entries and
  no head record, or an empty ledger file, is reported as a problem, never as intact. Someone who
  rewrites both files consistently is caught by reconciling with the server's consortium ledger,
  which mirrors every site's spend.

A ledger with any problem (edited value, deleted, inserted or moved line, cut tail, missing entries
named by the head record) is reported with the first bad line and never silently repaired: reading
and appending refuse until a person has looked at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from privacy.durable import atomic_write_bytes, fsync_directory

GENESIS_HASH = hashlib.sha256(b"fedsynth-ledger-genesis-v1").hexdigest()
_ENTRY_KEYS = frozenset({"seq", "kind", "prev_hash", "hash", "payload"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(ValueError):
    """A ledger that cannot be used. One line: ``<file>: <problem>; <fix>``."""


class LedgerIntegrityError(LedgerError):
    """The chain is broken; ``problem`` names the first bad line."""

    def __init__(self, path: Path, problem: "LedgerProblem"):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem.describe()}; the ledger was altered or cut - keep the "
                         f"file as evidence, run 'fedsynth audit verify' and restore it from a "
                         f"trusted copy")


def canonical_bytes(value: Any) -> bytes:
    """The one byte encoding that hashes are computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def entry_hash(seq: int, kind: str, prev_hash: str, payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical bytes of an entry without its ``hash`` key."""
    body = {"seq": seq, "kind": kind, "prev_hash": prev_hash, "payload": dict(payload)}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """One verified entry. ``payload`` is the kind-specific content (plain JSON data)."""

    seq: int
    kind: str
    prev_hash: str
    hash: str
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "prev_hash": self.prev_hash, "hash": self.hash,
                "payload": self.payload}


@dataclass(frozen=True)
class LedgerProblem:
    """The first thing wrong with a ledger: where (line, seq when known) and what."""

    line: int
    seq: int | None
    message: str

    def describe(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class VerifyResult:
    """``entries`` is the intact prefix of the chain; ``problem`` is None when the whole file is."""

    path: Path
    entries: list[LedgerEntry]
    problem: LedgerProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _parse_line(raw: bytes, line: int, expected_seq: int,
                prev_hash: str) -> tuple[LedgerEntry | None, LedgerProblem | None]:
    try:
        obj = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, LedgerProblem(line, None, "not valid JSON (a cut or edited line)")
    if not isinstance(obj, dict) or set(obj) != _ENTRY_KEYS:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        return None, LedgerProblem(line, None,
                                   f"expected the fields {sorted(_ENTRY_KEYS)}, found {found}")
    seq = obj["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None, LedgerProblem(line, None, f"seq must be an integer (got {seq!r})")
    if not isinstance(obj["kind"], str) or not obj["kind"] or not isinstance(obj["payload"], dict):
        return None, LedgerProblem(line, seq,
                                   "kind must be a non-empty string and payload an object")
    if not all(isinstance(obj[k], str) and _HEX64.fullmatch(obj[k]) for k in ("hash", "prev_hash")):
        return None, LedgerProblem(line, seq, "hash and prev_hash must be 64 lowercase hex digits")
    try:
        canonical = canonical_bytes(obj)
    except ValueError:
        return None, LedgerProblem(line, seq, "holds a non-finite number")
    if canonical != raw:
        return None, LedgerProblem(line, seq, "not in canonical form (the line was edited)")
    if seq != expected_seq:
        return None, LedgerProblem(line, seq, f"seq is {seq} where {expected_seq} was expected "
                                              f"(a line was deleted, inserted or moved)")
    if obj["prev_hash"] != prev_hash:
        return None, LedgerProblem(line, seq, "prev_hash does not match the previous entry's hash "
                                              "(an entry before it was changed, removed or moved)")
    recomputed = entry_hash(seq, obj["kind"], obj["prev_hash"], obj["payload"])
    if recomputed != obj["hash"]:
        return None, LedgerProblem(line, seq,
                                   "its content does not match its hash (a value was edited)")
    return LedgerEntry(seq, obj["kind"], obj["prev_hash"], obj["hash"], obj["payload"]), None


def _head_problem(head_path: Path, entries: list[LedgerEntry]) -> LedgerProblem | None:
    if not head_path.exists():
        if not entries:
            return None
        # append() writes the head record before it creates the file, so a ledger with entries
        # always has one: without it, entries cut from the end could not be detected.
        return LedgerProblem(len(entries) + 1, None,
                             f"the head record {head_path.name} is missing (deleted?), so entries "
                             f"cut from the end cannot be detected; restore it from a trusted copy")
    try:
        head = json.loads(head_path.read_bytes().decode("ascii"))
        head_seq, head_hash = int(head["seq"]), str(head["hash"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return LedgerProblem(len(entries) + 1, None,
                             f"the head record {head_path.name} is unreadable")
    last = entries[-1].seq if entries else 0
    if head_seq > last:
        return LedgerProblem(last + 1, last + 1,
                             f"missing: the file ends at seq {last} but its head record names seq "
                             f"{head_seq} (entries were cut from the end)")
    if head_seq >= 1 and entries[head_seq - 1].hash != head_hash:
        return LedgerProblem(head_seq, head_seq, "its hash differs from the one in the head record")
    return None


def verify_ledger(path: Path | str) -> VerifyResult:
    """Check the whole chain (and the head record). Raises :class:`LedgerError` if unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(f"{path}: no such ledger; check the path (a site's ledger defaults to "
                          f"<data_dir>/.fedsynth/ledger.jsonl)") from None
    except OSError as err:
        raise LedgerError(f"{path}: cannot be read ({err.strerror}); check its "
                          f"permissions") from None
    entries: list[LedgerEntry] = []
    if not data:
        return VerifyResult(path, entries, LedgerProblem(
            1, None, "the file is empty: a ledger file holds at least one entry (it was truncated "
                     "or its first write was interrupted); restore it from a trusted copy, or "
                     "delete it only if nothing was ever recorded"))
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    prev_hash = GENESIS_HASH
    for number, raw in enumerate(complete, start=1):
        if not raw:
            return VerifyResult(path, entries, LedgerProblem(number, None, "blank line"))
        entry, problem = _parse_line(raw, number, len(entries) + 1, prev_hash)
        if problem is not None:
            return VerifyResult(path, entries, problem)
        entries.append(entry)
        prev_hash = entry.hash
    if tail:
        return VerifyResult(path, entries, LedgerProblem(
            len(complete) + 1, None, "cut short: the last entry has no end of line (an interrupted "
                                     "write or a truncated file)"))
    return VerifyResult(path, entries, _head_problem(_head_path(path), entries))


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


class Ledger:
    """A ledger file. Reads verify the whole chain; :meth:`append` adds one durable entry."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.head_path = _head_path(self.path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_depth = 0
        self._lock_descriptor: int | None = None

    def verify(self) -> VerifyResult:
        """The chain's state; a missing file is an empty, intact ledger."""
        if not self.path.exists():
            return VerifyResult(self.path, [], _head_problem(self.head_path, []))
        return verify_ledger(self.path)

    def entries(self) -> list[LedgerEntry]:
        """All entries, verified; raises :class:`LedgerIntegrityError` on any problem."""
        result = self.verify()
        if result.problem is not None:
            raise LedgerIntegrityError(self.path, result.problem)
        return result.entries

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive lock (re-entrant within this object).

        A site holds it from its budget check to the commit of the round, so two processes can never
        both pass the check on the same spend.
        """
        if self._lock_depth == 0:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except BaseException:
                os.close(descriptor)
                raise
            self._lock_descriptor = descriptor
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_descriptor is not None:
                fcntl.flock(self._lock_descriptor, fcntl.LOCK_UN)
                os.close(self._lock_descriptor)
                self._lock_descriptor = None

    def append(self, kind: str, payload: Mapping[str, Any]) -> LedgerEntry:
        """Append one entry; it is on disk (fsync'd) when this returns."""
        if not kind:
            raise LedgerError(f"{self.path}: an entry needs a kind")
        payload = dict(payload)
        try:
            canonical_bytes(payload)
        except (TypeError, ValueError) as err:
            raise LedgerError(f"{self.path}: the {kind} entry's payload is not plain finite JSON "
                              f"({err}); pass numbers, strings, lists and dicts") from None
        with self.locked():
            entries = self.entries()
            seq = len(entries) + 1
            prev_hash = entries[-1].hash if entries else GENESIS_HASH
            digest = entry_hash(seq, kind, prev_hash, payload)
            entry = LedgerEntry(seq, kind, prev_hash, digest, payload)
            line = canonical_bytes(entry.to_json()) + b"\n"
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if created and not self.head_path.exists():
                # The head record exists before the file does: a ledger without one was tampered
                # with (a crash here leaves head seq 0 and no file, a fresh ledger).
                atomic_write_bytes(self.head_path,
                                   canonical_bytes({"seq": 0, "hash": GENESIS_HASH}))
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(descriptor, view):]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if created:
                fsync_directory(self.path.parent)
            atomic_write_bytes(self.head_path, canonical_bytes({"seq": seq, "hash": entry.hash}))
        return entry
