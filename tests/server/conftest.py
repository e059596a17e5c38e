"""Shared pieces of the federation tests: one tiny cohort and checkpoint, fresh ledgers per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.client_app import make_client_app
from configs import load_config
from experiments.federate import prepare_public_validation
from experiments.loopback import LoopbackGrid
from experiments.tiny_federation import TinyFederation, write_tiny_federation
from server.federation import FederationSettings

SITES, PATIENTS = 3, 4


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_federation(tmp_path_factory) -> TinyFederation:
    """3 sites x 4 patients of 16^3 volumes and a random-init checkpoint, made once per session."""
    return write_tiny_federation(tmp_path_factory.mktemp("federation"), sites=SITES, patients=PATIENTS)


@pytest.fixture
def new_federation(shared_federation, tmp_path):
    """``new_federation(**options)``: a federation config in ``tmp_path`` with fresh site ledgers."""
    def build(folder: Path | None = None, **options) -> TinyFederation:
        options.setdefault("sites", SITES)
        options.setdefault("patients", PATIENTS)
        return write_tiny_federation(folder or tmp_path, cohort=shared_federation.cohort,
                                     checkpoint=shared_federation.checkpoint, **options)
    return build


def loopback_grid(fed: TinyFederation, grid_class: type[LoopbackGrid] = LoopbackGrid,
                  **kwargs) -> LoopbackGrid:
    """Every site of ``fed`` as an in-process node (partition ids 0..n-1)."""
    count = len(fed.site_ids)
    return grid_class(make_client_app(str(fed.config_path)),
                      [{"partition-id": k, "num-partitions": count} for k in range(count)], **kwargs)


def federation_settings(fed: TinyFederation, resume: bool = False, evaluate: bool = True,
                        tracking: bool = True) -> FederationSettings:
    config = load_config(fed.config_path)
    if evaluate:
        prepare_public_validation(config, fed.run_dir)
    return FederationSettings(config=config, run_dir=fed.run_dir, checkpoint=fed.checkpoint,
                              resume=resume, config_file=fed.config_path, evaluate=evaluate,
                              tracking=tracking)


@pytest.fixture
def make_grid():
    """``make_grid(fed, grid_class=LoopbackGrid)``: all sites of ``fed`` as in-process nodes."""
    return loopback_grid


@pytest.fixture
def make_settings():
    """``make_settings(fed, resume=False, evaluate=True, tracking=True)``: FederationSettings."""
    return federation_settings
