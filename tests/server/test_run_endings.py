"""How a federation ends: a resume of a finished run adds nothing; a run where no site trained fails."""

from __future__ import annotations

import pytest

from privacy.ledger import Ledger
from server.consortium_ledger import END
from server.federation import FederationHalted, federation_dir, run_federation
from tests.server.test_federation_loop import consortium


def test_a_resume_after_the_last_round_appends_nothing(new_federation, make_grid, make_settings):
    fed = new_federation(sites=2, rounds=1, min_sites=1)
    first = run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    path = federation_dir(fed.run_dir) / "consortium_ledger.jsonl"
    before = path.read_bytes()
    again = run_federation(make_grid(fed), make_settings(fed, resume=True, evaluate=False,
                                                         tracking=False))
    assert (again.rounds_completed, again.stop_reason) == (1, first.stop_reason)
    assert path.read_bytes() == before
    assert len(consortium(fed).effective(END)) == 1
    assert Ledger(path).entries()


def test_a_federation_in_which_no_site_trained_is_an_error(new_federation, make_grid, make_settings):
    fed = new_federation(sites=2, rounds=2, min_sites=1, caps={"site_0": 1e-6, "site_1": 1e-6})
    with pytest.raises(FederationHalted, match="no site trained") as raised:
        run_federation(make_grid(fed), make_settings(fed, evaluate=False, tracking=False))
    message = str(raised.value)
    assert "\n" not in message and "site_0" in message and "site_1" in message


def test_a_simulation_with_fewer_nodes_than_sites_refuses_to_train(new_federation, make_settings):
    from client.client_app import make_client_app
    from experiments.loopback import LoopbackGrid
    from server.consortium_ledger import SITE_FAILURE

    fed = new_federation(sites=3, rounds=1, min_sites=2)
    two_nodes = LoopbackGrid(make_client_app(str(fed.config_path)),
                             [{"partition-id": k, "num-partitions": 2} for k in range(2)])
    with pytest.raises(FederationHalted):
        run_federation(two_nodes, make_settings(fed, evaluate=False, tracking=False))
    errors = [e.payload["error"] for e in consortium(fed).effective(SITE_FAILURE)]
    assert len(errors) == 2 and all("options.num-supernodes = 3" in e for e in errors)
    assert not any(fed.ledger(s).exists() for s in fed.site_ids)
