"""BudgetAwareFedAvg: weighting by patients, who is sampled, what counts as a failure."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from client.client_app import encode_reply
from client.site_runtime import SiteOutcome
from experiments.loopback import LoopbackGrid
from privacy.outbox import weights_hash
from privacy.protocol import RefusalReason, ReplyStatus, TrainReply
from server.strategy import BudgetAwareFedAvg

SHAPE = (2, 3)


def setup(nodes: int = 3, min_sites: int = 2):
    grid = LoopbackGrid(None, [{"partition-id": k} for k in range(nodes)])
    strategy = BudgetAwareFedAvg(min_sites, ArrayRecord(torch_state_dict={"e": torch.zeros(1)}))
    return grid, strategy


def instructions(grid, strategy, server_round=1):
    arrays = ArrayRecord(torch_state_dict={"w": torch.zeros(SHAPE)})
    return list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))


def reply_to(message, site, *, status=ReplyStatus.OK, patients=1, value=0.0, epsilon=1.0,
             epsilon_next=2.0, reason=RefusalReason.NONE):
    weights = {"w": torch.full(SHAPE, value)} if status is ReplyStatus.OK else None
    reply = TrainReply(status=status, reason=reason, site_id=site, round=1, num_patients=patients,
                       epsilon=epsilon, epsilon_next=epsilon_next, target_epsilon=3.0, delta=1e-3,
                       noise_multiplier=1.0, sample_rate=0.5, steps=2, ledger_seq=2, ledger_head="ab" * 32,
                       weights_sha256=weights_hash(weights) if weights else "")
    return Message(encode_reply(SiteOutcome(reply, weights, 0.0), {"w": SHAPE}), reply_to=message)


def test_weights_are_averaged_by_patients():
    grid, strategy = setup()
    sent = instructions(grid, strategy)
    replies = [reply_to(sent[0], "a", patients=1, value=1.0), reply_to(sent[1], "b", patients=3, value=0.0),
               reply_to(sent[2], "c", status=ReplyStatus.BUDGET_EXHAUSTED, patients=100, epsilon=3.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full(SHAPE, 0.25))
    assert metrics["patients"] == 4 and metrics["epsilon/a"] == 1.0
    assert strategy.last_round.participants == ["a", "b"]
    assert [r.site_id for _, r in strategy.last_round.declined] == ["c"]


def test_spent_and_refusing_sites_are_no_longer_sampled():
    grid, strategy = setup(nodes=4, min_sites=1)
    sent = instructions(grid, strategy)
    strategy.aggregate_train(1, [
        reply_to(sent[0], "fine", epsilon=1.0, epsilon_next=2.0),
        reply_to(sent[1], "last-round", epsilon=2.5, epsilon_next=3.5),   # next round exceeds 3.0
        reply_to(sent[2], "rolled-back", status=ReplyStatus.REFUSED, reason=RefusalReason.LEDGER_ROLLBACK),
        reply_to(sent[3], "flaky", status=ReplyStatus.REFUSED, reason=RefusalReason.SITE_ERROR)])
    nodes = [m.metadata.dst_node_id for m in sent]
    assert strategy.eligible_nodes(grid) == [nodes[0], nodes[3]]
    assert set(strategy.exclusions()) == {"last-round", "rolled-back"}
    assert "one more round would reach 3.5" in strategy.exclusions()["last-round"]
    assert strategy.expected_heads()["fine"] == (2, "ab" * 32)


def test_below_min_sites_nothing_is_aggregated_and_failures_are_kept():
    grid, strategy = setup(nodes=3, min_sites=2)
    sent = instructions(grid, strategy)
    error = Message(Error(code=0, reason="Error: Node Unavailable"), reply_to=sent[1])
    forged = reply_to(sent[2], "b", value=5.0)
    forged.content["accounting"]["train-loss"] = 0.5     # a statistic the protocol does not allow
    arrays, metrics = strategy.aggregate_train(1, [reply_to(sent[0], "a"), error, forged])
    assert arrays is None and metrics is None
    reasons = [reason for _, _, reason in strategy.last_round.failed]
    assert reasons[0].startswith("Error: Node Unavailable") and "protocol violation" in reasons[1]


def test_two_nodes_answering_for_one_site_count_once():
    grid, strategy = setup(nodes=3, min_sites=1)
    sent = instructions(grid, strategy)
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], "a", value=1.0),
                                             reply_to(sent[1], "a", value=9.0, patients=50)])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.ones(SHAPE))
    assert strategy.last_round.failed[0][2] == "a second node answered for this site"


def test_a_reply_with_non_finite_weights_is_discarded():
    grid, strategy = setup(nodes=2, min_sites=1)
    sent = instructions(grid, strategy)
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], "a", value=1.0),
                                             reply_to(sent[1], "b", value=float("nan"))])
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full(SHAPE, 1.0))
    assert strategy.last_round.participants == ["a"]
    [(_, site, reason)] = strategy.last_round.failed
    assert "NaN or infinite" in reason


def test_a_site_without_its_own_budget_is_not_asked_again():
    grid, strategy = setup(nodes=2, min_sites=1)
    sent = instructions(grid, strategy)
    strategy.aggregate_train(1, [reply_to(sent[0], "a"),
                                 reply_to(sent[1], "b", status=ReplyStatus.REFUSED,
                                          reason=RefusalReason.NO_SITE_BUDGET)])
    assert strategy.exclusions() == {"b": "refused: no-site-budget"}
