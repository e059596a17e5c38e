"""The typed config loader: every documented error is one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs import (Config, ConfigError, SiteConfig, config_from_dict, flatten_config,
                     load_config, load_site_config)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name, check_paths=False)
    assert isinstance(config, Config)
    assert all(s % config.total_downsampling == 0 for s in config.data.shape)


def test_shipped_site_example_loads():
    site = load_site_config(REPO / "configs" / "site.example.yaml", check_paths=False)
    assert isinstance(site, SiteConfig)
    assert site.ledger_path == Path("/data/fedsynth/.fedsynth/ledger.jsonl")


def test_defaults_fill_every_section():
    config = config_from_dict({}, check_paths=False)
    assert config.data.num_classes == 4
    assert config.model.autoencoder.downsampling == 2
    assert config.model.unet.downsampling == 4
    assert config.privacy.target_epsilon == 10.0


@pytest.mark.parametrize("data, expected", [
    ({"privacy": {"target_epsilon": -1}}, "privacy.target_epsilon: must be > 0 (got -1)"),
    ({"privacy": {"target_epsilon": 0}}, "privacy.target_epsilon: must be > 0 (got 0)"),
    ({"privacy": {"delta": 0}}, "privacy.delta: must be > 0 (got 0)"),
    ({"privacy": {"delta": 1.5}}, "privacy.delta: must be < 1 (got 1.5)"),
    ({"federation": {"rounds": 0}}, "federation.rounds: must be > 0 (got 0)"),
    ({"federation": {"rounds": "three"}}, "federation.rounds: expected an integer (got 'three')"),
    ({"federation": {"rounds": 2.5}}, "federation.rounds: expected an integer (got 2.5)"),
    ({"privacy": {"enabled": "yes"}}, "privacy.enabled: expected true or false (got 'yes')"),
    ({"model": {"unet": {"chanels": [8]}}},
     "model.unet.chanels: unknown key (did you mean 'channels'?)"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"privacy": {"accountant": "gdp"}},
     "privacy.accountant: must be one of 'rdp', 'prv' (got 'gdp')"),
    ({"data": {"shape": [30, 32, 32]}}, "data.shape: each size must be divisible by 8"),
    ({"data": {"shape": [32, 32]}}, "data.shape: expected a list of 3 values"),
    ({"site_budget_typo": {}}, "site_budget_typo: unknown key"),
    ({"model": {"unet": {"channels": [8, 16], "attention_levels": [False]}}},
     "model.unet.attention_levels: needs one entry per channel level"),
    ({"model": {"diffusion": {"train_timesteps": 10, "sampling_steps": 20}}},
     "model.diffusion.sampling_steps: must be <= train_timesteps=10 (got 20)"),
    ({"release": {"threshold": {"policy": "fixed"}}},
     "release.threshold.value: is required when policy is 'fixed'"),
    ({"model": {"autoencoder": {"decoder_map_classes": 3}}},
     "model.autoencoder.decoder_map_classes: must be 0 or the number of data.label_names (4)"),
    ({"model": {"autoencoder": {"kind": "vq", "decoder_map_classes": 4}}},
     "model.autoencoder.decoder_map_classes: a decoder that sees the map needs kind: kl"),
    ({"federation": {"sites": [{"data_dir": "/tmp"}]}},
     "federation.sites[0].site_id: is required but missing"),
    ({"federation": {"sites": [{"site_id": "a", "data_dir": "/tmp", "budget": {"delta": 1}}]}},
     "federation.sites[0].budget.delta: must be < 1 (got 1)"),
])
def test_each_error_is_one_line_naming_key_and_fix(data, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, check_paths=False)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_shape_error_suggests_a_divisible_shape():
    with pytest.raises(ConfigError, match=r"try \[32, 32, 32\]"):
        config_from_dict({"data": {"shape": [30, 31, 32]}}, check_paths=False)


def test_missing_data_path_is_named(tmp_path):
    path = write(tmp_path, {"data": {"public_dir": "no_such_folder"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: data.public_dir: path does not exist")
    assert "no_such_folder" in message


def test_missing_site_data_dir_is_named(tmp_path):
    path = write(tmp_path, {"federation": {"sites": [{"site_id": "a", "data_dir": "gone"}]}})
    with pytest.raises(ConfigError, match=r"federation\.sites\[0\]\.data_dir: path does not exist"):
        load_config(path)


def test_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "cohort" / "public").mkdir(parents=True)
    path = write(tmp_path, {"data": {"public_dir": "cohort/public"}, "run_dir": "out"})
    config = load_config(path)
    assert config.data.public_dir == (tmp_path / "cohort" / "public").resolve()
    assert config.run_dir == (tmp_path / "out").resolve()


def test_sites_may_be_separate_files(tmp_path):
    (tmp_path / "hosp" / "data").mkdir(parents=True)
    write(tmp_path / "hosp", {"site_id": "h1", "data_dir": "data",
                              "budget": {"target_epsilon": 3.0}}, "site.yaml")
    path = write(tmp_path, {"federation": {"sites": ["hosp/site.yaml"], "min_sites": 1}})
    config = load_config(path)
    site = config.federation.sites[0]
    assert site.data_dir == (tmp_path / "hosp" / "data").resolve()
    assert config.site_budget(site).target_epsilon == 3.0


def test_site_without_budget_takes_consortium_default(tmp_path):
    config = config_from_dict({"privacy": {"target_epsilon": 4.0, "delta": 1e-4},
                               "federation": {"sites": [{"site_id": "a", "data_dir": "/tmp"}]}},
                              check_paths=False)
    budget = config.site_budget(config.federation.sites[0])
    assert (budget.target_epsilon, budget.delta) == (4.0, 1e-4)


def test_duplicate_site_ids_and_min_sites(tmp_path):
    sites = [{"site_id": "a", "data_dir": "/tmp"}, {"site_id": "b", "data_dir": "/tmp"}]
    with pytest.raises(ConfigError, match="federation.min_sites: must be <= the number of sites"):
        config_from_dict({"federation": {"sites": sites, "min_sites": 3}}, check_paths=False)
    with pytest.raises(ConfigError, match="site_id must be unique"):
        config_from_dict({"federation": {"sites": [sites[0], sites[0]]}}, check_paths=False)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    path = write(tmp_path, "privacy: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+: .*fix the YAML syntax"):
        load_config(path)
    path = write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_flatten_gives_dotted_string_params():
    flat = flatten_config(config_from_dict({}, check_paths=False))
    assert flat["privacy.target_epsilon"] == "10.0"
    assert flat["model.unet.channels"] == "[32, 64, 64]"


def test_default_yaml_documents_the_schema_defaults():
    """configs/default.yaml must say exactly what the code does when a key is left out."""
    from configs import config_to_dict
    documented = config_to_dict(load_config(REPO / "configs" / "default.yaml", check_paths=False))
    actual = config_to_dict(config_from_dict({}, check_paths=False))
    assert documented == actual
