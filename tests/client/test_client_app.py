"""The site's ClientApp on real train messages: what leaves the site, budgets, resends, rollbacks."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.client_app import make_client_app
from configs import load_config
from experiments.loopback import LoopbackGrid
from experiments.tiny_federation import TinyFederation, write_tiny_federation
from models.checkpoint import load_checkpoint
from models.latent_unet import build_latent_unet
from privacy.outbox import weights_hash
from privacy.packed_state import packed_shapes, unpack_state
from privacy.protocol import (ACCOUNTING_KEYS, STATUS_KEYS, ProtocolViolation, RefusalReason,
                              ReplyStatus, check_reply)
from privacy.rollback_guard import AlarmNotResolved, alarm_path, clear_alarm, pending_alarm
from privacy.site_ledger import read_site_ledger
from privacy.ledger import Ledger
from privacy.trainable import trainable_parameter_names
from server.federation import round_config_for
from server.strategy import BudgetAwareFedAvg


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> TinyFederation:
    """One cohort (2 sites x 4 patients, 16^3) and one random-init checkpoint for the module."""
    return write_tiny_federation(tmp_path_factory.mktemp("shared"), sites=2, patients=4, rounds=2)


@pytest.fixture
def fed(shared, tmp_path) -> TinyFederation:
    """Fresh ledgers for each test, on the shared cohort and checkpoint."""
    return write_tiny_federation(tmp_path, sites=2, patients=4, rounds=2, cohort=shared.cohort,
                                 checkpoint=shared.checkpoint)


def ask(fed: TinyFederation, server_round: int, *, expected_heads=None, privacy=None,
        node_config=None, global_state=None) -> Message:
    """Send one train message (built by the server's strategy) to site_0's ClientApp; its reply."""
    config = load_config(fed.config_path)
    if privacy:
        config = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **privacy))
    base = load_checkpoint(fed.checkpoint)
    state = global_state or base.denoiser_state
    strategy = BudgetAwareFedAvg(1, ArrayRecord(torch_state_dict=base.autoencoder_state))
    round_config = round_config_for(config, base, strategy, server_round, state,
                                    weights_hash(base.autoencoder_state))
    round_config = dataclasses.replace(round_config, expected_heads=expected_heads or {})
    grid = LoopbackGrid(make_client_app(str(fed.config_path)), [node_config or {"partition-id": 0}])
    [message] = strategy.configure_train(server_round, ArrayRecord(torch_state_dict=state),
                                         ConfigRecord(round_config.to_record()), grid)
    reply = grid.deliver(message)
    assert not reply.has_error(), reply.error
    return reply


def status(reply: Message) -> dict:
    return dict(reply.content["site"])


def test_reply_holds_only_weights_counts_and_accounting(fed):
    reply = ask(fed, 1)
    content = reply.content
    assert set(content.keys()) == {"arrays", "accounting", "site"}
    assert set(content["accounting"].keys()) == ACCOUNTING_KEYS
    assert set(content["site"].keys()) == STATUS_KEYS
    assert status(reply)["status"] == "ok" and status(reply)["site-id"] == "site_0"
    accounting = dict(content["accounting"])
    assert accounting["num-patients"] == 4 and accounting["round"] == 1
    assert 0 < accounting["epsilon"] <= accounting["target-epsilon"] == 10.0
    assert accounting["sample-rate"] == 1.0 and accounting["steps"] == 1
    # The weights are the denoiser's trained parameters, by name and shape, and nothing else.
    base = load_checkpoint(fed.checkpoint)
    denoiser = build_latent_unet(base.model_config, base.data.num_classes, len(base.data.attributes))
    parameters = dict(denoiser.named_parameters())
    weights = unpack_state(content["arrays"])
    assert set(weights) == set(parameters)
    assert all(tuple(weights[k].shape) == tuple(parameters[k].shape) for k in weights)
    assert status(reply)["weights-sha256"] == weights_hash(weights)
    # Write-ahead: the round was committed to the site ledger before the reply left.
    ledger = read_site_ledger(fed.ledger("site_0"))
    assert [r.round for r in ledger.rounds] == [1]
    assert ledger.rounds[0].epsilon == pytest.approx(accounting["epsilon"])
    last = Ledger(fed.ledger("site_0")).entries()[-1]
    assert (status(reply)["ledger-seq"], status(reply)["ledger-head"]) == (last.seq, last.hash)
    # Nothing in the reply names a loss, a time or any other statistic.
    names = set(content["accounting"].keys()) | set(content["site"].keys())
    assert not {n for n in names if "loss" in n or "time" in n or "second" in n}


def test_allow_list_refuses_anything_else():
    metrics = {key: 1 for key in ACCOUNTING_KEYS}
    site = {key: "" for key in STATUS_KEYS} | {"status": "refused"}
    check_reply({"accounting": ("metrics", metrics), "site": ("config", site)})
    with pytest.raises(ProtocolViolation, match="loss"):
        check_reply({"accounting": ("metrics", metrics | {"train-loss": 0.1}), "site": ("config", site)})
    with pytest.raises(ProtocolViolation, match="histogram"):
        check_reply({"accounting": ("metrics", metrics), "site": ("config", site),
                     "histogram": ("metrics", {"bins": 1})})
    with pytest.raises(ProtocolViolation, match="must not carry weights"):
        check_reply({"accounting": ("metrics", metrics), "site": ("config", site),
                     "arrays": ("arrays", {"w": (2,)})})
    ok = site | {"status": "ok"}
    with pytest.raises(ProtocolViolation, match="not a tensor of the global model"):
        check_reply({"accounting": ("metrics", metrics), "site": ("config", ok),
                     "arrays": ("arrays", {"latents_cache": (4, 2)})}, {"w": (2,)})


def test_trainable_subset_sends_only_those_parameters(fed):
    reply = ask(fed, 1, privacy={"trainable": "attention_conditioning"})
    base = load_checkpoint(fed.checkpoint)
    denoiser = build_latent_unet(base.model_config, base.data.num_classes, len(base.data.attributes))
    expected = trainable_parameter_names(denoiser, "attention_conditioning")
    sent = set(packed_shapes(reply.content["arrays"]))
    assert sent == set(expected) and len(sent) < len(list(denoiser.parameters()))


def test_site_config_comes_from_the_supernode_node_config(fed):
    reply = ask(fed, 1, node_config={"site-config": str(fed.site_yaml("site_1"))})
    assert status(reply)["site-id"] == "site_1"
    assert read_site_ledger(fed.ledger("site_1")).rounds and not fed.ledger("site_0").exists()


def test_spent_budget_is_a_structured_reply_not_an_error(fed):
    ask(fed, 1)
    ask(fed, 2)
    before = Ledger(fed.ledger("site_0")).entries()
    reply = ask(fed, 3)
    assert status(reply)["status"] == ReplyStatus.BUDGET_EXHAUSTED.value
    assert "arrays" not in reply.content
    accounting = dict(reply.content["accounting"])
    assert accounting["epsilon"] <= accounting["target-epsilon"] < accounting["epsilon-next"]
    assert Ledger(fed.ledger("site_0")).entries() == before


def test_a_round_asked_twice_is_resent_not_charged_again(fed):
    first = ask(fed, 1)
    second = ask(fed, 1)
    assert status(second)["resumed"] is True
    assert status(second)["weights-sha256"] == status(first)["weights-sha256"]
    assert [r.round for r in read_site_ledger(fed.ledger("site_0")).rounds] == [1]


def _ledger_files(ledger: Path) -> list[Path]:
    return [ledger, ledger.with_name(ledger.name + ".head")]


def test_rolled_back_ledger_refuses_until_an_officer_acts(fed, tmp_path):
    ledger = fed.ledger("site_0")
    ask(fed, 1)
    backup = tmp_path / "backup_after_round_1"
    backup.mkdir()
    for path in _ledger_files(ledger):
        shutil.copy2(path, backup / path.name)
    reply = ask(fed, 2)
    seen = (status(reply)["ledger-seq"], status(reply)["ledger-head"])
    newest = tmp_path / "newest"
    newest.mkdir()
    for path in _ledger_files(ledger):
        shutil.copy2(path, newest / path.name)
    # An older, self-consistent copy is restored: the ledger's own check cannot see it.
    for path in _ledger_files(ledger):
        shutil.copy2(backup / path.name, path)
    assert len(Ledger(ledger).entries()) < seen[0]

    refused = ask(fed, 3, expected_heads={"site_0": seen})
    assert status(refused)["status"] == "refused"
    assert status(refused)["reason"] == RefusalReason.LEDGER_ROLLBACK.value
    assert "arrays" not in refused.content and alarm_path(ledger).exists()
    # The alarm is durable: without the server's echo the site still refuses.
    again = ask(fed, 3)
    assert status(again)["reason"] == RefusalReason.ROLLBACK_ALARM.value
    with pytest.raises(AlarmNotResolved, match="restore the ledger"):
        clear_alarm(ledger, Ledger(ledger).entries(), officer="Dr. Officer")
    # The officer restores the ledger from the trusted copy and clears the alarm.
    for path in _ledger_files(ledger):
        shutil.copy2(newest / path.name, path)
    archived = clear_alarm(ledger, Ledger(ledger).entries(), officer="Dr. Officer")
    assert pending_alarm(ledger) is None and "Dr. Officer" in archived.read_text()
    assert status(ask(fed, 2, expected_heads={"site_0": seen}))["status"] == "ok"


def test_a_cut_ledger_is_refused_by_the_site_itself(fed):
    ledger = fed.ledger("site_0")
    ask(fed, 1)
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:-1]))   # the head record still names the cut entry
    reply = ask(fed, 2)
    assert status(reply)["reason"] == RefusalReason.LEDGER_DAMAGED.value
    assert "arrays" not in reply.content


def test_site_own_cap_wins_over_the_consortium_default(fed):
    site_yaml = fed.site_yaml("site_1")
    entry = yaml.safe_load(site_yaml.read_text())
    entry["budget"]["target_epsilon"] = 2.0
    site_yaml.write_text(yaml.safe_dump(entry))
    reply = ask(fed, 1, node_config={"site-config": str(site_yaml)},
                privacy={"target_epsilon": 50.0})
    accounting = dict(reply.content["accounting"])
    assert accounting["target-epsilon"] == 2.0 and accounting["epsilon"] <= 2.0


def test_a_site_never_releases_non_private_weights(fed):
    reply = ask(fed, 1, privacy={"enabled": False})
    assert status(reply)["status"] == "refused"
    assert status(reply)["reason"] == RefusalReason.PRIVACY_DISABLED.value
    assert "arrays" not in reply.content and not fed.ledger("site_0").exists()


def opt_in_to_non_private(fed: TinyFederation, site_id: str = "site_0") -> dict:
    """The site's own config allows non-private rounds; returns the node config naming it."""
    site_yaml = fed.site_yaml(site_id)
    site_yaml.write_text(yaml.safe_dump(yaml.safe_load(site_yaml.read_text())
                                        | {"allow_non_private": True}))
    return {"site-config": str(site_yaml)}


def test_an_opted_in_site_trains_non_privately_and_never_claims_a_finite_epsilon(fed):
    node = opt_in_to_non_private(fed)
    reply = ask(fed, 1, privacy={"enabled": False}, node_config=node)
    assert status(reply)["status"] == "ok"
    accounting = dict(reply.content["accounting"])
    assert accounting["epsilon"] == accounting["epsilon-next"] == math.inf
    assert accounting["target-epsilon"] == math.inf and accounting["noise-multiplier"] == 0
    assert accounting["num-patients"] == 4 and accounting["steps"] == 1
    weights = unpack_state(reply.content["arrays"])
    assert status(reply)["weights-sha256"] == weights_hash(weights)
    assert weights_hash(weights) != weights_hash(load_checkpoint(fed.checkpoint).denoiser_state)
    # Recorded (write-ahead) as a non-private round, and no DP plan or round.
    state = read_site_ledger(fed.ledger("site_0"))
    assert [r.round for r in state.non_private] == [1] and not state.plans and not state.rounds
    last = Ledger(fed.ledger("site_0")).entries()[-1]
    assert (status(reply)["ledger-seq"], status(reply)["ledger-head"]) == (last.seq, last.hash)
    # Asked again from the same weights: resent, not recorded twice.
    again = ask(fed, 1, privacy={"enabled": False}, node_config=node)
    assert status(again)["resumed"] is True
    assert status(again)["weights-sha256"] == status(reply)["weights-sha256"]
    assert len(Ledger(fed.ledger("site_0")).entries()) == 1
    # A DP round after it is refused: the spend is infinite (nothing is written).
    refused = ask(fed, 2, node_config=node)
    assert status(refused)["status"] == ReplyStatus.BUDGET_EXHAUSTED.value
    assert "arrays" not in refused.content
    assert dict(refused.content["accounting"])["epsilon"] == math.inf
    assert len(Ledger(fed.ledger("site_0")).entries()) == 1


def test_a_supernode_without_site_config_fails_with_the_fix():
    grid = LoopbackGrid(make_client_app(), [{}])
    message = Message(RecordDict({}), dst_node_id=next(iter(grid.get_node_ids())), message_type="train")
    reply = grid.deliver(message)
    assert reply.has_error() and "--node-config 'site-config=" in reply.error.reason


def _without_own_budget(fed: TinyFederation, site_id: str = "site_0") -> None:
    """Drop the site's budget from the simulation config and from its site YAML."""
    config = yaml.safe_load(fed.config_path.read_text())
    for entry in config["federation"]["sites"]:
        if entry["site_id"] == site_id:
            entry.pop("budget")
    fed.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    site_yaml = fed.site_yaml(site_id)
    entry = yaml.safe_load(site_yaml.read_text())
    entry.pop("budget")
    site_yaml.write_text(yaml.safe_dump(entry))


def test_a_deployed_site_without_a_budget_refuses_naming_the_key(fed, caplog):
    _without_own_budget(fed)
    with caplog.at_level("ERROR"):
        reply = ask(fed, 1, node_config={"site-config": str(fed.site_yaml("site_0"))})
    assert status(reply)["status"] == "refused"
    assert status(reply)["reason"] == RefusalReason.NO_SITE_BUDGET.value
    assert "arrays" not in reply.content and not fed.ledger("site_0").exists()
    lines = [r.getMessage() for r in caplog.records if "budget.target_epsilon" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_the_server_cannot_raise_a_simulated_site_s_locked_default_cap(fed):
    _without_own_budget(fed)
    first = ask(fed, 1, privacy={"target_epsilon": 3.0})
    assert dict(first.content["accounting"])["target-epsilon"] == 3.0
    state = read_site_ledger(fed.ledger("site_0"))
    assert [b.source for b in state.budgets] == ["consortium-default"] and state.cap == 3.0
    ask(fed, 2, privacy={"target_epsilon": 3.0})
    # The planned rounds are spent; a server that now sends a default of 100 is ignored.
    raised = ask(fed, 3, privacy={"target_epsilon": 100.0})
    assert status(raised)["status"] == ReplyStatus.BUDGET_EXHAUSTED.value
    accounting = dict(raised.content["accounting"])
    assert accounting["target-epsilon"] == 3.0 and accounting["epsilon"] <= 3.0
    state = read_site_ledger(fed.ledger("site_0"))
    assert state.cap == 3.0 and {p.target_epsilon for p in state.plans} == {3.0}
    assert len(state.rounds) == 2


def test_only_the_site_s_own_config_raises_a_locked_cap(fed):
    _without_own_budget(fed)
    ask(fed, 1, privacy={"target_epsilon": 3.0})
    ask(fed, 2, privacy={"target_epsilon": 3.0})
    site_yaml = fed.site_yaml("site_0")
    site_yaml.write_text(yaml.safe_dump(yaml.safe_load(site_yaml.read_text())
                                        | {"budget": {"target_epsilon": 20.0, "delta": 1e-3}}))
    reply = ask(fed, 3, node_config={"site-config": str(site_yaml)})
    assert status(reply)["status"] == "ok"
    state = read_site_ledger(fed.ledger("site_0"))
    assert [b.source for b in state.budgets] == ["consortium-default", "site-config"]
    assert state.cap == 20.0 and len(state.rounds) == 3


def test_non_finite_weights_are_a_refusal_with_its_code_and_no_charge(fed, monkeypatch):
    from client import site_runtime
    from privacy.dp_trainer import NonFiniteWeights

    def diverged(self, round):
        raise NonFiniteWeights("round 1 produced non-finite weights")

    monkeypatch.setattr(site_runtime.DPTrainer, "run_round", diverged)
    reply = ask(fed, 1)
    assert status(reply)["status"] == "refused"
    assert status(reply)["reason"] == RefusalReason.NON_FINITE_WEIGHTS.value
    assert "arrays" not in reply.content
    assert read_site_ledger(fed.ledger("site_0")).rounds == []
