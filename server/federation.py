"""The federation's round loop: sample, train at the sites, average, record, evaluate, checkpoint.

Flower's ``Strategy.start`` runs a fixed loop; fedsynth needs resume, an early stop when every site
has spent its budget, a consortium ledger entry per reply, and a checkpoint per round, so it drives
the strategy itself (``configure_train`` -> push, then pull the replies as they arrive -> each is
checked by ``take_reply``, mirrored in the ledger and folded into a running weighted mean).

One round ``r``:

1. wait until at least ``federation.min_sites`` nodes are connected (bounded by
   ``federation.round_timeout``);
2. send the global denoiser, the frozen public autoencoder and the round config (consortium settings
   and, per site, the newest ledger head the consortium saw) to every node the strategy may sample;
   none left -> the run ends ("every site has spent its budget"). A node that cached the
   autoencoder does not get it again, and one that cached a full denoiser gets only the trained
   subset when only a subset is trained (:func:`_leave_out_cached_weights`);
3. wait for the replies (at most ``round_timeout`` seconds); a node that errs or does not answer is
   logged and recorded, the round goes on;
4. mirror every reply in the consortium ledger; fewer than ``min_sites`` sites trained -> the round
   is recorded as failed and the run stops with :class:`FederationHalted` (the global model stays at
   round ``r - 1``; ``--resume`` reruns round ``r``, and a site that already committed it resends the
   same weights without being charged again);
5. average by patients, evaluate on public data, write the round checkpoint and ``state.json``
   (:mod:`server.round_checkpoint`), log the round to MLflow.

A resumed run continues after the last ``state.json`` round: nothing is counted twice (sites report
cumulative spends and resend committed rounds) and nothing is lost (a round is only done once its
state is written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import Config, config_to_dict, flatten_config
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from models.device import autocast, resolve_device
from models.memory import configure
from privacy.ledger import LedgerError
from privacy.outbox import weights_hash
from privacy.packed_state import pack_state, unpack_state
from privacy.protocol import (FROZEN_AUTOENCODER, GLOBAL_WEIGHTS, ROUND_CONFIG, SITE_ACCOUNTING,
                              SITE_WEIGHTS, WEIGHT_KEY, RefusalReason, RoundConfig)
from privacy.trainable import trainable_parameter_names
from server.consortium_ledger import ConsortiumLedger
from server.public_validation import FILE_NAME as VALIDATION_FILE
from server.public_validation import evaluate_public, load_validation_set
from server.round_checkpoint import (FederationState, load_state, prune_checkpoints,
                                     round_checkpoint_path, save_round, write_state)
from server.messaging import ReplyStream
from server.running_mean import RunningMean
from server.strategy import BudgetAwareFedAvg, RoundReplies, record_bytes
from server.tracking import StageRun

log = logging.getLogger(__name__)

LEDGER_FILE = "consortium_ledger.jsonl"
FINAL_CHECKPOINT = "checkpoint.pt"
EPSILON_REPORT = "epsilon_by_site.json"
# Config sections a resumed run must share with the run it continues (rounds may be extended).
_RUN_DEFINING = ("seed", "data.", "model.", "privacy.", "federation.local_epochs")
_CONNECT_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.2


class FederationError(ValueError):
    """The federation cannot start or resume. One line naming the problem and the fix."""


class FederationHalted(RuntimeError):
    """A round could not reach ``federation.min_sites``; the state stays at the last finished round."""


@dataclass(frozen=True)
class FederationSettings:
    """How to run: the validated config, the run folder, the starting (pretrained) checkpoint."""

    config: Config
    run_dir: Path
    checkpoint: Path
    resume: bool = False
    tracking: bool = True
    config_file: Path | None = None
    evaluate: bool = True
    # MLflow tags of a new federation run (a sweep nests it under its parent run).
    run_tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundSummary:
    """One finished (or failed) round, as the server saw it."""

    round: int
    participants: list[str]
    declined: dict[str, str]
    failed: list[str]
    wall_seconds: float
    bytes_sent: int
    bytes_received: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    stop_reason: str
    final_checkpoint: Path | None
    consortium_ledger: Path
    rounds: list[RoundSummary]
    run_id: str | None
    tracking_uri: str | None


def federation_dir(run_dir: Path) -> Path:
    """``<run_dir>/federation``: state, checkpoints, consortium ledger, previews, reports."""
    return Path(run_dir) / "federation"


def run_definition(config: Config) -> dict[str, str]:
    return {k: v for k, v in flatten_config(config).items() if k.startswith(_RUN_DEFINING)}


def config_sha256(config: Config) -> str:
    text = json.dumps(flatten_config(config), sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()


def wait_for_nodes(grid: Grid, minimum: int, expected: int, timeout: float) -> list[int]:
    """Connected node ids once ``minimum`` are connected (and ``expected`` or a short grace after);
    raises :class:`FederationHalted` when ``minimum`` do not connect within ``timeout`` seconds."""
    started = time.monotonic()
    reached_minimum = None
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= minimum:
            reached_minimum = reached_minimum or now
            if len(nodes) >= expected or now - reached_minimum >= _CONNECT_GRACE_SECONDS:
                return nodes
        elif now - started > timeout:
            raise FederationHalted(f"only {len(nodes)} site(s) connected within federation.round_timeout="
                                   f"{timeout:g}s, federation.min_sites={minimum} are needed; start the "
                                   f"sites' SuperNodes, then run again with --resume")
        time.sleep(_POLL_SECONDS)


def round_config_for(config: Config, base: Checkpoint, strategy: BudgetAwareFedAvg, server_round: int,
                     global_state: dict[str, torch.Tensor], autoencoder_sha256: str) -> RoundConfig:
    """The instruction of round ``server_round``: consortium settings, the starting checkpoint's
    model and grid, the hashes of the weights sent, and each site's last reported ledger head."""
    data = base.data
    return RoundConfig(
        server_round=server_round, planned_rounds=config.federation.rounds,
        local_epochs=config.federation.local_epochs, privacy=config_to_dict(config.privacy),
        data={"shape": list(data.shape), "spacing": list(data.spacing),
              "label_names": list(data.label_names),
              "intensity_percentiles": list(config.data.intensity_percentiles)},
        model=base.model_config, attributes=list(data.attributes),
        latent_scale_factor=base.latent_scale_factor, autoencoder_sha256=autoencoder_sha256,
        global_sha256=weights_hash(global_state), expected_heads=strategy.expected_heads(),
        deadline=time.time() + config.federation.round_timeout)


def _note_autoencoder_holders(holders: set[int], outcome: RoundReplies) -> None:
    """A site that answered (trained or declined) holds the autoencoder from now on: it caches it
    on receipt. One that said ``autoencoder-missing`` or failed gets it again next round."""
    for node, reply in outcome.accepted + outcome.declined:
        if reply.reason is RefusalReason.AUTOENCODER_MISSING:
            holders.discard(node)
        else:
            holders.add(node)
    for node, _, _ in outcome.failed:
        holders.discard(node)


def _note_model_holders(holders: dict[int, str], outcome: RoundReplies, full_to: set[int],
                        global_sha256: str) -> None:
    """A node sent the full denoiser that answered caches it; one that failed, lacked its copy or
    could not rebuild the global model gets the full denoiser again next round."""
    resend = {RefusalReason.DENOISER_MISSING, RefusalReason.MODEL_MISMATCH}
    for node, reply in outcome.accepted + outcome.declined:
        if reply.reason in resend:
            holders.pop(node, None)
        elif node in full_to:
            holders[node] = global_sha256
    for node, _, _ in outcome.failed:
        holders.pop(node, None)


def _trained_subset(base: Checkpoint, trainable: str) -> list[str] | None:
    """Names of the denoiser tensors the sites train, when that is a strict subset (else None):
    the rest never changes within a run, so after a site cached the full model only these travel."""
    if trainable == "all":
        return None
    names = trainable_parameter_names(base.build_denoiser(), trainable)
    return names if set(names) != set(base.denoiser_state) else None


def _leave_out_cached_weights(messages: list[Message], autoencoder_holders: set[int],
                              model_holders: dict[int, str], trained_names: list[str] | None,
                              round_config: RoundConfig) -> None:
    """Slim each instruction down to what its node lacks: no autoencoder for a node that cached
    it; only the trained subset of the denoiser (with the hash of the full model it completes,
    ``base_sha256``) for a node that cached a full model, when only a subset is trained."""
    if not messages:
        return
    full = messages[0].content
    slim: dict[tuple[bool, str], RecordDict] = {}
    for message in messages:
        node = int(message.metadata.dst_node_id)
        keep_autoencoder = node not in autoencoder_holders
        base = model_holders.get(node, "") if trained_names is not None else ""
        if keep_autoencoder and not base:
            continue
        if (keep_autoencoder, base) not in slim:
            records = {k: v for k, v in full.items() if keep_autoencoder or k != FROZEN_AUTOENCODER}
            if base:
                weights = unpack_state(full[GLOBAL_WEIGHTS])
                records[GLOBAL_WEIGHTS] = ArrayRecord(torch_state_dict=pack_state(
                    {name: weights[name] for name in trained_names}))
                records[ROUND_CONFIG] = ConfigRecord(replace(round_config,
                                                             base_sha256=base).to_record())
            slim[(keep_autoencoder, base)] = RecordDict(records)
        message.content = slim[(keep_autoencoder, base)]


def _stream_round(grid: Grid, strategy: BudgetAwareFedAvg, ledger: ConsortiumLedger,
                  messages: list[Message], server_round: int, timeout: float
                  ) -> tuple[RoundReplies, dict[str, torch.Tensor] | None, int]:
    """Send the round's instructions and take the replies as they arrive: check each, mirror it in
    the consortium ledger, fold its weights into a running patient-weighted sum, drop it.

    Returns how the sites answered, the average (None below ``min_sites``) and the bytes received.
    The server holds one reply and one float64 sum at a time, whatever the number of sites.
    """
    outcome = RoundReplies(server_round)
    strategy.last_round = outcome
    mean, received = RunningMean(), 0
    replies = ReplyStream(grid, messages, timeout)
    for node, message in replies:
        known = len(outcome.failed)
        if strategy.take_reply(outcome, message, node):
            weights = message.content[SITE_WEIGHTS]
            received += record_bytes(weights)
            mean.add(unpack_state(weights),
                     float(message.content[SITE_ACCOUNTING][WEIGHT_KEY]))
            ledger.record_site(server_round, node, outcome.accepted[-1][1])
        elif len(outcome.failed) > known:
            node_, site, error = outcome.failed[-1]
            log.warning("round %d: node %s%s failed: %s", server_round, node_,
                        f" ({site})" if site else "", error.splitlines()[0] if error else "?")
            ledger.record_failure(server_round, node_, site, error)
        else:
            ledger.record_site(server_round, node, outcome.declined[-1][1])
        del message
    for node in replies.missing:
        error = f"no reply within federation.round_timeout={timeout:g}s"
        outcome.failed.append((node, strategy.node_sites.get(node, ""), error))
        log.warning("round %d: node %s failed: %s", server_round, node, error)
        ledger.record_failure(server_round, node, strategy.node_sites.get(node, ""), error)
    if len(outcome.accepted) < strategy.min_sites:
        return outcome, None, received
    return outcome, mean.mean(), received


def _describe(reply) -> str:
    return reply.status.value + (f" ({reply.reason.value})" if reply.reason.value else "")


def _check_resume(state: FederationState, config: Config, folder: Path) -> None:
    current = run_definition(config)
    for key in sorted(set(state.run_definition) | set(current)):
        if state.run_definition.get(key) != current.get(key):
            raise FederationError(f"{key}: is {current.get(key)} but the federation in {folder} used "
                                  f"{state.run_definition.get(key)}; restore the config or start a new "
                                  f"run folder")


def _open_ledger(folder: Path, state: FederationState | None) -> ConsortiumLedger:
    ledger = ConsortiumLedger(folder / LEDGER_FILE)
    try:
        entries = ledger.ledger.entries()
    except LedgerError as err:
        raise FederationError(f"{err}") from None
    position = state.ledger_seq if state else 0
    if state is not None and (len(entries) < position or entries[position - 1].hash != state.ledger_hash):
        raise FederationError(f"{ledger.path}: does not hold the entry seq {position} that "
                              f"{folder / 'state.json'} recorded; restore the consortium ledger")
    if len(entries) > position:
        # The server stopped after mirroring replies but before the round's state was written.
        last_round = state.round if state else 0
        ledger.record_resume(round=last_round, checkpoint_seq=position)
        log.info("%s: entries %d..%d belong to an unfinished round and are superseded", ledger.path,
                 position + 1, len(entries))
    return ledger


def _epsilon_report(strategy: BudgetAwareFedAvg) -> dict[str, Any]:
    return {"sites": strategy.standings_json(),
            "note": "cumulative epsilon as each site reported it (accounting figures only); the "
                    "sites' own ledgers are authoritative - reconcile with 'fedsynth audit reconcile'"}


def preflight(settings: FederationSettings) -> tuple[FederationState | None, Checkpoint]:
    """Check that the federation can start (or resume) before any site is contacted.

    Returns the saved state (None for a new federation) and the checkpoint to start from; raises
    :class:`FederationError` (one line) otherwise.
    """
    folder = federation_dir(settings.run_dir)
    state = load_state(folder)
    if state is not None and not settings.resume:
        raise FederationError(f"{folder / 'state.json'}: a federation already ran in this run folder; pass "
                              f"--resume to continue it or choose another run folder (--out)")
    if state is not None:
        _check_resume(state, settings.config, folder)
    start_path = folder / state.checkpoint if state else Path(settings.checkpoint)
    try:
        base = load_checkpoint(start_path)
    except CheckpointError as err:
        raise FederationError(f"{err}") from None
    if state is not None and base.content_hash != state.checkpoint_sha256:
        raise FederationError(f"{start_path}: its hash differs from the one in state.json; restore it")
    return state, base


def run_federation(grid: Grid, settings: FederationSettings,
                   on_round: Callable[[RoundSummary], None] | None = None) -> FederationResult:
    """Run (or resume) the federation over ``grid``; see the module docstring."""
    config = settings.config
    folder = federation_dir(settings.run_dir)
    state, base = preflight(settings)
    if settings.resume and state is None:
        log.info("%s: nothing to resume; starting a new federation", folder)
    if state is not None and state.stop_reason and state.round >= config.federation.rounds:
        # Finished: a resume has nothing to add (and records no second federation-end).
        log.info("%s: the federation already ended after round %d (%s); nothing to resume - raise "
                 "federation.rounds to continue it", folder, state.round, state.stop_reason)
        final = folder / FINAL_CHECKPOINT
        return FederationResult(state.round, state.stop_reason, final if final.exists() else None,
                                folder / LEDGER_FILE, [], state.mlflow_run_id, None)
    folder.mkdir(parents=True, exist_ok=True)
    ledger = _open_ledger(folder, state)
    if state is None:
        ledger.record_start(config_sha256=config_sha256(config), checkpoint_sha256=base.content_hash,
                            planned_rounds=config.federation.rounds,
                            sites=[s.site_id for s in config.federation.sites])

    autoencoder_sha256 = weights_hash(base.autoencoder_state)
    strategy = BudgetAwareFedAvg(config.federation.min_sites,
                                 ArrayRecord(torch_state_dict=pack_state(base.autoencoder_state)))
    if state is not None:
        strategy.load_standings(state.standings)
    global_state = {name: tensor.clone() for name, tensor in base.denoiser_state.items()}
    initial_sha256 = state.initial_checkpoint_sha256 if state else base.content_hash
    done = state.round if state else 0
    bytes_sent = state.bytes_sent if state else 0
    bytes_received = state.bytes_received if state else 0
    validation = None
    validation_path = folder / VALIDATION_FILE
    if settings.evaluate and validation_path.exists():
        validation = load_validation_set(validation_path)
    elif settings.evaluate:
        log.warning("%s: no public validation set; the global model is not evaluated per round "
                    "(`fedsynth federate` and `fedsynth deploy` write it from data.public_dir)",
                    validation_path)

    tracker = StageRun(settings.config.tracking, settings.run_dir, flatten_config(settings.config),
                       stage="federation", enabled=settings.tracking,
                       run_id=state.mlflow_run_id if state else None, tags=settings.run_tags)
    summaries: list[RoundSummary] = []
    holders: set[int] = set()   # nodes that received the autoencoder in this run (cached it)
    model_holders: dict[int, str] = {}   # node -> hash of the full denoiser it received (cached)
    trained_names = _trained_subset(base, config.privacy.trainable)
    stop_reason = state.stop_reason if state else ""
    timeout = config.federation.round_timeout
    try:
        for server_round in range(done + 1, config.federation.rounds + 1):
            connected = wait_for_nodes(grid, config.federation.min_sites,
                                       len(config.federation.sites), timeout)
            if len(connected) < len(config.federation.sites):
                log.warning("round %d: only %d of the %d sites in federation.sites are connected; "
                            "the others do not take part in this round", server_round,
                            len(connected), len(config.federation.sites))
            started = time.perf_counter()
            round_config = round_config_for(config, base, strategy, server_round, global_state,
                                         autoencoder_sha256)
            arrays = ArrayRecord(torch_state_dict=pack_state(global_state))
            messages = list(strategy.configure_train(server_round, arrays,
                                                     ConfigRecord(round_config.to_record()), grid))
            for message in messages:
                # Flower drops an instruction not delivered within the round (default TTL: 12 h).
                message.metadata.ttl = timeout
            _leave_out_cached_weights(messages, holders, model_holders, trained_names, round_config)
            if not messages:
                excluded = "; ".join(f"{k}: {v}" for k, v in strategy.exclusions().items())
                stop_reason = (f"fewer than federation.min_sites={config.federation.min_sites} sites can "
                               f"still train ({excluded or 'none connected'})")
                break
            sent = sum(record_bytes(m.content[GLOBAL_WEIGHTS]) + (
                record_bytes(m.content[FROZEN_AUTOENCODER]) if FROZEN_AUTOENCODER in m.content else 0)
                for m in messages)
            full_to = {int(m.metadata.dst_node_id) for m in messages
                       if not RoundConfig.from_record(dict(m.content[ROUND_CONFIG])).base_sha256}
            outcome, aggregated, received = _stream_round(grid, strategy, ledger, messages,
                                                          server_round, timeout)
            _note_autoencoder_holders(holders, outcome)
            _note_model_holders(model_holders, outcome, full_to, round_config.global_sha256)
            del messages
            bytes_sent, bytes_received = bytes_sent + sent, bytes_received + received
            summary = RoundSummary(
                server_round, outcome.participants,
                {reply.site_id: _describe(reply) for _, reply in outcome.declined},
                [site or f"node {node}" for node, site, _ in outcome.failed], 0.0, sent, received)
            if aggregated is None:
                # Short because sites failed (they might have trained): an error. Short because the
                # sites declined (spent budgets, refusals): the run is over.
                failed = len(outcome.participants) + len(outcome.failed) >= config.federation.min_sites
                wall = time.perf_counter() - started
                ledger.record_round(server_round, status="failed" if failed else "declined",
                                    participants=outcome.participants,
                                    global_sha256=weights_hash(global_state), wall_seconds=wall)
                if not failed:
                    stop_reason = (f"fewer than federation.min_sites={config.federation.min_sites} "
                                   f"sites can still train (round {server_round}: "
                                   f"{summary.declined or 'no site'} declined)")
                    break
                raise FederationHalted(
                    f"round {server_round}: {len(outcome.participants)} site(s) trained, "
                    f"federation.min_sites={config.federation.min_sites} are needed "
                    f"(declined: {summary.declined or 'none'}; failed: {summary.failed or 'none'}); the "
                    f"global model stays at round {server_round - 1} - fix the sites, then run again "
                    f"with --resume")
            for name, tensor in aggregated.items():
                global_state[name] = tensor.to(global_state[name].dtype)
            wall = time.perf_counter() - started
            entry = ledger.record_round(server_round, status="aggregated",
                                        participants=outcome.participants,
                                        global_sha256=weights_hash(global_state), wall_seconds=wall)
            checkpoint = save_round(folder, server_round, base, global_state,
                                    {"initial_checkpoint_sha256": initial_sha256,
                                     "participants": outcome.participants})
            metrics = _round_metrics(summary, strategy, wall)
            if validation is not None:
                evaluated = time.perf_counter()
                device = resolve_device(config.device)
                with autocast(device, config.precision):
                    metrics.update(evaluate_public(
                        configure(checkpoint.build_model(device), config.memory), validation,
                        base.data.num_classes, seed=config.seed,
                        sampling_steps=min(10, config.model.diffusion.sampling_steps),
                        preview=folder / "previews" / f"round_{server_round:04d}.png"))
                metrics["round/eval_seconds"] = time.perf_counter() - evaluated
            write_state(folder, FederationState(
                round=server_round,
                checkpoint=str(round_checkpoint_path(folder, server_round).relative_to(folder)),
                checkpoint_sha256=checkpoint.content_hash, initial_checkpoint_sha256=initial_sha256,
                ledger_seq=entry.seq, ledger_hash=entry.hash, standings=strategy.standings_json(),
                run_definition=run_definition(config), mlflow_run_id=tracker.run_id,
                bytes_sent=bytes_sent, bytes_received=bytes_received))
            prune_checkpoints(folder, server_round)
            done = server_round
            summary = replace(summary, wall_seconds=wall, metrics=metrics)
            summaries.append(summary)
            tracker.metrics(metrics, step=server_round)
            tracker.artifact(folder / "previews" / f"round_{server_round:04d}.png", "previews")
            log.info("round %d: %d site(s) trained (%s) in %.1fs%s", server_round,
                     len(summary.participants), ", ".join(summary.participants), wall,
                     f"; public validation loss {metrics['val/diffusion_loss']:.4f}"
                     if "val/diffusion_loss" in metrics else "")
            if on_round is not None:
                on_round(summary)
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if not stop_reason:
        stop_reason = f"all {config.federation.rounds} rounds done"
    if done == 0:
        # No site ever trained: an error, not a finished federation.
        tracker.finish("FAILED")
        ledger.record_end(rounds_completed=0, reason=stop_reason)
        raise FederationHalted(f"no site trained: {stop_reason}")
    final = _finish(folder, ledger, base, done, stop_reason, strategy, tracker, settings)
    return FederationResult(done, stop_reason, final, ledger.path, summaries, tracker.run_id, tracker.uri)


def _round_metrics(summary: RoundSummary, strategy: BudgetAwareFedAvg, wall: float) -> dict[str, float]:
    metrics: dict[str, float] = {"round/wall_seconds": wall, "round/bytes_sent": float(summary.bytes_sent),
                                 "round/bytes_received": float(summary.bytes_received),
                                 "round/sites": float(len(summary.participants))}
    for site, standing in strategy.standings.items():
        metrics[f"epsilon/{site}"] = standing.epsilon
        metrics[f"round/participated/{site}"] = float(site in summary.participants)
    return metrics


def _finish(folder: Path, ledger: ConsortiumLedger, base: Checkpoint, done: int, stop_reason: str,
            strategy: BudgetAwareFedAvg, tracker: StageRun, settings: FederationSettings) -> Path | None:
    """Record the end, write the final checkpoint and reports, log the artifacts."""
    state = load_state(folder)
    final = None
    if state is not None:
        last = load_checkpoint(folder / state.checkpoint)
        final = folder / FINAL_CHECKPOINT
        save_checkpoint(final, autoencoder=last.autoencoder_state, denoiser=last.denoiser_state,
                        model_config=last.model_config, data=last.data,
                        latent_scale_factor=last.latent_scale_factor,
                        metadata={**last.metadata, "final": True, "stop_reason": stop_reason})
    entry = ledger.record_end(rounds_completed=done, reason=stop_reason)
    if state is not None:
        write_state(folder, replace(state, ledger_seq=entry.seq, ledger_hash=entry.hash,
                                    stop_reason=stop_reason, mlflow_run_id=tracker.run_id))
    report = folder / EPSILON_REPORT
    report.write_text(json.dumps(_epsilon_report(strategy), indent=1, sort_keys=True))
    config_dump = folder / "config.yaml"
    config_dump.write_text(yaml.safe_dump(config_to_dict(settings.config), sort_keys=False))
    tracker.artifact(config_dump, "config")
    if settings.config_file is not None:
        tracker.artifact(settings.config_file, "config")
    tracker.artifact(ledger.path, "ledger")
    tracker.artifact(report, "privacy")
    if final is not None:
        tracker.artifact(final, "checkpoint")
    tracker.tags({"rounds_completed": str(done), "stop_reason": stop_reason,
                  "final_checkpoint": str(final) if final else ""})
    tracker.finish()
    log.info("federation ended after %d round(s): %s", done, stop_reason)
    return final
