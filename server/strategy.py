"""Budget-aware federated averaging, weighted by patients (a Flower ``FedAvg`` subclass).

What the server knows of a site's budget is what the site reported last: its cumulative epsilon,
its cap, and the epsilon one more round at its plan would reach (all accounting figures, see
:mod:`privacy.protocol`). With that it

- does not sample a site whose last reply said ``budget-exhausted``, or whose next round would take
  it past its cap (``epsilon-next > target-epsilon``), or that refused for a reason only a person can
  fix (a rolled-back ledger, a plan mismatch, ...); such a site stays out for the rest of the run;
- contacts every node it knows nothing about (a new or restarted SuperNode): the site decides;
- keeps sampling a site that trained non-privately on its own opt-in (its reply says epsilon = +inf,
  :data:`privacy.protocol.NOT_PRIVATE`: no cap applies to a release that has no guarantee); every
  other rule still applies to it, and all of them to DP sites.

The site remains the authority: it refuses a round past its cap whatever the server samples. A site
that failed (an error reply, no reply, or a reply breaking the protocol) is logged and stays
eligible; the round goes on when at least ``min_sites`` sites trained, else it fails and the global
model is unchanged. Weights are averaged with weights ``num-patients`` (FedAvg's weighted mean).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from privacy.outbox import weights_hash
from privacy.packed_state import packed_shapes, unpack_state
from privacy.protocol import (ARRAYS, CONFIG, FROZEN_AUTOENCODER, GLOBAL_WEIGHTS, METRICS,
                              ROUND_CONFIG, SITE_ACCOUNTING, SITE_STATUS, SITE_WEIGHTS, WEIGHT_KEY,
                              ProtocolViolation, RefusalReason, ReplyStatus, TrainReply, check_reply)

log = logging.getLogger(__name__)

# A refusal for one of these reasons needs a person at the site; retrying within the run is pointless.
_STICKY_REFUSALS = frozenset({RefusalReason.LEDGER_ROLLBACK, RefusalReason.ROLLBACK_ALARM,
                              RefusalReason.LEDGER_DAMAGED, RefusalReason.PLAN_MISMATCH,
                              RefusalReason.INVALID_BUDGET, RefusalReason.NO_SITE_BUDGET,
                              RefusalReason.PRIVACY_DISABLED,
                              RefusalReason.PROTOCOL_MISMATCH})


@dataclass
class SiteStanding:
    """The server's view of one site, from its latest reply."""

    site_id: str
    epsilon: float = 0.0
    epsilon_next: float = 0.0
    target_epsilon: float = 0.0
    num_patients: int = 0
    ledger_seq: int = 0
    ledger_head: str = ""
    last_round: int = 0
    rounds_trained: int = 0
    excluded: str = ""      # "" while the server may sample the site; else why it does not
    not_private: bool = False  # the site reported non-private releases (epsilon = +inf)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundReplies:
    """How the sites answered one round (node ids as Flower gives them)."""

    round: int
    accepted: list[tuple[int, TrainReply]] = field(default_factory=list)
    declined: list[tuple[int, TrainReply]] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)   # (node, site id or "", error)

    @property
    def participants(self) -> list[str]:
        return sorted(reply.site_id for _, reply in self.accepted)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (the serialised tensors)."""
    return sum(len(array.data) for array in record.values())


def accounting_summary(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Train metrics of a round: each site's cumulative epsilon and the patients that took part."""
    summary = MetricRecord({"patients": 0})
    for content in contents:
        site = content[SITE_STATUS]["site-id"]
        accounting = content[SITE_ACCOUNTING]
        summary[f"epsilon/{site}"] = float(accounting["epsilon"])
        summary["patients"] = int(summary["patients"]) + int(accounting[weight_key])
    return summary


class BudgetAwareFedAvg(FedAvg):
    """FedAvg over the sites that can still train, weighted by their patients (see module doc)."""

    def __init__(self, min_sites: int, autoencoder: ArrayRecord):
        # Federated evaluation is never configured (sites send no statistic of their data).
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                         min_evaluate_nodes=0, min_available_nodes=min_sites, weighted_by_key=WEIGHT_KEY,
                         arrayrecord_key=GLOBAL_WEIGHTS, configrecord_key=ROUND_CONFIG,
                         train_metrics_aggr_fn=accounting_summary)
        self.min_sites = min_sites
        self.autoencoder = autoencoder
        self.standings: dict[str, SiteStanding] = {}
        self.node_sites: dict[int, str] = {}
        self.last_round: RoundReplies | None = None
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        self._sent: list[Message] = []

    # --- state ------------------------------------------------------------------------------------
    def standings_json(self) -> dict[str, dict[str, Any]]:
        return {site: standing.to_json() for site, standing in sorted(self.standings.items())}

    def load_standings(self, data: dict[str, dict[str, Any]]) -> None:
        self.standings = {site: SiteStanding(**values) for site, values in data.items()}

    def expected_heads(self) -> dict[str, tuple[int, str]]:
        """Per site, the newest ledger head it reported (sent back so the site can detect a rollback)."""
        return {site: (s.ledger_seq, s.ledger_head) for site, s in self.standings.items() if s.ledger_seq}

    def eligible_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes whose site the server may still sample (unknown nodes included)."""
        nodes = sorted(grid.get_node_ids())
        return [n for n in nodes if not (n in self.node_sites and
                                         self.standings[self.node_sites[n]].excluded)]

    def exclusions(self) -> dict[str, str]:
        return {site: s.excluded for site, s in sorted(self.standings.items()) if s.excluded}

    # --- Flower strategy --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per eligible node; none when fewer than ``min_sites`` are eligible."""
        eligible = self.eligible_nodes(grid)
        for site, why in self.exclusions().items():
            log.info("round %d: not sampling %s (%s)", server_round, site, why)
        if len(eligible) < self.min_sites:
            return []
        self.weight_shapes = packed_shapes(arrays)
        config["server-round"] = server_round
        content = RecordDict({GLOBAL_WEIGHTS: arrays, FROZEN_AUTOENCODER: self.autoencoder,
                              ROUND_CONFIG: config})
        log.info("round %d: sampling %d of %d connected nodes", server_round, len(eligible),
                 len(list(grid.get_node_ids())))
        self._sent = list(self._construct_messages(content, eligible, MessageType.TRAIN))
        return self._sent

    def reply_node(self, reply: Message) -> int:
        """The node a reply answers for. Flower's own error replies (e.g. "node unavailable") come
        from the SuperLink, so the node is found through the instruction the reply refers to."""
        for message in self._sent:
            if message.metadata.message_id and \
                    message.metadata.message_id == reply.metadata.reply_to_message_id:
                return message.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _parse(self, message: Message) -> TrainReply:
        content = message.content
        layout: dict[str, tuple[str, Any]] = {}
        for name, record in content.items():
            kind = ARRAYS if isinstance(record, ArrayRecord) else \
                METRICS if isinstance(record, MetricRecord) else CONFIG
            layout[name] = (kind, packed_shapes(record) if kind == ARRAYS else dict(record))
        check_reply(layout, self.weight_shapes or None)
        reply = TrainReply.from_records(dict(content[SITE_ACCOUNTING]), dict(content[SITE_STATUS]))
        if reply.status is ReplyStatus.OK:
            weights = unpack_state(content[SITE_WEIGHTS])
            if weights_hash(weights) != reply.weights_sha256:
                raise ProtocolViolation("arrays: the weights do not match the reported "
                                        "weights-sha256")
            bad = [name for name, tensor in weights.items()
                   if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
            if bad:
                raise ProtocolViolation(f"arrays.{bad[0]}: holds NaN or infinite values (a site "
                                        f"never sends them); the reply is discarded")
        return reply

    def _update(self, round: int, node: int, reply: TrainReply) -> None:
        standing = self.standings.setdefault(reply.site_id, SiteStanding(reply.site_id))
        standing.last_round = round
        if reply.ledger_seq:
            standing.ledger_seq, standing.ledger_head = reply.ledger_seq, reply.ledger_head
        if reply.target_epsilon:
            standing.epsilon, standing.epsilon_next = reply.epsilon, reply.epsilon_next
            standing.target_epsilon, standing.num_patients = reply.target_epsilon, reply.num_patients
        standing.not_private = standing.not_private or reply.not_private
        if reply.status is ReplyStatus.OK:
            standing.rounds_trained += 1
            if reply.not_private:
                log.warning("round %d: %s trained WITHOUT differential privacy (its own opt-in); its "
                            "epsilon is infinite", round, reply.site_id)
            elif reply.epsilon_next > reply.target_epsilon:
                standing.excluded = (f"spent epsilon {reply.epsilon:.4g} of its cap "
                                     f"{reply.target_epsilon:g}; one more round would reach "
                                     f"{reply.epsilon_next:.4g}")
        elif reply.status is ReplyStatus.BUDGET_EXHAUSTED:
            standing.excluded = (f"budget exhausted (epsilon {reply.epsilon:.4g} of "
                                 f"{reply.target_epsilon:g})")
        elif reply.reason in _STICKY_REFUSALS:
            standing.excluded = f"refused: {reply.reason.value}"

    def take_reply(self, outcome: RoundReplies, message: Message, node: int | None = None) -> bool:
        """Check one reply of round ``outcome.round`` and note it in ``outcome`` and the standings;
        True when it carries weights to average. ``node``: the node the instruction went to (else
        found through :meth:`reply_node`)."""
        server_round = outcome.round
        node = self.reply_node(message) if node is None else node
        if message.has_error():
            outcome.failed.append((node, self.node_sites.get(node, ""), message.error.reason))
            return False
        try:
            reply = self._parse(message)
        except ProtocolViolation as err:
            log.warning("round %d: node %s broke the protocol (%s); its reply is discarded",
                        server_round, node, err)
            outcome.failed.append((node, self.node_sites.get(node, ""), f"protocol violation: {err}"))
            return False
        if reply.status is ReplyStatus.OK and reply.site_id in outcome.participants:
            outcome.failed.append((node, reply.site_id, "a second node answered for this site"))
            return False
        self.node_sites[node] = reply.site_id
        self._update(server_round, node, reply)
        if reply.status is ReplyStatus.OK:
            outcome.accepted.append((node, reply))
            return True
        outcome.declined.append((node, reply))
        log.info("round %d: %s answered %s%s", server_round, reply.site_id, reply.status.value,
                 f" ({reply.reason.value})" if reply.reason.value else "")
        return False

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the ``ok`` replies (by patients); ``(None, None)`` below ``min_sites``.

        How every site answered is kept in :attr:`last_round` for the consortium ledger.
        """
        outcome = RoundReplies(server_round)
        trained = [message for message in replies if self.take_reply(outcome, message)]
        for node, site, error in outcome.failed:
            log.warning("round %d: node %s%s failed: %s", server_round, node,
                        f" ({site})" if site else "", error.splitlines()[0] if error else "no reason")
        self.last_round = outcome
        if len(trained) < self.min_sites:
            return None, None
        for message in trained:   # Flower's FedAvg averages array by array: give it the tensors
            content = message.content
            message.content = RecordDict({**dict(content.items()), SITE_WEIGHTS: ArrayRecord(
                torch_state_dict=unpack_state(content[SITE_WEIGHTS]))})
        return super().aggregate_train(server_round, trained)
