"""A complete, tiny federation on disk: cohort, starting checkpoint and experiment YAML.

For tests and benchmarks of the federation machinery on a small CPU: 16^3 volumes, a two-level
autoencoder and UNet of a few channels, ``expected_batch_size`` equal to the site's patients (so
q = 1 and one DP-SGD step per round). The checkpoint is a random initialisation (no pretraining)
with the latent scale factor computed from the public latents, exactly as pretraining would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from configs import config_from_dict, config_to_dict

SIZE = 16
SPACING = 192.0 / SIZE


@dataclass(frozen=True)
class TinyFederation:
    config_path: Path
    checkpoint: Path
    run_dir: Path
    cohort: Path
    site_ids: list[str]

    def ledger(self, site_id: str) -> Path:
        return self.config_path.parent / "ledgers" / site_id / "ledger.jsonl"

    def site_yaml(self, site_id: str) -> Path:
        return self.config_path.parent / "sites" / f"{site_id}.yaml"


def tiny_model_section(attributes: list[str]) -> dict[str, Any]:
    return {"autoencoder": {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4},
            "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
                     "norm_num_groups": 4},
            "conditioning": {"mode": "concat", "attributes": attributes, "dropout": 0.2},
            "diffusion": {"train_timesteps": 20, "sampling_steps": 4}}


def write_checkpoint(path: Path, config_data: Mapping[str, Any], public_dir: Path, seed: int = 0) -> Path:
    """A random-init checkpoint whose latent scale factor comes from the public scans."""
    from models.data.site_data import load_site
    from models.autoencoder import build_autoencoder, encode_latents
    from models.checkpoint import DataGrid, save_checkpoint
    from models.latent_unet import build_latent_unet

    config = config_from_dict(config_data, check_paths=False)
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(config.model.autoencoder).eval()
    attributes = list(config.model.conditioning.attributes)
    denoiser = build_latent_unet(config.model, config.data.num_classes, len(attributes))
    public = load_site(public_dir, config.data, attributes=attributes)
    with torch.no_grad():
        images = torch.stack([public[i]["image"] for i in range(len(public))])
        scale = float(1.0 / encode_latents(autoencoder, images).std())
    save_checkpoint(path, autoencoder=autoencoder, denoiser=denoiser,
                    model_config=config_to_dict(config.model),
                    data=DataGrid(tuple(config.data.shape), tuple(config.data.spacing),
                                  tuple(config.data.label_names), tuple(attributes)),
                    latent_scale_factor=scale, metadata={"stage": "random-init"})
    return path


def write_tiny_federation(out: Path, *, sites: int = 3, patients: int = 4, rounds: int = 2,
                          min_sites: int = 1, caps: Mapping[str, float] | None = None,
                          cohort: Path | None = None, checkpoint: Path | None = None,
                          attributes: tuple[str, ...] = ("age", "sex"), seed: int = 0,
                          federation: Mapping[str, Any] | None = None,
                          release: Mapping[str, Any] | None = None,
                          unet_channels: list[int] | None = None, size: int = SIZE,
                          model: Mapping[str, Any] | None = None,
                          privacy: Mapping[str, Any] | None = None) -> TinyFederation:
    """Write ``out/config.yaml`` (sites inline, each site's ledger and gate log
    under ``out/ledgers/<site_id>``), plus one site YAML per
    site under ``out/sites`` (what each SuperNode would be given in deployment).

    ``cohort`` / ``checkpoint`` reuse existing ones (the cohort must have ``sites`` sites of
    ``patients`` patients); otherwise they are created under ``out``. ``caps`` sets a site's own
    ``target_epsilon`` (default 10). ``size`` (volumes size^3, spacing 192/size mm), ``model`` (the
    model section) and ``privacy`` (keys over the defaults) scale it up, e.g. for benchmarks.
    """
    from experiments.cohort import generate_cohort

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cohort is None:
        cohort = out / "cohort"
        generate_cohort(cohort, sites=sites, patients=patients, size=size, seed=seed,
                        public_patients=patients)
    cohort = Path(cohort).resolve()
    site_ids = [f"site_{k}" for k in range(sites)]
    site_entries = []
    for site_id in site_ids:
        entry = {"site_id": site_id, "data_dir": str(Path(cohort) / site_id),
                 # One state folder per site: its ledger and its gate log (gate_log.jsonl) are its own.
                 "ledger": str(out / "ledgers" / site_id / "ledger.jsonl"),
                 "budget": {"target_epsilon": float((caps or {}).get(site_id, 10.0)), "delta": 1e-3}}
        site_entries.append(entry)
        site_yaml = out / "sites" / f"{site_id}.yaml"
        site_yaml.parent.mkdir(parents=True, exist_ok=True)
        site_yaml.write_text(yaml.safe_dump(entry, sort_keys=False))
    data = {
        "seed": seed, "run_dir": str(out / "run"),
        "data": {"public_dir": str(Path(cohort) / "public"), "shape": [size] * 3,
                 "spacing": [192.0 / size] * 3},
        "model": dict(model) if model else tiny_model_section(list(attributes)),
        "federation": {"rounds": rounds, "local_epochs": 1, "min_sites": min_sites,
                       "sites": site_entries, "round_timeout": 600.0, **dict(federation or {})},
        "privacy": {"expected_batch_size": patients, "max_physical_batch_size": 2 * patients,
                    "target_epsilon": 10.0, "delta": 1e-3, **dict(privacy or {})},
        "tracking": {"experiment": "fedsynth-tiny"},
    }
    if release:
        data["release"] = dict(release)
    if unet_channels:
        data["model"]["unet"]["channels"] = list(unet_channels)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    if checkpoint is None:
        checkpoint = write_checkpoint(out / "run" / "checkpoint.pt", data, Path(cohort) / "public", seed)
    return TinyFederation(config_path, Path(checkpoint), out / "run", Path(cohort), site_ids)
