"""A site encodes its scans once and keeps them on its own disk (private modes) across ClientApp
processes; the copy is invalidated when the data, the grid or the autoencoder changes."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import replace
from unittest import mock

import yaml
from flwr.app import Message

from client import latent_cache, site_runtime
from configs import load_config
from experiments.loopback import LoopbackGrid
from privacy.protocol import ROUND_CONFIG, RoundConfig
from server.federation import run_federation
from tests.server.conftest import federation_settings, loopback_grid


class FreshProcesses(LoopbackGrid):
    """Every message meets an empty in-memory cache, as a fresh ``flwr-clientapp`` process would;
    ``before`` runs before a message is delivered."""

    before = None

    def deliver(self, message: Message) -> Message:
        site_runtime._encoded.clear()
        config = RoundConfig.from_record(dict(message.content[ROUND_CONFIG]))
        if self.before is not None:
            self.before(config.server_round, message.metadata.dst_node_id)
        return super().deliver(message)


def test_encoded_scans_are_cached_on_disk_privately_and_invalidated_by_the_data(new_federation,
                                                                                 tmp_path):
    fed = new_federation(tmp_path / "fed", sites=2, rounds=3, min_sites=2)
    # site_0 reads a private copy of its scans, so that touching one affects no other test.
    data = yaml.safe_load(fed.config_path.read_text())
    copy = tmp_path / "site_0_data"
    shutil.copytree(data["federation"]["sites"][0]["data_dir"], copy)
    data["federation"]["sites"][0]["data_dir"] = str(copy)
    fed.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    encoded: list[tuple[int, str]] = []
    real_encode = site_runtime.encode_site
    current = {"round": 0}

    def counting_encode(site, *args, **kwargs):
        encoded.append((current["round"], site.site_id))
        return real_encode(site, *args, **kwargs)

    folders = {site_id: fed.ledger(site_id).parent / "cache" / "latents" for site_id in fed.site_ids}
    seen_files: dict[int, dict[str, list[str]]] = {}

    def before(server_round: int, node: int) -> None:
        current["round"] = server_round
        seen_files.setdefault(server_round, {s: sorted(p.name for p in f.glob("latents-*.pt"))
                                             for s, f in folders.items() if f.exists()})
        if server_round == 3 and node == 2:   # site_0: one scan file is rewritten
            scan = next(copy.rglob("*.nii.gz"))
            stat_ = scan.stat()
            os.utime(scan, ns=(stat_.st_atime_ns, stat_.st_mtime_ns + 10 ** 9))

    grid = loopback_grid(fed, FreshProcesses)
    grid.before = before
    with mock.patch.object(site_runtime, "encode_site", counting_encode):
        result = run_federation(grid, federation_settings(fed, evaluate=False, tracking=False))
    assert result.rounds_completed == 3
    # Round 1 encodes both sites; round 2 reads both from disk; round 3 re-encodes site_0 only.
    assert sorted(encoded) == [(1, "site_0"), (1, "site_1"), (3, "site_0")]
    for site_id, folder in folders.items():
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        [entry] = folder.glob("latents-*.pt")           # the old entry was deleted
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert seen_files[3]["site_0"] != [p.name for p in folders["site_0"].glob("latents-*.pt")]
    assert seen_files[3]["site_1"] == [p.name for p in folders["site_1"].glob("latents-*.pt")]


def test_the_key_changes_with_the_grid_the_attributes_the_autoencoder_and_the_map_encoding(
        new_federation, tmp_path):
    fed = new_federation(tmp_path / "fed", sites=1, rounds=1)
    config = load_config(fed.config_path)
    copy = tmp_path / "site_data"
    shutil.copytree(config.federation.sites[0].data_dir, copy)
    site = replace(config.federation.sites[0], data_dir=copy)
    grid = {"shape": [16, 16, 16], "spacing": [12.0] * 3, "label_names": ["a"],
            "intensity_percentiles": [0.5, 99.5]}

    def key(**change) -> str:
        parts = {"grid": grid, "attributes": ["age"], "autoencoder_sha256": "a" * 64,
                 "latent_scale_factor": 1.0, **change}
        return latent_cache.cache_key(site, config.data, **parts)

    first = key()
    assert first == key()
    assert first != key(grid={**grid, "shape": [32] * 3})
    assert first != key(attributes=["age", "sex"])
    assert first != key(autoencoder_sha256="b" * 64)
    assert first != key(latent_scale_factor=2.0)
    assert first == key(map_encoding="fractions")
    assert first != key(map_encoding="space_to_depth")
    manifest = copy / site.manifest
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")   # same rows, other order
    second = key()
    assert second != first
    label = sorted(p for p in copy.rglob("*.nii*") if p.is_file())[-1]
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10 ** 9))
    assert key() not in (first, second)
