"""The release: sample candidates from the final global model, gate them at every site, write.

One release fills ``num`` numbered *slots* (``synth_0000`` ...). Rounds repeat until every slot is
released or has used ``release.max_attempts`` candidates:

1. **Generate.** Each pending slot gets its candidate for its current attempt, drawn from a seed
   fixed by ``(seed, slot, attempt)`` alone: a PUBLIC map (the public cohort's label map, randomly
   deformed by MONAI's ``Rand3DElastic`` when ``release.deform_masks``), attributes drawn from
   ``release.attribute_ranges`` (an attribute without a range keeps the public scan's value),
   and the initial latent noise; then guided DDIM and decoding. A round takes at most
   ``release.chunk_size`` slots. The round's candidates are cached to disk BEFORE they are sent.
2. **Gate.** One Flower query message (``query.gate``) per site: the candidate volumes (or, for
   the ``latent`` distance, the embeddings of every translate by the frozen public encoder, plus
   the encoder itself so the site can embed its scans) and a :class:`privacy.gate.GateQuery`, which
   carries each site's expected ledger head from the consortium ledger. Every site answers
   pass/fail per candidate (:mod:`client.gate`); only that and counts return. Every answer (its
   DP-gate charge, totals and ledger head) is mirrored in the consortium ledger (``site-gate``).
3. **Decide.** A candidate is released only if EVERY site passed it. A rejected slot moves to its
   next attempt (a new seed, so a new candidate); a slot out of attempts stays empty. Every
   rejection is counted, per site. The decision is written to the state file before any file.
4. **Write.** Released samples are written atomically, one file per slot name, from the cache.

Resume. ``release_state.json`` (replaced atomically) records each round's stage (``generated``
-> ``decided`` -> ``written``). A rerun with the same ``--out`` continues: a round cut after its
decision writes its files from the cache (no new gate query); a round cut before its decision
re-sends the SAME query (same id, same candidates), which every site answers from its gate log
without computing or charging again. Slot names fix file names, so nothing is duplicated;
decisions precede writes, so nothing is lost.

Outputs in ``--out``: ``images/``, ``labels/``, ``manifest.csv`` (site format, per-sample gate
results), ``preview.png``, ``release_report.json`` + ``.md`` (:mod:`server.release_report`) and
the state file.

The gate round is :func:`gate_round` over a Flower ``Grid``: the same code runs in simulation
(:func:`make_release_app` with ``flwr.simulation.run_simulation``) and in deployment.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from monai.transforms import Rand3DElastic
from tqdm.auto import tqdm

from configs import Config, config_to_dict
from models.checkpoint import Checkpoint, CheckpointError, atomic_torch_save, load_checkpoint
from models.device import autocast, module_device, resolve_device, to_device
from models.diffusion import build_sampler, initial_noise, sample_latents, sampling_steps
from models.memory import configure
from models.previews import save_preview
from models.volume_io import write_volume
from privacy.durable import atomic_write_bytes
from privacy.gate import (IMAGE_DISTANCES, GateAnswer, GateQuery, GateStatus, ThresholdPolicy,
                          check_gate_reply, latent_views, translations, views_of)
from privacy.outbox import weights_hash
from privacy.packed_state import pack_state
from privacy.protocol import (ARRAYS, CONFIG, GATE_ACCOUNTING, GATE_AUTOENCODER, GATE_CANDIDATES,
                              GATE_CONFIG, GATE_MESSAGE_TYPE, GATE_PASSED, GATE_STATUS, METRICS,
                              ProtocolViolation)
from server.federation import wait_for_nodes
from server.messaging import ReplyStream

log = logging.getLogger(__name__)

STATE_FILE = "release_state.json"
CACHE_DIR = ".release"
MANIFEST_FILE = "manifest.csv"
PREVIEW_FILE = "preview.png"
_STATE_FORMAT = "fedsynth-release-state/1"
_PREVIEW_LIMIT = 8
# The public maps' deformation: a smooth field (4-6 voxel smoothness; displacement std 0.88
# voxel per axis as written here, measured, times ``release.deform_scale``, default 0.5) plus up
# to ~3 degrees of rotation, 2 % scaling and half a voxel of translation. At scale 1, on the demo
# cohort's maps at 32^3 (8 maps x 3 seeds): ~40 % of the brain's voxels change class (GM/WM
# layers are 1-2 voxels thick there), the brain's centroid moves by at most 1.6 voxels.
_ELASTIC = dict(sigma_range=(4.0, 6.0), magnitude_range=(60.0, 120.0), rotate_range=(0.05,) * 3,
                scale_range=(0.02,) * 3, translate_range=(0.5,) * 3)


class ReleaseError(ValueError):
    """A release that cannot start or resume. One line naming the problem and the fix."""


class ReleaseHalted(RuntimeError):
    """A gate round could not be completed (a site failed, refused or did not answer). The state
    is kept: fix the site and run the same command again to resume."""


@dataclass(frozen=True)
class PublicMaps:
    """The public cohort's label maps, the release's conditions: labels (K, D, H, W) uint8 class
    indices on the model grid, affines (K, 4, 4) float64 (RAS), attributes (K, A) float32 in the
    checkpoint's attribute order, and one name per map."""

    labels: torch.Tensor
    affines: torch.Tensor
    attributes: torch.Tensor
    names: list[str]


@dataclass(frozen=True)
class ReleasePlan:
    """A validated release: what to sample from, on which maps, how many, where to write."""

    config: Config
    checkpoint_path: Path
    checkpoint: Checkpoint
    maps: PublicMaps
    num: int
    out: Path
    sites: tuple[str, ...]
    run_dir: Path | None = None
    batch_size: int = 4
    timeout: float = 3600.0

    @property
    def settings(self) -> dict[str, Any]:
        """What defines the release (a resume must match it)."""
        return {"num": self.num, "seed": self.config.seed,
                "model_sha256": self.checkpoint.content_hash,
                "release": config_to_dict(self.config.release)}


@dataclass(frozen=True)
class Condition:
    """What one candidate is generated from."""

    map_index: int
    deform_seed: int | None
    attributes: list[float]
    noise_seed: int


@dataclass
class GateRoundResult:
    """The answers of one gate round: per site id its answer and pass/fail array; failed nodes."""

    answers: dict[str, GateAnswer] = field(default_factory=dict)
    passed: dict[str, np.ndarray] = field(default_factory=dict)
    failed: list[tuple[int, str]] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)   # site id -> the node that answered


@dataclass(frozen=True)
class ReleaseResult:
    requested: int
    released: int
    candidates: int
    rejections: int
    exhausted: int
    out: Path
    manifest: Path
    report_json: Path
    report_markdown: Path


# --- inputs --------------------------------------------------------------------------------------

def check_num(num: Any) -> int:
    """The number of samples to release; :class:`ReleaseError` unless a whole number > 0."""
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise ReleaseError(f"--num: must be a whole number > 0 (got {num!r}); ask for at least "
                           f"one sample")
    return num


def load_public_maps(config: Config, grid: Any) -> PublicMaps:
    """The public cohort's label maps (``data.public_dir``) on the checkpoint's grid, with its
    attributes: the server reads them itself (public data), never a site's folder."""
    from models.data.site_data import load_site

    if config.data.public_dir is None:
        raise ReleaseError("data.public_dir: not set; the release conditions on the PUBLIC "
                           "cohort's label maps - point it at a site-format folder (e.g. "
                           "`fedsynth cohort` writes <out>/public)")
    dataset = load_site(Path(config.data.public_dir), config.data, config.data.manifest,
                        grid.attributes)
    items = [dataset[i] for i in range(len(dataset))]
    return PublicMaps(
        labels=torch.stack([item["label"].argmax(0).to(torch.uint8) for item in items]),
        affines=torch.stack([item["affine"].to(torch.float64) for item in items]),
        attributes=torch.stack([item["attributes"].float() for item in items]).reshape(
            len(items), -1),
        names=[f"{r.patient_id}:{r.label.name}" for r in dataset.records])


def _check_maps(maps: PublicMaps, checkpoint: Checkpoint) -> None:
    grid, labels = checkpoint.data, maps.labels
    if labels.ndim != 4 or tuple(labels.shape[1:]) != tuple(grid.shape):
        raise ReleaseError(f"public maps: grid {list(labels.shape[1:])} differs from the "
                           f"checkpoint's {list(grid.shape)}; set data.shape to "
                           f"{list(grid.shape)} (the grid the model was trained on) or pass the "
                           f"checkpoint trained on this grid")
    if labels.shape[0] == 0:
        raise ReleaseError("public maps: none given; data.public_dir must list at least one scan")
    if labels.min() < 0 or labels.max() >= grid.num_classes:
        raise ReleaseError(f"public maps: label values span [{int(labels.min())}, "
                           f"{int(labels.max())}] but the model knows {grid.num_classes} classes; "
                           f"relabel the maps")
    count = labels.shape[0]
    if tuple(maps.affines.shape) != (count, 4, 4) or len(maps.names) != count or \
            tuple(maps.attributes.shape) != (count, len(grid.attributes)):
        raise ReleaseError(f"public maps: need one affine (4x4), one name and "
                           f"{len(grid.attributes)} attribute value(s) {list(grid.attributes)} "
                           f"per map")


def prepare_release(config: Config, checkpoint: Path | Checkpoint, maps: PublicMaps, num: int,
                    out: Path, *, checkpoint_path: Path | None = None,
                    run_dir: Path | None = None, batch_size: int = 4) -> ReleasePlan:
    """Validate everything before any site is contacted; :class:`ReleaseError` (one line) if not."""
    check_num(num)
    if isinstance(checkpoint, Checkpoint):
        model, path = checkpoint, Path(checkpoint_path or "checkpoint.pt")
    else:
        path = Path(checkpoint)
        try:
            model = load_checkpoint(path)
        except CheckpointError as err:
            raise ReleaseError(str(err)) from None
    _check_maps(maps, model)
    extra = sorted(set(config.release.attribute_ranges) - set(model.data.attributes))
    if extra:
        log.warning("release.attribute_ranges names %s, which the model is not conditioned on; "
                    "ignored", extra)
    if batch_size <= 0:
        raise ReleaseError(f"--batch-size: must be > 0 (got {batch_size})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReleaseError(f"{out}: exists and is not a folder; choose a new output folder")
    if out.exists() and any(out.iterdir()) and not (out / STATE_FILE).exists():
        raise ReleaseError(f"{out}: folder is not empty and holds no {STATE_FILE}; choose a new "
                           f"output folder (or the folder of the release to resume)")
    plan = ReleasePlan(config=config, checkpoint_path=path, checkpoint=model, maps=maps, num=num,
                       out=out, sites=tuple(s.site_id for s in config.federation.sites),
                       run_dir=run_dir, batch_size=batch_size,
                       timeout=config.federation.round_timeout)
    state = _read_state(out)
    if state is not None:
        _check_resume(state, plan)
    return plan


def _check_resume(state: Mapping[str, Any], plan: ReleasePlan) -> None:
    stored, current = state["settings"], plan.settings
    where = plan.out / STATE_FILE
    for key in ("model_sha256", "num", "seed"):
        if stored[key] != current[key]:
            raise ReleaseError(f"{where}: the release there used {key} {stored[key]}, this one "
                               f"{current[key]}; resume with the same settings or choose a new "
                               f"--out")
    if stored["release"] != current["release"]:
        keys = set(stored["release"]) | set(current["release"])
        changed = sorted(k for k in keys if stored["release"].get(k) != current["release"].get(k))
        raise ReleaseError(f"{where}: release.{changed[0]} differs from the release being "
                           f"resumed; restore it or choose a new --out")


# --- candidates ----------------------------------------------------------------------------------

def slot_seed(seed: int, slot: int, attempt: int) -> int:
    """A 63-bit seed fixed by (release seed, slot, attempt) alone."""
    digest = hashlib.sha256(f"fedsynth-release/{seed}/{slot}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _integer_attribute(low: float, high: float, public: np.ndarray) -> bool:
    values = public[np.isfinite(public)]
    return float(low).is_integer() and float(high).is_integer() and \
        bool(np.all(values == np.round(values)))


def _draw_map(rng: np.random.Generator, count: int, deform: bool) -> tuple[int, int | None]:
    """The first draws of a (slot, attempt): which of ``count`` public maps, and its
    deformation's seed (None without ``release.deform_masks``)."""
    k = int(rng.integers(count))
    return k, int(rng.integers(2 ** 31)) if deform else None


def first_attempt_maps(config: Config, public_labels: torch.Tensor, num: int,
                       num_classes: int) -> torch.Tensor:
    """The maps ``(num, D, H, W)`` uint8 that slots ``0..num-1`` of a release with ``config``'s
    seed condition their first attempts on, drawn from ``public_labels`` ``(K, D, H, W)`` (the
    public maps, :func:`load_public_maps`'s order) as :func:`draw_condition` draws them. They
    are the released samples' maps when the gate rejects none, and they are known before any
    model is: the demo measures the baselines built on them while the model still trains."""
    maps = []
    for slot in range(num):
        rng = np.random.default_rng(slot_seed(config.seed, slot, 0))
        k, deform_seed = _draw_map(rng, public_labels.shape[0], config.release.deform_masks)
        maps.append(deformed_map(public_labels[k], deform_seed, num_classes,
                                 config.release.deform_scale))
    return torch.stack(maps)


def draw_condition(plan: ReleasePlan, slot: int, attempt: int) -> Condition:
    """The map, deformation, attributes and noise seed of one (slot, attempt).

    An attribute whose range bounds and public values are all whole numbers (e.g. sex 0/1) is
    drawn as a whole number; others uniformly in [low, high].
    """
    rng = np.random.default_rng(slot_seed(plan.config.seed, slot, attempt))
    k, deform_seed = _draw_map(rng, plan.maps.labels.shape[0], plan.config.release.deform_masks)
    values = []
    for j, name in enumerate(plan.checkpoint.data.attributes):
        bounds = plan.config.release.attribute_ranges.get(name)
        if bounds is None:
            values.append(float(plan.maps.attributes[k, j]))
            continue
        low, high = float(bounds[0]), float(bounds[1])
        if _integer_attribute(low, high, plan.maps.attributes[:, j].numpy()):
            values.append(float(rng.integers(int(low), int(high) + 1)))
        else:
            values.append(float(rng.uniform(low, high)))
    return Condition(k, deform_seed, values, int(rng.integers(2 ** 63 - 1)))


def deformed_map(labels: torch.Tensor, seed: int | None, num_classes: int,
                 scale: float = 1.0) -> torch.Tensor:
    """A label map (D, H, W) uint8 in ``0..num_classes-1``, randomly deformed.

    ``scale`` multiplies the elastic displacement (``release.deform_scale``); the small rotation,
    scaling and translation stay as they are.

    The one-hot map is deformed with linear interpolation and each voxel takes the class with
    the largest share, as the demo cohort (format 2) makes its labels from deformed tissue
    fractions. On the demo's 32^3 maps this leaves slightly fewer isolated voxels than moving the
    class indices by nearest neighbour (0.18 % vs 0.26 % of voxels; the undeformed maps: 0.27 %).
    Outside the field of view is background (class 0).
    """
    if seed is None:
        return labels.clone()
    low, high = _ELASTIC["magnitude_range"]
    transform = Rand3DElastic(prob=1.0, mode="bilinear", padding_mode="zeros",
                              **{**_ELASTIC, "magnitude_range": (low * scale, high * scale)})
    transform.set_random_state(seed=seed)
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).permute(3, 0, 1, 2)
    moved = torch.as_tensor(transform(one_hot.float()))
    return moved.argmax(0).to(torch.uint8)


@torch.no_grad()
def generate(model: torch.nn.Module, plan: ReleasePlan, conditions: Sequence[Condition]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for ``conditions``: images (B, 1, D, H, W) and their maps (B, D, H, W) uint8.

    Each candidate depends on its own condition only (per-candidate noise, deterministic DDIM),
    not on the batch it is generated in.
    """
    grid = plan.checkpoint.data
    labels = torch.stack([deformed_map(plan.maps.labels[c.map_index], c.deform_seed,
                                       grid.num_classes, plan.config.release.deform_scale)
                          for c in conditions])
    latent_shape = model.latent_shape(grid.shape)
    device = module_device(model)
    images = []
    for start in range(0, len(conditions), plan.batch_size):
        batch = conditions[start:start + plan.batch_size]
        noise = torch.cat([initial_noise(1, latent_shape,
                                         torch.Generator().manual_seed(c.noise_seed))
                           for c in batch])
        onehot = torch.nn.functional.one_hot(labels[start:start + len(batch)].long(),
                                             grid.num_classes).permute(0, 4, 1, 2, 3).float()
        attributes = torch.tensor([c.attributes for c in batch], dtype=torch.float32) \
            if grid.attributes else None
        with autocast(device, plan.config.precision):
            latents = sample_latents(model.denoiser, build_sampler(model.model_cfg),
                                     *to_device((noise, onehot, attributes), device),
                                     steps=sampling_steps(model.model_cfg),
                                     guidance_scale=model.guidance_scale, progress=False)
            images.append(model.decode(latents, onehot.to(device)).float().cpu())
    return torch.cat(images), labels


def candidate_views(model: torch.nn.Module, images: torch.Tensor, distance: str,
                    max_shift: int) -> torch.Tensor:
    """What the sites receive: images (N, 1, 1, D, H, W) for image distances; for ``latent`` the
    public encoder's embeddings of every translate (N, T, Cz, d, h, w)."""
    if distance in IMAGE_DISTANCES:
        return views_of(images).contiguous()
    return latent_views(model.autoencoder, images, model.latent_scale_factor,
                        translations(max_shift)).contiguous()


# --- the gate round over a Flower Grid -----------------------------------------------------------

def consortium_ledger_path(plan: ReleasePlan) -> Path | None:
    """The consortium ledger of the release's run (None without a run folder)."""
    from server.federation import LEDGER_FILE, federation_dir

    return None if plan.run_dir is None else federation_dir(plan.run_dir) / LEDGER_FILE


def expected_heads(plan: ReleasePlan) -> dict[str, tuple[int, str]]:
    """Per site, the newest ledger head the consortium saw (train replies and gate answers)."""
    from server.consortium_ledger import ConsortiumLedger

    path = consortium_ledger_path(plan)
    if path is None or not path.exists():
        return {}
    return ConsortiumLedger(path).view().expected_heads()


def mirror_gate_answers(plan: ReleasePlan, result: GateRoundResult) -> None:
    """Mirror every site's gate answer (charge, totals, ledger head) in the consortium ledger."""
    from server.consortium_ledger import ConsortiumLedger

    path = consortium_ledger_path(plan)
    if path is None:
        return
    ledger = ConsortiumLedger(path)
    for site_id in sorted(result.answers):
        ledger.record_gate(result.nodes.get(site_id, 0), result.answers[site_id])


def gate_query(plan: ReleasePlan, query_id: str, views: torch.Tensor) -> GateQuery:
    release, base = plan.config.release, plan.checkpoint
    latent = release.distance not in IMAGE_DISTANCES
    data = {"shape": list(base.data.shape), "spacing": list(base.data.spacing),
            "label_names": list(base.data.label_names),
            "intensity_percentiles": list(plan.config.data.intensity_percentiles)}
    return GateQuery(
        query_id=query_id, distance=release.distance,
        threshold=ThresholdPolicy.from_config(release.threshold), max_shift=release.max_shift,
        chunk_size=release.chunk_size, num_candidates=int(views.shape[0]),
        candidates_sha256=weights_hash({"views": views}), data=data,
        model_sha256=base.content_hash,
        autoencoder=dict(base.model_config["autoencoder"]) if latent else {},
        autoencoder_sha256=weights_hash(base.autoencoder_state) if latent else "",
        latent_scale_factor=base.latent_scale_factor, dp_enabled=release.dp_gate.enabled,
        dp_epsilon=release.dp_gate.epsilon if release.dp_gate.enabled else 0.0,
        default_target_epsilon=plan.config.privacy.target_epsilon,
        default_delta=plan.config.privacy.delta, expected_heads=expected_heads(plan))


def _layout(content: RecordDict) -> dict[str, tuple[str, Mapping[str, Any]]]:
    layout: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for name, record in content.array_records.items():
        layout[name] = (ARRAYS, {key: tuple(array.shape) for key, array in record.items()})
    for name, record in content.metric_records.items():
        layout[name] = (METRICS, dict(record))
    for name, record in content.config_records.items():
        layout[name] = (CONFIG, dict(record))
    return layout


def gate_round(grid: Grid, nodes: Sequence[int], query: GateQuery, views: torch.Tensor,
               autoencoder_state: Mapping[str, torch.Tensor] | None,
               timeout: float) -> GateRoundResult:
    """Send one gate query to every node; collect the answers (checked against the allow-list)."""
    messages = []
    for node in nodes:
        records: dict[str, Any] = {GATE_CONFIG: ConfigRecord(query.to_record()),
                                   GATE_CANDIDATES: ArrayRecord(torch_state_dict={"views": views})}
        if autoencoder_state is not None:
            records[GATE_AUTOENCODER] = ArrayRecord(torch_state_dict=pack_state(autoencoder_state))
        messages.append(Message(RecordDict(records), dst_node_id=int(node),
                                message_type=GATE_MESSAGE_TYPE, ttl=timeout))
    result = GateRoundResult()
    replies = ReplyStream(grid, messages, timeout)
    del messages
    for node, reply in replies:
        # Attributed by the message sent (a SuperLink-made error carries the SuperLink's node id).
        if reply.has_error():
            reason = reply.error.reason.splitlines()[0][:200] if reply.error.reason else "?"
            result.failed.append((node, f"error reply ({reason})"))
            continue
        try:
            layout = _layout(reply.content)
            check_gate_reply(layout, query.num_candidates)
            answer = GateAnswer.from_records(layout[GATE_ACCOUNTING][1], layout[GATE_STATUS][1])
        except ProtocolViolation as err:
            result.failed.append((node, f"protocol violation: {err}"))
            continue
        if answer.query_id != query.query_id or answer.site_id in result.answers:
            result.failed.append((node, f"answer for query {answer.query_id!r} from site "
                                        f"{answer.site_id!r} does not fit this round"))
            continue
        result.answers[answer.site_id] = answer
        result.nodes[answer.site_id] = int(node)
        if answer.status == GateStatus.OK:
            result.passed[answer.site_id] = reply.content[GATE_PASSED]["passed"].numpy() != 0
    for node in replies.missing:
        result.failed.append((node, f"no answer within {timeout:g}s"))
    return result


# --- state ---------------------------------------------------------------------------------------

def _read_state(out: Path) -> dict[str, Any] | None:
    path = Path(out) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != _STATE_FORMAT:
            raise ValueError("unknown format")
        return state
    except (ValueError, OSError) as err:
        raise ReleaseError(f"{path}: unreadable release state ({err}); restore it or choose a new "
                           f"--out") from None


def _write_state(out: Path, state: Mapping[str, Any]) -> None:
    atomic_write_bytes(Path(out) / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


def _new_state(plan: ReleasePlan) -> dict[str, Any]:
    slots = [{"slot": i, "status": "pending", "attempts": 0, "rejections": {}, "history": []}
             for i in range(plan.num)]
    return {"format": _STATE_FORMAT, "release_id": uuid.uuid4().hex[:16],
            "settings": plan.settings, "checkpoint": str(plan.checkpoint_path),
            "sites": list(plan.sites), "rounds": [], "slots": slots, "gate": {}}


def _cache_path(out: Path, round_number: int) -> Path:
    return Path(out) / CACHE_DIR / f"round_{round_number:04d}.pt"


def sample_name(slot: int) -> str:
    return f"synth_{slot:04d}"


# --- the release loop ----------------------------------------------------------------------------

def _required_sites(plan: ReleasePlan) -> int:
    return max(plan.config.federation.min_sites, len(plan.sites))


def _check_answers(plan: ReleasePlan, result: GateRoundResult, round_number: int) -> None:
    problems = [f"node {node}: {why}" for node, why in result.failed]
    for site, answer in result.answers.items():
        if answer.status != GateStatus.OK:
            reason = f" ({answer.reason.value})" if answer.reason.value else ""
            problems.append(f"{site}: {answer.status.value}{reason}")
    missing = sorted(set(plan.sites) - set(result.answers))
    if missing:
        problems.append(f"no answer from {', '.join(missing)}")
    if len(result.passed) < _required_sites(plan):
        problems.append(f"{len(result.passed)} site(s) answered, {_required_sites(plan)} needed")
    if problems:
        raise ReleaseHalted(f"gate round {round_number}: {'; '.join(problems)}; every site must "
                            f"gate every candidate - fix the site(s) and run the same command "
                            f"again to resume")


def _decide(state: dict[str, Any], record: dict[str, Any], result: GateRoundResult,
            max_attempts: int) -> None:
    """Apply one round's answers to the slots (in place)."""
    for position, (slot_id, attempt) in enumerate(zip(record["slots"], record["attempts"])):
        slot = state["slots"][slot_id]
        verdicts = {site: bool(passed[position]) for site, passed in sorted(result.passed.items())}
        slot["history"].append({"attempt": attempt, "round": record["round"], "passed": verdicts})
        if all(verdicts.values()):
            slot["status"] = "released"
            slot["released_attempt"] = attempt
            continue
        for site, ok in verdicts.items():
            if not ok:
                slot["rejections"][site] = slot["rejections"].get(site, 0) + 1
        slot["attempts"] = attempt + 1
        if slot["attempts"] >= max_attempts:
            slot["status"] = "exhausted"
    for site, answer in result.answers.items():
        gate = state["gate"].setdefault(site, {"queries": 0, "epsilon_charged": 0.0, "passed": 0,
                                               "failed": 0})
        gate["queries"] += 1
        gate["epsilon_charged"] += answer.epsilon_charged
        gate["passed"] += answer.num_passed
        gate["failed"] += answer.num_candidates - answer.num_passed
        gate["last_answer"] = answer.to_json()
    record["answers"] = {site: [bool(p) for p in passed] for site, passed in result.passed.items()}


def _write_samples(plan: ReleasePlan, state: Mapping[str, Any], record: Mapping[str, Any],
                   cache: Mapping[str, Any]) -> None:
    for position, slot_id in enumerate(record["slots"]):
        slot = state["slots"][slot_id]
        if slot["status"] != "released" or \
                slot.get("released_attempt") != record["attempts"][position]:
            continue
        name, k = sample_name(slot_id), cache["map_index"][position]
        affine = plan.maps.affines[k].numpy()
        write_volume(plan.out / "images" / f"{name}.nii.gz", cache["images"][position, 0].numpy(),
                     affine)
        write_volume(plan.out / "labels" / f"{name}_label.nii.gz",
                     cache["labels"][position].numpy(), affine, dtype=np.uint8)
        slot["map"] = plan.maps.names[k]
        slot["attributes"] = [float(v) for v in cache["attributes"][position]]


def _run_round(grid: Grid, nodes: Sequence[int], plan: ReleasePlan, state: dict[str, Any],
               record: dict[str, Any], cache: Mapping[str, Any],
               autoencoder_state: Mapping[str, torch.Tensor] | None) -> None:
    out = plan.out
    if record["stage"] == "generated":
        query = gate_query(plan, record["query_id"], cache["views"])
        if query.candidates_sha256 != record["candidates_sha256"]:
            raise ReleaseError(f"{_cache_path(out, record['round'])}: cached candidates do not "
                               f"match the state file; restore the release folder or choose a "
                               f"new --out")
        result = gate_round(grid, nodes, query, cache["views"], autoencoder_state, plan.timeout)
        mirror_gate_answers(plan, result)
        _check_answers(plan, result, record["round"])
        _decide(state, record, result, plan.config.release.max_attempts)
        record["stage"] = "decided"
        _write_state(out, state)
    if record["stage"] == "decided":
        _write_samples(plan, state, record, cache)
        record["stage"] = "written"
        _write_state(out, state)
    _cache_path(out, record["round"]).unlink(missing_ok=True)


def _new_round(model: torch.nn.Module, plan: ReleasePlan, state: dict[str, Any]
               ) -> tuple[dict, dict] | None:
    release = plan.config.release
    pending = [s for s in state["slots"] if s["status"] == "pending"][:release.chunk_size]
    if not pending:
        return None
    number = len(state["rounds"]) + 1
    conditions = [draw_condition(plan, s["slot"], s["attempts"]) for s in pending]
    started = time.perf_counter()
    images, labels = generate(model, plan, conditions)
    views = candidate_views(model, images, release.distance, release.max_shift)
    log.info("release round %d: %d candidate(s) generated in %.1fs", number, len(pending),
             time.perf_counter() - started)
    attributes = torch.tensor([c.attributes for c in conditions], dtype=torch.float64)
    cache = {"images": images, "labels": labels, "views": views,
             "map_index": [c.map_index for c in conditions],
             "attributes": attributes.reshape(len(conditions), -1)}
    atomic_torch_save(cache, _cache_path(plan.out, number))
    record = {"round": number, "query_id": f"{state['release_id']}-{number:04d}",
              "slots": [s["slot"] for s in pending], "attempts": [s["attempts"] for s in pending],
              "candidates_sha256": weights_hash({"views": views}), "stage": "generated"}
    state["rounds"].append(record)
    _write_state(plan.out, state)
    return record, cache


def _load_cache(out: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    path = _cache_path(out, record["round"])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable cache is the same problem
        raise ReleaseError(f"{path}: the candidates of an unfinished round cannot be read "
                           f"({type(err).__name__}); restore the release folder or choose a new "
                           f"--out") from None


def _decided(state: Mapping[str, Any]) -> int:
    return sum(s["status"] != "pending" for s in state["slots"])


def run_release(grid: Grid, plan: ReleasePlan,
                on_round: Callable[[Mapping[str, Any]], None] | None = None) -> ReleaseResult:
    """Run (or resume) the release of ``plan`` over ``grid``; see the module docstring.

    Raises :class:`ReleaseHalted` when a site fails, refuses or does not answer (resume later).
    """
    from server.release_report import build_release_report, write_release_report

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out)
    if state is None:
        state = _new_state(plan)
        _write_state(out, state)
    else:
        _check_resume(state, plan)
        log.info("%s: resuming the release (%d of %d slots decided)", out, _decided(state),
                 plan.num)
    model = configure(plan.checkpoint.build_model(resolve_device(plan.config.device)),
                      plan.config.memory)
    latent = plan.config.release.distance not in IMAGE_DISTANCES
    autoencoder_state = plan.checkpoint.autoencoder_state if latent else None
    nodes: list[int] | None = None
    progress = tqdm(total=plan.num, desc="releasing", unit="slot", disable=None,
                    initial=_decided(state))
    try:
        while True:
            unfinished = [r for r in state["rounds"] if r["stage"] != "written"]
            if unfinished:
                record, cache = unfinished[0], _load_cache(out, unfinished[0])
            else:
                created = _new_round(model, plan, state)
                if created is None:
                    break
                record, cache = created
            if record["stage"] == "generated" and nodes is None:
                required = _required_sites(plan)
                nodes = wait_for_nodes(grid, required, required, plan.timeout)
            before = _decided(state)
            _run_round(grid, nodes or [], plan, state, record, cache, autoencoder_state)
            progress.update(_decided(state) - before)
            if on_round is not None:
                on_round(record)
    finally:
        progress.close()
    shutil.rmtree(out / CACHE_DIR, ignore_errors=True)
    manifest = write_manifest(plan, state)
    write_preview(plan, state)
    report = build_release_report(plan, state)
    report_json, report_markdown = write_release_report(out, report)
    counts = report.counts
    log.info("release: %d of %d released, %d rejection(s), %d slot(s) out of attempts -> %s",
             counts["released"], plan.num, counts["rejections"], counts["exhausted"], out)
    return ReleaseResult(plan.num, counts["released"], counts["candidates"], counts["rejections"],
                         counts["exhausted"], out, manifest, report_json, report_markdown)


# --- outputs -------------------------------------------------------------------------------------

def released_slots(state: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for s in state["slots"] if s["status"] == "released"]


def write_manifest(plan: ReleasePlan, state: Mapping[str, Any]) -> Path:
    """``manifest.csv``: one row per released sample (site format, readable by ``read_manifest``)
    with its attributes, condition map, the attempt that passed, and each site's gate result."""
    sites = sorted(state["gate"]) or list(plan.sites)
    attributes = plan.checkpoint.data.attributes
    columns = ["patient_id", "image", "label", *attributes, "condition", "attempt",
               "rejected_attempts", *[f"gate_{site}" for site in sites]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for slot in released_slots(state):
        name = sample_name(slot["slot"])
        verdicts = slot["history"][-1]["passed"]
        writer.writerow({"patient_id": name, "image": f"images/{name}.nii.gz",
                         "label": f"labels/{name}_label.nii.gz",
                         **{a: f"{v:g}" for a, v in zip(attributes, slot["attributes"])},
                         "condition": slot["map"], "attempt": slot["released_attempt"] + 1,
                         "rejected_attempts": slot["released_attempt"],
                         **{f"gate_{site}": "pass" if verdicts.get(site) else "fail"
                            for site in sites}})
    path = plan.out / MANIFEST_FILE
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def write_preview(plan: ReleasePlan, state: Mapping[str, Any]) -> Path | None:
    """``preview.png``: mid-slices of the first released samples (image and map)."""
    import nibabel as nib

    chosen = released_slots(state)[:_PREVIEW_LIMIT]
    if not chosen:
        return None
    images, labels, titles = [], [], []
    for slot in chosen:
        name = sample_name(slot["slot"])
        images.append(np.asarray(nib.load(str(plan.out / "images" / f"{name}.nii.gz")).dataobj))
        labels.append(np.asarray(
            nib.load(str(plan.out / "labels" / f"{name}_label.nii.gz")).dataobj))
        titles.append(name)
    return save_preview(plan.out / PREVIEW_FILE, images, labels, titles,
                        num_classes=plan.checkpoint.data.num_classes)


# --- Flower ServerApp ----------------------------------------------------------------------------

def make_release_app(plan: ReleasePlan, on_result: Callable[[ReleaseResult], None] | None = None,
                     on_error: Callable[[BaseException], None] | None = None) -> ServerApp:
    """A ServerApp running :func:`run_release` for ``plan``.

    Flower ends the process on an exception in a ServerApp's main, so ``on_error`` receives it
    instead (the caller re-raises it after the simulation returns).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result = run_release(grid, plan)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, not swallowed
            if on_error is None:
                raise
            on_error(err)
            return
        if on_result is not None:
            on_result(result)

    return server_app
