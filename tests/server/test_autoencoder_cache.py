"""The public autoencoder travels once per site: the site caches it on disk by hash (mode 0600),
later rounds leave it out, and a site that lost its copy refuses and gets it again."""

from __future__ import annotations

import stat

from flwr.app import Message

from client.client_app import autoencoder_cache_path
from configs import load_config
from experiments.loopback import LoopbackGrid
from privacy.protocol import FROZEN_AUTOENCODER, ROUND_CONFIG
from server.federation import run_federation
from tests.server.conftest import federation_settings, loopback_grid


class Recording(LoopbackGrid):
    """Records, per round, which nodes got the autoencoder; deletes site_1's cache before round 3."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed, self.with_autoencoder = None, {}

    def deliver(self, message: Message) -> Message:
        server_round = int(message.content[ROUND_CONFIG]["server-round"])
        self.with_autoencoder.setdefault(server_round, {})[message.metadata.dst_node_id] = \
            FROZEN_AUTOENCODER in message.content
        if server_round == 3 and message.metadata.dst_node_id == 3:
            for path in self.fed.ledger("site_1").parent.glob("cache/autoencoder-*.pt"):
                path.unlink()
        return super().deliver(message)


def test_the_autoencoder_is_sent_once_per_site_and_cached_privately(new_federation):
    fed = new_federation(sites=2, rounds=4, min_sites=1)
    grid = loopback_grid(fed, Recording)
    grid.fed = fed
    result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False))
    assert result.rounds_completed == 4
    sent = grid.with_autoencoder
    assert sent[1] == {2: True, 3: True} and sent[2] == {2: False, 3: False}
    # site_1 (node 3) lost its copy before round 3: it refused, and round 4 sent it again.
    assert sent[3] == {2: False, 3: False} and sent[4] == {2: False, 3: True}
    assert [s.participants for s in result.rounds] == [["site_0", "site_1"], ["site_0", "site_1"],
                                                       ["site_0"], ["site_0", "site_1"]]
    assert result.rounds[2].declined == {"site_1": "refused (autoencoder-missing)"}
    config = load_config(fed.config_path)
    for site in config.federation.sites:
        [path] = autoencoder_cache_path(site, "x").parent.glob("autoencoder-*.pt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    later = [s.bytes_sent for s in result.rounds]
    assert later[1] < later[0] and later[3] > later[1]
