"""One federated round at a site: check the ledger, fine-tune with DP-SGD, commit, build the reply.

The round, in order (nothing here imports Flower; :mod:`client.client_app` only converts records):

1. Guards. A pending rollback alarm, a ledger whose own chain check fails, a ledger that lacks the
   entry the consortium last saw (:mod:`privacy.rollback_guard`), disabled privacy, or received
   weights that do not match their hashes: the site refuses with a fixed reason code.
2. Data. The site's scans are loaded with :func:`client.site_data.load_site` on the consortium's
   grid and encoded ONCE by the frozen public autoencoder under ``no_grad``: latents (N, Cz, d, h, w)
   scaled by the public latent scale factor, label maps as class fractions on the latent grid
   (N, C, d, h, w), attributes (N, A). The encoded site is cached on the site's disk for later
   rounds and processes (:mod:`client.latent_cache`: keyed by the data, grid and autoencoder;
   private files, mode 0600 in a 0700 folder) and in this process's memory.
3. Budget. The site's own config sets its cap (``SiteConfig.budget``). A deployed site without one
   refuses (``no-site-budget``); in simulation a site config without one takes the consortium
   default ONCE: it is locked into the ledger at first use and never raised by the server later
   (:func:`privacy.budget.resolve_cap`). Sigma is calibrated for the planned rounds and written to
   the ledger as the site's plan on first use (:class:`privacy.budget.SiteBudget`).
4. DP fine-tune. :class:`privacy.dp_trainer.DPTrainer` wraps the latent denoiser, samples patients,
   and trains with ``models.diffusion.diffusion_loss`` (one loss per scan). It commits the round to
   the ledger before it returns the weights (write-ahead), and resends the committed weights instead
   of charging again when the same round is asked twice with the same starting weights.
5. Reply. Only the trained parameters, the patient count, the accounting figures and the ledger head
   leave (:class:`privacy.protocol.TrainReply`). Every epsilon in it (``epsilon``,
   ``epsilon-next``, refusal figures) is :func:`privacy.spend.site_spend` of the ledger: DP-SGD
   rounds plus DP-gate charges, the figure the site enforces. Weights with a non-finite value are
   never sent: the round is refused (``non-finite-weights``) before its ledger commit. No training
   loss is computed for the reply; the round's compute time stays in the site's local activity log
   (``<ledger>.activity.jsonl``).

Non-private rounds (``privacy.enabled: false``). A site refuses them (``privacy-disabled``) unless its
OWN config sets ``allow_non_private: true`` (research and demo data only). Such a site trains steps
3-4 without DP (:class:`privacy.nonprivate_trainer.NonPrivateTrainer`: same encoded scans, loss,
trainable subset and EMA, plain Adam), records a ``non-private-round`` entry in its ledger before the
weights leave (resending, not recording twice, when the round is asked again), and replies with
epsilon = +inf (:data:`privacy.protocol.NOT_PRIVATE`): it never claims a finite epsilon. After such a
round every DP round is refused (``budget-exhausted``): the site's spend is infinite.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from client import latent_cache
from client.membership_audit import MembershipAuditError, apply_holdout
from client.site_data import SiteDataError, load_site
from configs.schema import DataConfig, SiteConfig
from models.autoencoder import build_autoencoder, encode_latents
from models.conditioning import compact_latent_map
from models.device import autocast, check_precision, resolve_device
from models.diffusion import build_scheduler, diffusion_loss
from models.latent_unet import build_latent_unet
from privacy.budget import (BudgetExhausted, CapSetting, NoSiteBudget, PlanMismatch, SiteBudget,
                            check_private_history, resolve_cap)
from privacy.calibration import CalibrationError, calibrate
from privacy.dp_trainer import DPSettings, DPTrainer, NonFiniteWeights, non_finite_tensors
from privacy.ledger import LedgerEntry, LedgerError
from privacy.nonprivate_trainer import NonPrivateSettings, NonPrivateTrainer
from privacy.outbox import weights_hash
from privacy.protocol import NOT_PRIVATE, RefusalReason, ReplyStatus, RoundConfig, TrainReply
from privacy.rollback_guard import LedgerRollback, check_expected_head, pending_alarm
from privacy.site_ledger import SiteLedger, SiteLedgerState, utc_timestamp
from privacy.spend import site_spend
from privacy.trainable import trainable_parameter_names

log = logging.getLogger(__name__)

_ENCODED_CACHE_SIZE = 4


@dataclass(frozen=True)
class TrainInstruction:
    """A train message, decoded: the round config and the two state dicts (CPU tensors)."""

    round_config: RoundConfig
    global_state: dict[str, torch.Tensor]
    autoencoder_state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteOutcome:
    """The reply, the released tensors (``ok`` only: trained parameters by name) and, for the site's
    own log only, how long the round took."""

    reply: TrainReply
    weights: dict[str, torch.Tensor] | None
    compute_seconds: float


class EncodedScans(Dataset):
    """A site's scans in latent space. Item i: ``latents`` (Cz, d, h, w), ``labels`` (C, d, h, w)
    class fractions on the latent grid, ``attributes`` (A,)."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor):
        self.latents, self.labels, self.attributes = latents, labels, attributes

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[index], "labels": self.labels[index],
                "attributes": self.attributes[index]}


@dataclass(frozen=True)
class EncodedSite:
    scans: EncodedScans
    patients: dict[str, list[int]]

    @property
    def num_patients(self) -> int:
        return len(self.patients)


_encoded: "OrderedDict[tuple, EncodedSite]" = OrderedDict()


class _Refusal(Exception):
    def __init__(self, reason: RefusalReason, status: ReplyStatus = ReplyStatus.REFUSED):
        super().__init__(reason.value)
        self.reason, self.status = reason, status


def data_config(round_config: RoundConfig) -> DataConfig:
    """The consortium's preprocessing grid (shape, spacing, labels, percentiles) as a DataConfig."""
    data = round_config.data
    return DataConfig(shape=tuple(int(s) for s in data["shape"]),
                      spacing=tuple(float(s) for s in data["spacing"]),
                      label_names=[str(n) for n in data["label_names"]],
                      intensity_percentiles=tuple(float(p) for p in data["intensity_percentiles"]))


@torch.no_grad()
def encode_site(site: SiteConfig, data: DataConfig, attributes: Sequence[str],
                autoencoder: torch.nn.Module, latent_scale_factor: float,
                batch_size: int = 4, map_encoding: str = "fractions") -> EncodedSite:
    """Load the site's scans and encode them with the frozen autoencoder (no gradients, eval mode).

    Maps are brought to the latent grid with the denoiser's ``map_encoding``
    (:func:`models.conditioning.compact_latent_map`)."""
    dataset = load_site(site.data_dir, data, site.manifest, attributes)
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    latents, labels, values = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([item["image"] for item in items]).to(device)
        z = encode_latents(autoencoder, images) * latent_scale_factor
        onehot = torch.stack([item["label"] for item in items]).to(device)
        latents.append(z.cpu())
        labels.append(compact_latent_map(onehot, z.shape[2:], map_encoding).cpu())
        values.append(torch.stack([item["attributes"] for item in items]))
    scans = EncodedScans(torch.cat(latents), torch.cat(labels), torch.cat(values).float())
    return EncodedSite(scans, {pid: list(rows) for pid, rows in dataset.patients.items()})


def _cached_encoding(site: SiteConfig, config: RoundConfig, data: DataConfig,
                     autoencoder: Callable[[], torch.nn.Module]) -> EncodedSite:
    """The site's encoded scans: from this process's memory, else from its on-disk cache
    (:mod:`client.latent_cache`, private: 0600 files in a 0700 folder), else encoded now and cached."""
    map_encoding = str(config.model["conditioning"].get("map_encoding", "fractions"))
    key = latent_cache.cache_key(site, data, config.data, config.attributes,
                                 config.autoencoder_sha256, config.latent_scale_factor,
                                 map_encoding=map_encoding)
    if key in _encoded:
        _encoded.move_to_end(key)
        return _encoded[key]
    stored = latent_cache.load_encoded(site, key)
    if stored is not None:
        encoded = EncodedSite(EncodedScans(stored["latents"], stored["labels"], stored["attributes"]),
                              {pid: list(rows) for pid, rows in stored["patients"].items()})
    else:
        encoded = encode_site(site, data, config.attributes, autoencoder(),
                              config.latent_scale_factor, map_encoding=map_encoding)
        scans = encoded.scans
        latent_cache.store_encoded(site, key, {"latents": scans.latents, "labels": scans.labels,
                                               "attributes": scans.attributes,
                                               "patients": encoded.patients})
    _encoded[key] = encoded
    while len(_encoded) > _ENCODED_CACHE_SIZE:
        _encoded.popitem(last=False)
    return encoded


def site_cap(site: SiteConfig, ledger: SiteLedger, privacy: Mapping[str, Any],
             deployment: bool) -> CapSetting:
    """The cap in force (:func:`privacy.budget.resolve_cap`): the site's own budget; else, in
    simulation only, the consortium default locked into the ledger at first use (never raised by
    the server afterwards); in deployment :class:`privacy.budget.NoSiteBudget`."""
    own = CapSetting(site.budget.target_epsilon, site.budget.delta) if site.budget else None
    consortium = None if deployment else CapSetting(float(privacy["target_epsilon"]),
                                                    float(privacy["delta"]))
    return resolve_cap(ledger, own, consortium, where=site.site_id)


def activity_log_path(ledger_path: Path) -> Path:
    """``<ledger>.activity.jsonl``: the site's local record of each round (never sent)."""
    return ledger_path.with_name(ledger_path.name + ".activity.jsonl")


def _record_activity(site: SiteConfig, reply: TrainReply, seconds: float,
                     timings: Mapping[str, float]) -> None:
    path = activity_log_path(site.ledger_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"timestamp": utc_timestamp(), "round": reply.round, "status": reply.status.value,
            "reason": reply.reason.value, "epsilon": reply.epsilon, "compute_seconds": seconds,
            "finished": time.time(), **{k: round(v, 4) for k, v in timings.items()}}
    with path.open("a") as stream:
        stream.write(json.dumps(line, sort_keys=True) + "\n")


def _head(entries: Sequence[LedgerEntry]) -> tuple[int, str]:
    return (entries[-1].seq, entries[-1].hash) if entries else (0, "")


def _spend(ledger: SiteLedger) -> dict[str, Any]:
    """What a refusal may say about the site's spend: the accounting of its ledger, if readable."""
    try:
        state = ledger.state()
        entries = ledger.ledger.entries()
    except (LedgerError, ValueError):
        return {}
    seq, head = _head(entries)
    fields: dict[str, Any] = {"ledger_seq": seq, "ledger_head": head}
    plan = state.plan
    spend = site_spend(state)
    if state.non_private:
        # Non-private weights were released: the spend is infinite, whatever the DP rounds say.
        fields.update(num_patients=state.non_private[-1].num_patients, epsilon=NOT_PRIVATE,
                      epsilon_next=NOT_PRIVATE,
                      target_epsilon=state.cap if state.cap is not None else NOT_PRIVATE)
    elif plan is not None:
        fields.update(num_patients=plan.num_patients, target_epsilon=state.cap,
                      delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                      sample_rate=plan.sample_rate, epsilon=spend.total,
                      epsilon_next=_epsilon_next(state))
    elif state.cap_in_force is not None:
        # No DP-SGD round yet, maybe DP-gate charges: their spend against the locked cap.
        fields.update(target_epsilon=state.cap, delta=state.cap_in_force[1], epsilon=spend.total)
    return fields


def _epsilon_next(state: SiteLedgerState) -> float:
    """The spend after one more round of the plan in force (DP-SGD + gate charges)."""
    return site_spend(state, extra_steps=state.plan.steps_per_round).total


def _loss_fn(scheduler, dropout: float, has_attributes: bool, generator: torch.Generator,
             device: torch.device = torch.device("cpu"), precision: str = "fp32"):
    def loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The forward pass may be bf16; the loss, and under DP every per-sample gradient, is fp32.
        with autocast(device, precision):
            losses = diffusion_loss(model, scheduler, batch["latents"], batch["labels"],
                                    batch["attributes"] if has_attributes else None,
                                    generator=generator, condition_dropout=dropout)
        return losses.float()
    return loss


def site_compute(site: SiteConfig, privacy: Mapping[str, Any]) -> tuple[torch.device, str]:
    """The site's device (its config's, else auto) and forward precision (else fp32).

    bf16 applies under DP only with Opacus' ``hooks`` mode, whose grad samplers upcast to fp32
    (:mod:`privacy.grad_samplers`); the other modes run fp32.
    """
    device = resolve_device(site.device)
    precision = site.precision or "fp32"
    mode = str(privacy.get("grad_sample_mode", "hooks"))
    if precision != "fp32" and privacy.get("enabled", True) and mode != "hooks":
        log.info("%s: grad_sample_mode %s computes per-sample gradients outside Opacus' fp32 "
                 "hooks; training in fp32", site.site_id, mode)
        precision = "fp32"
    return device, check_precision(precision, device)


def _guard(site: SiteConfig, ledger: SiteLedger, config: RoundConfig, deployment: bool) -> None:
    alarm = pending_alarm(ledger.path)
    if alarm is not None:
        log.error("%s: refusing round %d: a rollback alarm is pending (%s); a privacy officer must "
                  "restore the ledger and clear the alarm", site.site_id, config.server_round,
                  alarm.describe())
        raise _Refusal(RefusalReason.ROLLBACK_ALARM)
    try:
        entries = ledger.ledger.entries()
    except LedgerError as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.LEDGER_DAMAGED) from None
    seq, digest = config.expected_heads.get(site.site_id, (0, ""))
    try:
        check_expected_head(ledger.path, entries, seq, digest, config.server_round)
    except LedgerRollback as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.LEDGER_ROLLBACK) from None
    if deployment and site.budget is None:
        log.error("refusing round %d: %s", config.server_round, NoSiteBudget(site.site_id))
        raise _Refusal(RefusalReason.NO_SITE_BUDGET)
    if not config.privacy.get("enabled", True) and not site.allow_non_private:
        log.error("%s: refusing round %d: privacy.enabled is false and this site does not release "
                  "non-private weights (its own config would have to set allow_non_private: true, "
                  "for research or demo data only)", site.site_id, config.server_round)
        raise _Refusal(RefusalReason.PRIVACY_DISABLED)


def _released(site: SiteConfig, ledger: SiteLedger, denoiser: torch.nn.Module, trainable: str,
              weights: Mapping[str, torch.Tensor], round: int, resumed: bool,
              **accounting: Any) -> SiteOutcome:
    """The ``ok`` outcome: the trained parameters only, and the ledger head after the commit."""
    released = {name: weights[name] for name in trainable_parameter_names(denoiser, trainable)}
    seq, head = _head(ledger.ledger.entries())
    reply = TrainReply(status=ReplyStatus.OK, site_id=site.site_id, round=round, ledger_seq=seq,
                       ledger_head=head, weights_sha256=weights_hash(released), resumed=resumed,
                       **accounting)
    return SiteOutcome(reply, released, 0.0)


def _train(site: SiteConfig, ledger: SiteLedger, instruction: TrainInstruction,
           deployment: bool, timings: dict[str, float]) -> SiteOutcome:
    config = instruction.round_config
    privacy = config.privacy
    if weights_hash(instruction.global_state) != config.global_sha256 or \
            weights_hash(instruction.autoencoder_state) != config.autoencoder_sha256:
        log.error("%s: the received weights do not match the hashes in the round config",
                  site.site_id)
        raise _Refusal(RefusalReason.MODEL_MISMATCH)
    received = non_finite_tensors(instruction.global_state) + \
        non_finite_tensors(instruction.autoencoder_state)
    if received:
        log.error("%s: the received weights hold non-finite values (%s); refusing to train on them",
                  site.site_id, ", ".join(received[:3]))
        raise _Refusal(RefusalReason.MODEL_MISMATCH)
    device, precision = site_compute(site, privacy)
    data = data_config(config)
    started = time.perf_counter()

    def autoencoder() -> torch.nn.Module:   # built only when the scans must be encoded
        model = build_autoencoder(config.model["autoencoder"])
        model.load_state_dict(instruction.autoencoder_state)
        model.requires_grad_(False)  # public and frozen: never trained on private data
        return model.to(device)

    encoded = _cached_encoding(site, config, data, autoencoder)
    timings["encode_seconds"] = time.perf_counter() - started
    try:  # patients held out for the membership audit never train (recorded in the ledger)
        encoded = EncodedSite(encoded.scans,
                              apply_holdout(ledger, site.membership_holdout, encoded.patients))
    except MembershipAuditError as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.PLAN_MISMATCH) from None

    denoiser = build_latent_unet(config.model, data.num_classes, len(config.attributes))
    denoiser.load_state_dict(instruction.global_state)
    denoiser.to(device)
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    loss = _loss_fn(build_scheduler(config.model), float(config.model["conditioning"]["dropout"]),
                    bool(config.attributes), generator, device, precision)
    if not privacy.get("enabled", True):  # _guard let it through: the site opted in
        return _train_non_private(site, ledger, config, denoiser, loss, encoded)
    started = time.perf_counter()
    try:
        return _train_dp(site, ledger, config, denoiser, loss, encoded, deployment)
    finally:
        timings["train_seconds"] = time.perf_counter() - started


def _train_non_private(site: SiteConfig, ledger: SiteLedger, config: RoundConfig,
                       denoiser: torch.nn.Module, loss, encoded: EncodedSite) -> SiteOutcome:
    log.warning("%s: round %d: privacy is disabled and this site allows non-private training; the "
                "weights it sends carry NO differential-privacy guarantee", site.site_id,
                config.server_round)
    settings = NonPrivateSettings.from_config(config.privacy, config.local_epochs)
    trainer = NonPrivateTrainer(denoiser, loss, encoded.scans, encoded.patients, ledger, settings)
    result = trainer.run_round(config.server_round)
    return _released(site, ledger, denoiser, settings.trainable, result.weights,
                     config.server_round, result.resumed, num_patients=result.record.num_patients,
                     epsilon=NOT_PRIVATE, epsilon_next=NOT_PRIVATE, target_epsilon=NOT_PRIVATE,
                     steps=result.record.steps)


def _train_dp(site: SiteConfig, ledger: SiteLedger, config: RoundConfig, denoiser: torch.nn.Module,
              loss, encoded: EncodedSite, deployment: bool) -> SiteOutcome:
    privacy = config.privacy
    try:
        check_private_history(ledger.path, config.server_round, ledger.state())
        cap = site_cap(site, ledger, privacy, deployment)
        plan = calibrate(target_epsilon=cap.target_epsilon, delta=cap.delta,
                         num_patients=encoded.num_patients,
                         expected_batch_size=int(privacy["expected_batch_size"]),
                         rounds=config.planned_rounds, local_epochs=config.local_epochs,
                         accountant=str(privacy["accountant"]), where=site.site_id,
                         allow_large_delta=bool(site.budget and site.budget.allow_large_delta))
        budget = SiteBudget.open(ledger, plan, max_grad_norm=float(privacy["max_grad_norm"]),
                                 clipping=str(privacy["clipping"]))
    except BudgetExhausted as err:
        log.warning("%s: %s", site.site_id, err)
        raise _Refusal(RefusalReason.NONE, ReplyStatus.BUDGET_EXHAUSTED) from None
    except NoSiteBudget as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.NO_SITE_BUDGET) from None
    except CalibrationError as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.INVALID_BUDGET) from None
    except PlanMismatch as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.PLAN_MISMATCH) from None

    settings = DPSettings.from_config(SimpleNamespace(**privacy))
    trainer = DPTrainer(denoiser, loss, encoded.scans, encoded.patients, budget, settings)
    try:
        result = trainer.run_round(config.server_round)
    except BudgetExhausted as err:
        log.warning("%s: %s", site.site_id, err)
        raise _Refusal(RefusalReason.NONE, ReplyStatus.BUDGET_EXHAUSTED) from None
    except PlanMismatch as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.PLAN_MISMATCH) from None
    except NonFiniteWeights as err:
        log.error("%s: refusing round %d: %s", site.site_id, config.server_round, err)
        raise _Refusal(RefusalReason.NON_FINITE_WEIGHTS) from None

    record = result.record
    return _released(site, ledger, denoiser, settings.trainable, result.weights,
                     config.server_round, result.resumed, num_patients=record.num_patients,
                     epsilon=record.epsilon, epsilon_next=_epsilon_next(ledger.state()),
                     target_epsilon=record.target_epsilon, delta=record.delta,
                     noise_multiplier=record.noise_multiplier, sample_rate=record.sample_rate,
                     steps=record.steps)


def run_site_round(site: SiteConfig, instruction: TrainInstruction, *,
                   deployment: bool = False, timings: Mapping[str, float] | None = None
                   ) -> SiteOutcome:
    """Answer one train instruction. Never raises: every outcome is a :class:`TrainReply`.

    ``deployment``: the site config is the site's own file (a SuperNode), so the consortium's
    default budget is never taken. An unexpected error is logged here, at the site, in full; the
    reply only says ``site-error``. ``timings`` (seconds, Unix times) go to the site's local
    activity log with the round's own phases (``encode_seconds``, ``train_seconds``).
    """
    started = time.perf_counter()
    phases: dict[str, float] = dict(timings or {})
    ledger = SiteLedger(site.ledger_path)
    round = instruction.round_config.server_round
    try:
        _guard(site, ledger, instruction.round_config, deployment)
        outcome = _train(site, ledger, instruction, deployment, phases)
    except _Refusal as refusal:
        outcome = SiteOutcome(TrainReply(status=refusal.status, reason=refusal.reason,
                                         site_id=site.site_id, round=round, **_spend(ledger)), None, 0.0)
    except SiteDataError as err:
        log.error("%s: refusing round %d: %s", site.site_id, round, err)
        outcome = SiteOutcome(TrainReply(status=ReplyStatus.REFUSED, reason=RefusalReason.SITE_ERROR,
                                         site_id=site.site_id, round=round, **_spend(ledger)), None, 0.0)
    except Exception:  # noqa: BLE001 - the details stay in the site's log, never in the reply
        log.exception("%s: round %d failed", site.site_id, round)
        outcome = SiteOutcome(TrainReply(status=ReplyStatus.REFUSED, reason=RefusalReason.SITE_ERROR,
                                         site_id=site.site_id, round=round, **_spend(ledger)), None, 0.0)
    seconds = time.perf_counter() - started
    try:
        _record_activity(site, outcome.reply, seconds, phases)
    except OSError as err:
        log.warning("%s: cannot write the activity log (%s)", site.site_id, err)
    return SiteOutcome(outcome.reply, outcome.weights, seconds)
