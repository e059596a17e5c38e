"""No epsilon on discarded work: every instruction carries a TTL <= round_timeout and a deadline,
and a site refuses an instruction it receives past the deadline, before training, ledger untouched."""

from __future__ import annotations

from unittest import mock

from flwr.app import Message

from experiments.loopback import LoopbackGrid
from privacy.protocol import ROUND_CONFIG, RoundConfig
from server.consortium_ledger import SITE_ROUND
from tests.server.conftest import federation_settings, loopback_grid
from server.federation import run_federation
from tests.server.test_federation_loop import consortium


class LateLink(LoopbackGrid):
    """Delivers round ``late_round``'s instructions after their deadline; records every message."""

    late_round = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[float, RoundConfig]] = []

    def deliver(self, message: Message) -> Message:
        config = RoundConfig.from_record(dict(message.content[ROUND_CONFIG]))
        self.sent.append((message.metadata.ttl, config))
        if config.server_round < self.late_round:
            return super().deliver(message)
        with mock.patch("client.client_app.time.time", return_value=config.deadline + 5.0):
            return super().deliver(message)


def test_an_instruction_past_its_deadline_is_refused_and_no_ledger_changes(new_federation):
    fed = new_federation(sites=2, rounds=2, min_sites=2)
    grid = loopback_grid(fed, LateLink)
    after_round_one: dict[str, bytes] = {}

    def snapshot(summary) -> None:
        if summary.round == 1:
            after_round_one.update({s: fed.ledger(s).read_bytes() for s in fed.site_ids})

    result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False),
                            on_round=snapshot)
    assert result.rounds_completed == 1 and "deadline-passed" in result.stop_reason
    timeout = 600.0   # federation.round_timeout of the tiny federation
    assert grid.sent and all(0 < ttl <= timeout for ttl, _ in grid.sent)
    assert all(config.deadline > 0 for _, config in grid.sent)
    # The late round: every site refused, and its ledger is byte for byte what round 1 left.
    for site_id in fed.site_ids:
        assert fed.ledger(site_id).read_bytes() == after_round_one[site_id]
    late = [e.payload for e in consortium(fed).effective(SITE_ROUND) if e.payload["round"] == 2]
    assert sorted(p["site_id"] for p in late) == fed.site_ids
    assert {p["status"] for p in late} == {"refused"} and {p["reason"] for p in late} == \
        {"deadline-passed"}
