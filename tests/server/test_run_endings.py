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
