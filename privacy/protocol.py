"""What crosses the wire between the consortium server and a site, defined once for both sides.

Plain Python (no Flower import): ``client/`` builds its replies from these types and ``server/`` reads
them, so the two never import each other. A Flower message is a ``RecordDict`` of named records; this
module fixes the names, the kind of each record and the keys each may hold.

A train instruction (server -> site) holds:

- ``arrays`` (ArrayRecord): the global denoiser state;
- ``autoencoder`` (ArrayRecord): the frozen, public autoencoder (trained on public data only);
- ``config`` (ConfigRecord): :class:`RoundConfig`, flattened by :meth:`RoundConfig.to_record`.

A train reply (site -> server) holds ONLY what the trust model lets leave a site
(``shared/DESIGN.md``, rule 1):

- ``arrays`` (ArrayRecord, ``ok`` replies only): the DP-SGD weights of the trained parameters;
- ``accounting`` (MetricRecord): the patient count (public metadata) and accounting figures that
  depend only on (N, q, sigma, steps) - see :data:`ACCOUNTING_KEYS`;
- ``site`` (ConfigRecord): the status, the site id and the head of the site's ledger (a hash of the
  site's accounting entries, so the consortium can detect a rolled-back ledger) - see
  :data:`STATUS_KEYS`.

No loss, gradient norm, timing or other statistic computed from private data is in the allow-list,
and :func:`check_reply` refuses a reply that holds anything else.

Weights travel packed (:mod:`privacy.packed_state`: one array per dtype plus a layout of names and
shapes, bit for bit the same values) so that Flower moves a handful of objects, not one per tensor;
:func:`check_reply` is given the unpacked names and shapes.

A site that released non-private weights (its own opt-in, ``allow_non_private``) never claims a
finite epsilon: its reply says ``epsilon = epsilon-next = target-epsilon = +inf`` (no guarantee, no
cap) and ``noise-multiplier = 0``. Accounting figures must otherwise be finite; only the epsilon keys
of :data:`MAY_BE_INFINITE` may be ``+inf`` (never NaN or ``-inf``). A refusal carries one of the fixed
:class:`RefusalReason` codes, never an exception text (which could name files or values).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Mapping

PROTOCOL_VERSION = 1

# --- record names --------------------------------------------------------------------------------
GLOBAL_WEIGHTS = "arrays"          # instruction: ArrayRecord, the global denoiser state
FROZEN_AUTOENCODER = "autoencoder"  # instruction: ArrayRecord, the public autoencoder
ROUND_CONFIG = "config"            # instruction: ConfigRecord, RoundConfig
SITE_WEIGHTS = "arrays"            # reply: ArrayRecord, the released weights
SITE_ACCOUNTING = "accounting"     # reply: MetricRecord, counts and accounting figures
SITE_STATUS = "site"               # reply: ConfigRecord, status and ledger head

# --- release gate (server -> site query, site -> server answer; types in privacy.gate) ----------
GATE_MESSAGE_TYPE = "query.gate"   # Flower message type; the ClientApp registers @app.query("gate")
GATE_CANDIDATES = "candidates"     # query: ArrayRecord {"views": (N, T, C, *S)}
GATE_AUTOENCODER = "autoencoder"   # query, latent distance only: ArrayRecord, the public autoencoder
GATE_CONFIG = "gate-config"        # query: ConfigRecord, privacy.gate.GateQuery
GATE_PASSED = "gate-passed"        # answer ('ok' only): ArrayRecord {"passed": uint8 (N,)}
GATE_ACCOUNTING = "gate-accounting"  # answer: MetricRecord, counts and DP-gate accounting figures
GATE_STATUS = "gate-status"        # answer: ConfigRecord, status and reason codes, ledger head
GATE_ACCOUNTING_KEYS = frozenset({"num-candidates", "num-passed", "epsilon-charged", "epsilon-gate",
                                  "epsilon-total", "target-epsilon", "delta"})
GATE_STATUS_KEYS = frozenset({"protocol", "status", "reason", "site-id", "query-id", "ledger-seq",
                              "ledger-head", "replayed"})

# FedAvg weighs each site's weights by this accounting key: the privacy unit is the patient.
WEIGHT_KEY = "num-patients"

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
REPLY_RECORDS: dict[str, str] = {SITE_WEIGHTS: ARRAYS, SITE_ACCOUNTING: METRICS, SITE_STATUS: CONFIG}

# Numbers that depend only on N, q, sigma, steps and the site's own (non-data) cap.
ACCOUNTING_KEYS = frozenset({
    "round", WEIGHT_KEY, "epsilon", "epsilon-next", "target-epsilon", "delta", "noise-multiplier",
    "sample-rate", "steps"})
# The epsilon of a site whose ledger records a non-private release (and its "cap": none).
NOT_PRIVATE = math.inf
# Accounting keys that may hold NOT_PRIVATE (train reply and gate answer).
MAY_BE_INFINITE = frozenset({"epsilon", "epsilon-next", "target-epsilon", "epsilon-total"})
# Status fields: fixed codes, the site's public name, and hashes of its ledger and released weights.
STATUS_KEYS = frozenset({
    "protocol", "status", "reason", "site-id", "ledger-seq", "ledger-head", "weights-sha256",
    "resumed"})


class ProtocolViolation(ValueError):
    """A message that does not follow this protocol. One line naming the record and key."""


class ReplyStatus(str, Enum):
    """How a site answered a train instruction. Every answer is a normal reply, never an error."""

    OK = "ok"                            # trained, committed to the ledger, weights attached
    BUDGET_EXHAUSTED = "budget-exhausted"  # the round would take the site past its own cap
    REFUSED = "refused"                  # the site will not train; ``reason`` says why


class RefusalReason(str, Enum):
    """Fixed reason codes of a refusal (what leaves the site is the code, not the local details)."""

    NONE = ""
    LEDGER_ROLLBACK = "ledger-rollback"    # the ledger lacks an entry the consortium saw
    ROLLBACK_ALARM = "rollback-alarm"      # a rollback was detected earlier; an officer must act
    LEDGER_DAMAGED = "ledger-damaged"      # the site's own chain or head record check failed
    PLAN_MISMATCH = "plan-mismatch"        # this run's mechanism differs from the ledger's plan
    INVALID_BUDGET = "invalid-budget"      # no noise level fits the site's budget and data
    NO_SITE_BUDGET = "no-site-budget"      # a deployed site's own config sets no budget
    NON_FINITE_WEIGHTS = "non-finite-weights"  # training gave non-finite weights; none sent
    PRIVACY_DISABLED = "privacy-disabled"  # the site never releases non-private weights
    PROTOCOL_MISMATCH = "protocol-mismatch"  # the server speaks another protocol version
    MODEL_MISMATCH = "model-mismatch"      # the received weights do not match their hashes
    DEADLINE_PASSED = "deadline-passed"    # received after the round's deadline: not trained
    AUTOENCODER_MISSING = "autoencoder-missing"  # sent without the autoencoder the site lacks
    DENOISER_MISSING = "denoiser-missing"  # sent the trained subset; the site lacks the model it completes
    SITE_ERROR = "site-error"              # anything else; details stay in the site's log


@dataclass(frozen=True)
class RoundConfig:
    """The instruction of one round (server -> site): consortium settings, never site data.

    ``privacy`` holds the consortium's DP-SGD settings (the fields of ``PrivacyConfig``); ``data`` the
    preprocessing grid (``DataConfig`` fields); ``model`` the model section as a plain dict;
    ``expected_heads`` maps each site id to the ``(seq, hash)`` of the newest entry of its ledger that
    the consortium has seen: a site whose ledger does not hold that entry was rolled back.
    """

    server_round: int
    planned_rounds: int
    local_epochs: int
    privacy: dict[str, Any]
    data: dict[str, Any]
    model: dict[str, Any]
    attributes: list[str]
    latent_scale_factor: float
    autoencoder_sha256: str
    global_sha256: str
    expected_heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION
    # Absolute time (Unix seconds) after which the server no longer waits for this round; a site
    # that receives the instruction later refuses it before any private computation. 0: none.
    deadline: float = 0.0
    # Non-empty: the message carries only the trained subset of the denoiser, to be overlaid on the
    # full model of this hash that the site cached (client.weights_cache.rebuild_global).
    base_sha256: str = ""

    def to_record(self) -> dict[str, Any]:
        """ConfigRecord content: scalars as is, nested values as canonical JSON strings."""
        return {
            "protocol": self.protocol, "server-round": self.server_round,
            "planned-rounds": self.planned_rounds, "local-epochs": self.local_epochs,
            "privacy": compact_json(self.privacy), "data": compact_json(self.data), "model": compact_json(self.model),
            "attributes": compact_json(list(self.attributes)),
            "latent-scale-factor": float(self.latent_scale_factor),
            "autoencoder-sha256": self.autoencoder_sha256, "global-sha256": self.global_sha256,
            "expected-heads": compact_json({k: [int(s), str(h)] for k, (s, h) in self.expected_heads.items()}),
            "deadline": float(self.deadline), "base-sha256": self.base_sha256,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundConfig":
        """Parse :meth:`to_record` output; :class:`ProtocolViolation` names a missing or bad key."""
        protocol = record_field(record, "protocol", int)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolViolation(f"config.protocol: the server speaks protocol {protocol}, this site "
                                    f"{PROTOCOL_VERSION}; run the same fedsynth version at both ends")
        heads = record_json_field(record, "expected-heads")
        return cls(
            server_round=record_field(record, "server-round", int),
            planned_rounds=record_field(record, "planned-rounds", int),
            local_epochs=record_field(record, "local-epochs", int),
            privacy=record_json_field(record, "privacy"), data=record_json_field(record, "data"),
            model=record_json_field(record, "model"), attributes=list(record_json_field(record, "attributes")),
            latent_scale_factor=float(record_field(record, "latent-scale-factor", (int, float))),
            autoencoder_sha256=record_field(record, "autoencoder-sha256", str),
            global_sha256=record_field(record, "global-sha256", str),
            expected_heads={str(k): (int(v[0]), str(v[1])) for k, v in heads.items()},
            protocol=protocol,
            deadline=float(record_field(record, "deadline", (int, float))) if "deadline" in record
            else 0.0,
            base_sha256=record_field(record, "base-sha256", str) if "base-sha256" in record else "")


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train instruction, without the weights.

    ``epsilon`` is the site's cumulative spend after this round (its current spend when it did not
    train); ``epsilon_next`` the spend one more round at its plan would reach (0 when unknown). The
    ledger head is ``(ledger_seq, ledger_head)``: the newest entry of the site's ledger, after the
    commit of this round. ``weights_sha256`` is the hash of the attached weights (``""`` if none).
    """

    status: ReplyStatus
    site_id: str
    round: int
    reason: RefusalReason = RefusalReason.NONE
    num_patients: int = 0
    epsilon: float = 0.0
    epsilon_next: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    ledger_seq: int = 0
    ledger_head: str = ""
    weights_sha256: str = ""
    resumed: bool = False

    @property
    def not_private(self) -> bool:
        """The site's spend is infinite: its ledger records a non-private release."""
        return self.epsilon == NOT_PRIVATE

    def accounting(self) -> dict[str, int | float]:
        """MetricRecord content (every key in :data:`ACCOUNTING_KEYS`)."""
        return {"round": int(self.round), WEIGHT_KEY: int(self.num_patients),
                "epsilon": float(self.epsilon), "epsilon-next": float(self.epsilon_next),
                "target-epsilon": float(self.target_epsilon), "delta": float(self.delta),
                "noise-multiplier": float(self.noise_multiplier),
                "sample-rate": float(self.sample_rate), "steps": int(self.steps)}

    def status_fields(self) -> dict[str, int | str | bool]:
        """ConfigRecord content (every key in :data:`STATUS_KEYS`)."""
        return {"protocol": PROTOCOL_VERSION, "status": self.status.value, "reason": self.reason.value,
                "site-id": self.site_id, "ledger-seq": int(self.ledger_seq),
                "ledger-head": self.ledger_head, "weights-sha256": self.weights_sha256,
                "resumed": bool(self.resumed)}

    @classmethod
    def from_records(cls, accounting: Mapping[str, Any], status: Mapping[str, Any]) -> "TrainReply":
        """Parse the two records of a reply (after :func:`check_reply`)."""
        try:
            reply_status = ReplyStatus(record_field(status, "status", str))
            reason = RefusalReason(record_field(status, "reason", str))
        except ValueError as err:
            raise ProtocolViolation(f"site.status/reason: unknown code ({err})") from None
        return cls(
            status=reply_status, reason=reason, site_id=record_field(status, "site-id", str),
            round=int(record_field(accounting, "round", (int, float))),
            num_patients=int(record_field(accounting, WEIGHT_KEY, (int, float))),
            epsilon=float(record_field(accounting, "epsilon", (int, float))),
            epsilon_next=float(record_field(accounting, "epsilon-next", (int, float))),
            target_epsilon=float(record_field(accounting, "target-epsilon", (int, float))),
            delta=float(record_field(accounting, "delta", (int, float))),
            noise_multiplier=float(record_field(accounting, "noise-multiplier", (int, float))),
            sample_rate=float(record_field(accounting, "sample-rate", (int, float))),
            steps=int(record_field(accounting, "steps", (int, float))),
            ledger_seq=int(record_field(status, "ledger-seq", int)),
            ledger_head=record_field(status, "ledger-head", str),
            weights_sha256=record_field(status, "weights-sha256", str),
            resumed=bool(record_field(status, "resumed", bool)))

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["status"], values["reason"] = self.status.value, self.reason.value
        return values


def check_reply(records: Mapping[str, tuple[str, Mapping[str, Any]]],
                weight_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a reply that holds anything outside the allow-list.

    ``records`` maps each record name to ``(kind, content)``: kind ``"arrays"`` with content
    ``{tensor name: shape}``, ``"metrics"`` or ``"config"`` with ``{key: value}``. ``weight_shapes``
    (the global state's tensor shapes) bounds the weights: only those names, with those shapes.
    Raises :class:`ProtocolViolation`.
    """
    for name, (kind, content) in records.items():
        expected = REPLY_RECORDS.get(name)
        if expected is None:
            raise ProtocolViolation(f"reply record {name!r} is not allowed to leave a site "
                                    f"(allowed: {sorted(REPLY_RECORDS)})")
        if kind != expected:
            raise ProtocolViolation(f"reply record {name!r} must be a {expected} record (got {kind})")
    if SITE_ACCOUNTING not in records or SITE_STATUS not in records:
        raise ProtocolViolation(f"a reply needs the {SITE_ACCOUNTING!r} and {SITE_STATUS!r} records")
    for name, allowed in ((SITE_ACCOUNTING, ACCOUNTING_KEYS), (SITE_STATUS, STATUS_KEYS)):
        keys = set(records[name][1])
        if keys != allowed:
            extra, missing = sorted(keys - allowed), sorted(allowed - keys)
            raise ProtocolViolation(f"reply record {name!r}: keys not allowed {extra}, missing {missing}")
    check_accounting_numbers(SITE_ACCOUNTING, records[SITE_ACCOUNTING][1])
    status = records[SITE_STATUS][1]
    if status.get("status") == ReplyStatus.OK.value and SITE_WEIGHTS not in records:
        raise ProtocolViolation("an 'ok' reply must carry the trained weights")
    if status.get("status") != ReplyStatus.OK.value and SITE_WEIGHTS in records:
        raise ProtocolViolation(f"a {status.get('status')!r} reply must not carry weights")
    if SITE_WEIGHTS in records and weight_shapes is not None:
        for tensor, shape in records[SITE_WEIGHTS][1].items():
            if tensor not in weight_shapes:
                raise ProtocolViolation(f"arrays.{tensor}: not a tensor of the global model")
            if tuple(shape) != tuple(weight_shapes[tensor]):
                raise ProtocolViolation(f"arrays.{tensor}: shape {tuple(shape)} differs from the global "
                                        f"model's {tuple(weight_shapes[tensor])}")


def check_accounting_numbers(record: str, values: Mapping[str, Any]) -> None:
    """Every value a number, finite except ``+inf`` (:data:`NOT_PRIVATE`) in the keys of
    :data:`MAY_BE_INFINITE`; :class:`ProtocolViolation` names the first bad key."""
    for key, value in values.items():
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if number and (math.isfinite(value) or (key in MAY_BE_INFINITE and value == NOT_PRIVATE)):
            continue
        allowed = "a finite number or +inf" if key in MAY_BE_INFINITE else "a finite number"
        raise ProtocolViolation(f"{record}.{key}: must be {allowed} (got {value!r})")


def compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise ProtocolViolation(f"record key {key!r} is missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ProtocolViolation(f"record key {key!r} has a {type(value).__name__}, expected "
                                f"{'/'.join(k.__name__ for k in kinds)}")
    return value


def record_json_field(record: Mapping[str, Any], key: str) -> Any:
    text = record_field(record, key, str)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ProtocolViolation(f"record key {key!r} is not valid JSON") from None
