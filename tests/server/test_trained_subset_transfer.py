"""When only a subset of the denoiser is trained, only that subset travels after the first round:
the site completes it from its cached full model and checks the global hash before training; a
site that lost its copy, or whose rebuild does not match, refuses before any private computation."""

from __future__ import annotations

import stat

import torch
import yaml
from flwr.app import ArrayRecord, Message, RecordDict

from experiments.loopback import LoopbackGrid
from models.checkpoint import load_checkpoint
from privacy.packed_state import pack_state, packed_shapes, unpack_state
from privacy.protocol import GLOBAL_WEIGHTS, ROUND_CONFIG, RoundConfig
from privacy.site_ledger import SiteLedger
from privacy.trainable import trainable_parameter_names
from server.federation import run_federation
from tests.server.conftest import federation_settings, loopback_grid

SITE_1 = 3   # node id of site_1 (partition 1)


def _subset_federation(new_federation, rounds: int):
    fed = new_federation(sites=2, rounds=rounds, min_sites=1)
    data = yaml.safe_load(fed.config_path.read_text())
    data["privacy"]["trainable"] = "attention_conditioning"
    fed.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return fed


class Recording(LoopbackGrid):
    """Records each delivered instruction's weight names and base hash; ``tamper`` may change a
    message before a site sees it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, dict[int, tuple[set[str], str]]] = {}
        self.tamper = None

    def deliver(self, message: Message) -> Message:
        config = RoundConfig.from_record(dict(message.content[ROUND_CONFIG]))
        node = message.metadata.dst_node_id
        if self.tamper is not None:
            self.tamper(config.server_round, node, message)
        self.seen.setdefault(config.server_round, {})[node] = (
            set(packed_shapes(message.content[GLOBAL_WEIGHTS])),
            RoundConfig.from_record(dict(message.content[ROUND_CONFIG])).base_sha256)
        return super().deliver(message)


def test_only_the_trained_subset_travels_after_the_first_round(new_federation):
    fed = _subset_federation(new_federation, rounds=3)
    grid = loopback_grid(fed, Recording)
    result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False))
    assert [r.participants for r in result.rounds] == [["site_0", "site_1"]] * 3
    base = load_checkpoint(fed.checkpoint)
    trained = set(trainable_parameter_names(base.build_denoiser(), "attention_conditioning"))
    assert trained and trained < set(base.denoiser_state)
    for node in (2, 3):
        names, base_hash = grid.seen[1][node]
        assert names == set(base.denoiser_state) and base_hash == ""
        for server_round in (2, 3):
            names, base_hash = grid.seen[server_round][node]
            assert names == trained and base_hash
    sent = [r.bytes_sent for r in result.rounds]
    assert sent[1] < sent[0] / 2 and sent[2] == sent[1]
    # The cached full model is public weights, kept privately all the same (0600).
    for site_id in fed.site_ids:
        [copy] = fed.ledger(site_id).parent.glob("cache/denoiser-*.pt")
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # The frozen part never moved: the final model's frozen tensors are the starting ones.
    final = load_checkpoint(result.final_checkpoint)
    for name, tensor in base.denoiser_state.items():
        if name not in trained:
            assert torch.equal(final.denoiser_state[name], tensor)
    assert any(not torch.equal(final.denoiser_state[n], base.denoiser_state[n]) for n in trained)


def test_a_site_without_its_cached_model_refuses_and_gets_the_full_model_again(new_federation):
    fed = _subset_federation(new_federation, rounds=3)
    grid = loopback_grid(fed, Recording)

    def lose_copy(server_round: int, node: int, message: Message) -> None:
        if server_round == 2 and node == SITE_1:
            for path in fed.ledger("site_1").parent.glob("cache/denoiser-*.pt"):
                path.unlink()

    grid.tamper = lose_copy
    result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False))
    assert result.rounds[1].declined == {"site_1": "refused (denoiser-missing)"}
    assert grid.seen[3][SITE_1][1] == ""        # round 3: the full model again
    assert result.rounds[2].participants == ["site_0", "site_1"]


def test_a_subset_that_does_not_rebuild_the_global_model_is_refused_before_training(new_federation):
    fed = _subset_federation(new_federation, rounds=2)
    grid = loopback_grid(fed, Recording)
    ledger_after_round_1: dict[str, bytes] = {}

    def corrupt(server_round: int, node: int, message: Message) -> None:
        if server_round != 2 or node != SITE_1:
            return
        ledger_after_round_1["site_1"] = fed.ledger("site_1").read_bytes()
        weights = unpack_state(message.content[GLOBAL_WEIGHTS])
        name = next(iter(weights))
        weights[name] = weights[name] + 1.0
        packed = ArrayRecord(torch_state_dict=pack_state(weights))
        message.content = RecordDict({**dict(message.content.items()), GLOBAL_WEIGHTS: packed})

    grid.tamper = corrupt
    result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False))
    assert result.rounds[1].declined == {"site_1": "refused (model-mismatch)"}
    assert result.rounds[1].participants == ["site_0"]
    # Nothing private was computed: the site's ledger is byte for byte what it was.
    assert fed.ledger("site_1").read_bytes() == ledger_after_round_1["site_1"]
    assert SiteLedger(fed.ledger("site_1")).state().rounds[-1].round == 1
