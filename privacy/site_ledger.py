"""The site's privacy ledger: typed ``plan`` and ``round`` entries on the generic ledger.

- ``plan``: the noise calibration (sigma from the site's budget and the planned schedule) and the
  cap in force. The first plan fixes sigma and the sampling; a later plan entry records a changed
  cap or schedule length (see :mod:`privacy.budget`).
- ``round``: one released set of DP-SGD weights: the mechanism (sigma, q, steps), the cumulative
  epsilon after it, and the hashes of the weights the round started from and the weights it
  released.
- ``non-private-round``: one released set of weights trained WITHOUT differential privacy (a site
  that opted in with ``allow_non_private``, research and demo data only): the patients, steps and
  the hashes of the weights. It has no epsilon field: from this entry on, the site's epsilon is
  infinite, and no later DP-SGD round can be accounted (:mod:`privacy.budget` refuses it).
- ``dp-gate``: one DP release-gate query charged to the site (:mod:`privacy.dp_gate`): its pure
  epsilon, composed with the DP-SGD epsilon by basic composition.
- ``budget``: the cap in force and where it came from: the site's own config, or (simulation only,
  a site config without a budget) the consortium default, locked here at first use so that the
  server can never raise it later (:func:`privacy.budget.resolve_cap`).

The entries are the single source of truth for the spend: :func:`privacy.spend.site_spend` replays
the round entries into an accountant and adds the gate charges; enforcement, replies and reports all
call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from privacy.ledger import Ledger, LedgerEntry, LedgerError

R = TypeVar("R", bound="_Record")
_FIELD_TYPES = {"float": float, "int": int, "str": str}


def fedsynth_version() -> str:
    """The installed fedsynth version (``models.version``), ``"0+unknown"`` from a bare tree."""
    try:
        from models.version import fedsynth_version as installed
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("fedsynth")
        except PackageNotFoundError:
            return "0+unknown"
    return installed()


def utc_timestamp() -> str:
    """ISO 8601 UTC time with seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class _Record:
    kind: ClassVar[str]

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_entry(cls: type[R], entry: LedgerEntry, path: Path | str = "ledger") -> R:
        """The typed record of ``entry``; :class:`LedgerError` names the entry if a field is
        wrong."""
        if entry.kind != cls.kind:
            raise LedgerError(f"{path}: seq {entry.seq} is a {entry.kind!r} entry, "
                              f"not {cls.kind!r}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        missing = sorted(set(names) - set(entry.payload))
        unknown = sorted(set(entry.payload) - set(names))
        if missing or unknown:
            raise LedgerError(f"{path}: seq {entry.seq} ({cls.kind}) has missing fields {missing} "
                              f"and unknown fields {unknown}; was it written by another fedsynth "
                              f"version?")
        values = {}
        for name, value in entry.payload.items():
            expected = _FIELD_TYPES[str(names[name].type)]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise LedgerError(f"{path}: seq {entry.seq} ({cls.kind}) field {name} should be a "
                                  f"{expected.__name__} (got {value!r})")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class PlanRecord(_Record):
    """The calibrated schedule: ``noise_multiplier`` (sigma) gives at most ``target_epsilon`` at
    ``delta`` after ``planned_rounds`` rounds of ``steps_per_round`` steps at ``sample_rate``
    (q = expected_batch_size / num_patients)."""

    kind: ClassVar[str] = "plan"
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    num_patients: int
    expected_batch_size: int
    local_epochs: int
    steps_per_round: int
    planned_rounds: int
    planned_epsilon: float
    max_grad_norm: float
    clipping: str
    timestamp: str
    fedsynth_version: str


@dataclass(frozen=True)
class RoundRecord(_Record):
    """One round whose weights left (or may leave) the site. ``epsilon`` is cumulative after it."""

    kind: ClassVar[str] = "round"
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon: float
    target_epsilon: float
    num_patients: int
    model_hash_before: str
    model_hash_after: str
    timestamp: str
    fedsynth_version: str


@dataclass(frozen=True)
class NonPrivateRoundRecord(_Record):
    """One round whose weights left the site WITHOUT differential privacy (the site's own opt-in,
    ``SiteConfig.allow_non_private``): ``local_epochs`` passes over ``num_patients`` patients in
    shuffled batches of ``batch_size`` patients, ``steps`` optimizer steps in all. No epsilon: a
    non-private release makes the site's epsilon infinite."""

    kind: ClassVar[str] = "non-private-round"
    round: int
    num_patients: int
    batch_size: int
    local_epochs: int
    steps: int
    learning_rate: float
    model_hash_before: str
    model_hash_after: str
    timestamp: str
    fedsynth_version: str


@dataclass(frozen=True)
class GateChargeRecord(_Record):
    """One DP gate query charged to the site (:mod:`privacy.dp_gate`): its ``epsilon`` and the
    spends after it. ``gate_epsilon`` is the sum of every gate charge so far (this one included);
    ``total_epsilon`` = DP-SGD epsilon at ``delta`` + ``gate_epsilon`` (basic composition)."""

    kind: ClassVar[str] = "dp-gate"
    query_id: str
    mechanism: str
    epsilon: float
    gate_epsilon: float
    dp_sgd_epsilon: float
    total_epsilon: float
    delta: float
    target_epsilon: float
    num_candidates: int
    threshold_policy: str
    candidates_sha256: str
    timestamp: str
    fedsynth_version: str


# Where a cap in force came from (``BudgetRecord.source``).
SITE_CONFIG, CONSORTIUM_DEFAULT = "site-config", "consortium-default"


@dataclass(frozen=True)
class BudgetRecord(_Record):
    """The site's cap (``target_epsilon`` at ``delta``) from this entry on, and its ``source``:
    ``site-config`` (the site's own config) or ``consortium-default`` (simulation only: a site
    config without a budget; locked at first use, never raised by the server afterwards)."""

    kind: ClassVar[str] = "budget"
    target_epsilon: float
    delta: float
    source: str
    timestamp: str
    fedsynth_version: str


@dataclass(frozen=True)
class SiteLedgerState:
    """A verified read of a site ledger: the plans (the latest is in force), the DP-SGD rounds, the
    non-private rounds, the DP-gate charges, the budget entries, the cap in force (the latest
    ``plan``, ``budget`` or ``dp-gate`` entry's, in ledger order) and any entries of other
    kinds."""

    plans: list[PlanRecord]
    rounds: list[RoundRecord]
    other: list[LedgerEntry] = field(default_factory=list)
    non_private: list[NonPrivateRoundRecord] = field(default_factory=list)
    gate_charges: list[GateChargeRecord] = field(default_factory=list)
    budgets: list[BudgetRecord] = field(default_factory=list)
    # (target_epsilon, delta) of the newest plan, budget or dp-gate entry (each records the cap it
    # was written under); None when there is none.
    cap_in_force: tuple[float, float] | None = None
    # The ledger's events in order (plan, budget, round, non-private-round, dp-gate records).
    events: list = field(default_factory=list)

    @property
    def differentially_private(self) -> bool:
        """False once the site released non-private weights: its epsilon is infinite from then on."""
        return not self.non_private

    @property
    def plan(self) -> PlanRecord | None:
        return self.plans[-1] if self.plans else None

    @property
    def first_plan(self) -> PlanRecord | None:
        return self.plans[0] if self.plans else None

    @property
    def cap(self) -> float | None:
        """The cap in force (None on a ledger without plan or budget entry)."""
        return None if self.cap_in_force is None else self.cap_in_force[0]

    @property
    def locked_budget(self) -> BudgetRecord | None:
        """The newest ``budget`` entry, if any."""
        return self.budgets[-1] if self.budgets else None


class SiteLedger:
    """Typed access to a site's ledger file (hash chain, fsync and lock from :class:`Ledger`)."""

    KINDS: ClassVar[dict[str, type[_Record]]] = {
        PlanRecord.kind: PlanRecord, RoundRecord.kind: RoundRecord,
        NonPrivateRoundRecord.kind: NonPrivateRoundRecord, GateChargeRecord.kind: GateChargeRecord,
        BudgetRecord.kind: BudgetRecord}

    def __init__(self, path: Path | str):
        self.ledger = Ledger(path)

    @property
    def path(self) -> Path:
        return self.ledger.path

    def locked(self):
        """The ledger's exclusive lock (see :meth:`privacy.ledger.Ledger.locked`)."""
        return self.ledger.locked()

    def state(self) -> SiteLedgerState:
        """Verify the chain and decode the plan and round entries (other kinds kept as they are)."""
        return state_of(self.ledger.entries(), self.path)

    def append(self, record: _Record) -> LedgerEntry:
        """Append a typed record durably."""
        return self.ledger.append(record.kind, record.to_payload())


def state_of(entries: list[LedgerEntry], path: Path | str = "ledger") -> SiteLedgerState:
    """Decode verified ``entries`` of a site ledger (a prefix gives the state at that point)."""
    typed: dict[str, list] = {kind: [] for kind in SiteLedger.KINDS}
    other: list[LedgerEntry] = []
    events: list = []
    cap: tuple[float, float] | None = None
    for entry in entries:
        record_type = SiteLedger.KINDS.get(entry.kind)
        if record_type is None:
            other.append(entry)
            continue
        record = record_type.from_entry(entry, path)
        typed[entry.kind].append(record)
        events.append(record)
        if isinstance(record, (PlanRecord, BudgetRecord, GateChargeRecord)):
            cap = (record.target_epsilon, record.delta)
    plans, rounds = typed[PlanRecord.kind], typed[RoundRecord.kind]
    if rounds and not plans:
        raise LedgerError(f"{path}: has round entries but no plan entry; restore the ledger")
    return SiteLedgerState(plans, rounds, other, typed[NonPrivateRoundRecord.kind],
                           typed[GateChargeRecord.kind], typed[BudgetRecord.kind], cap, events)


def read_site_ledger(path: Path | str) -> SiteLedgerState:
    """The verified content of the site ledger at ``path``."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"{path}: no such ledger; check the path (a site's ledger defaults to "
                          f"<data_dir>/.fedsynth/ledger.jsonl)")
    return SiteLedger(path).state()

