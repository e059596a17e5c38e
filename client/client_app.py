"""The site's Flower ClientApp: decode a train message, run the round, send the allowed reply.

Where the site's own config comes from:

- deployment: the SuperNode's node config, ``--node-config 'site-config="/path/site.yaml"'``
  (:func:`configs.load_site_config`); the file never leaves the hospital;
- simulation: the experiment config (run config ``config-path``, or the path given to
  :func:`make_client_app`) and this node's ``partition-id``: ``federation.sites[partition-id]``.

A deployed site (its own config file) must set ``budget.target_epsilon``; it never takes the
consortium's default. In simulation a site entry without a budget takes the default once, locked
into its ledger (:func:`privacy.budget.resolve_cap`).

Everything else is in :mod:`client.site_runtime`; the reply is checked against the allow-list of
:mod:`privacy.protocol` before it is returned.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_runtime import SiteOutcome, TrainInstruction, run_site_round
from client.weights_cache import (AutoencoderMissing, DenoiserMissing, RebuiltModelMismatch,
                                  frozen_autoencoder, rebuild_global)
from client.weights_cache import autoencoder_cache_path  # noqa: F401 - part of this module's API
from configs import load_config, load_site_config
from configs.schema import SiteConfig
from models.logs import show_in_flower_log
from privacy.packed_state import pack_state, unpack_state
from privacy.protocol import (ARRAYS, CONFIG, FROZEN_AUTOENCODER, GLOBAL_WEIGHTS, METRICS,
                              ROUND_CONFIG, SITE_ACCOUNTING, SITE_STATUS, SITE_WEIGHTS,
                              ProtocolViolation, RefusalReason, ReplyStatus, RoundConfig, TrainReply,
                              check_reply)

log = logging.getLogger(__name__)

SITE_CONFIG_KEY = "site-config"      # node config: the site's own YAML
CONFIG_PATH_KEY = "config-path"      # run config: the experiment YAML (simulation)
PARTITION_KEY = "partition-id"       # node config in simulation
PARTITIONS_KEY = "num-partitions"    # node config in simulation: the number of simulated nodes
DEVICE_KEY = "device"                # run config (simulation): the --device override


class SiteConfigMissing(ValueError):
    """The SuperNode was started without a site config. One line with the fix."""


def is_deployment(context: Context) -> bool:
    """True when this node runs from the site's own config file (a SuperNode's ``site-config``):
    the consortium's default budget is then never taken (:func:`privacy.budget.resolve_cap`)."""
    return SITE_CONFIG_KEY in dict(context.node_config)


def resolve_site(context: Context, defaults: Mapping[str, Any]) -> SiteConfig:
    """This node's :class:`SiteConfig` (see the module docstring)."""
    node_config, run_config = dict(context.node_config), {**defaults, **dict(context.run_config)}
    if SITE_CONFIG_KEY in node_config:
        return load_site_config(str(node_config[SITE_CONFIG_KEY]))
    if PARTITION_KEY in node_config and run_config.get(CONFIG_PATH_KEY):
        config = load_config(str(run_config[CONFIG_PATH_KEY]))
        sites = config.federation.sites
        partition = int(node_config[PARTITION_KEY])
        nodes = int(node_config.get(PARTITIONS_KEY, len(sites)))
        if nodes < len(sites):
            # Otherwise the sites past the last node would silently never be asked.
            raise SiteConfigMissing(f"{run_config[CONFIG_PATH_KEY]}: federation.sites lists "
                                    f"{len(sites)} sites but the simulation has {nodes} nodes; set "
                                    f"options.num-supernodes = {len(sites)} in the SuperLink "
                                    f"connection ($FLWR_HOME/config.toml)")
        if not 0 <= partition < len(sites):
            raise SiteConfigMissing(f"{run_config[CONFIG_PATH_KEY]}: federation.sites has {len(sites)} "
                                    f"entries, simulation node {partition} has none; list one site "
                                    f"per node")
        # Simulated sites share this machine: the run's device (--device, else the config's).
        device = run_config.get(DEVICE_KEY) or config.device
        return replace(sites[partition], device=sites[partition].device or device,
                       precision=sites[partition].precision or config.precision)
    raise SiteConfigMissing("this SuperNode has no site config; start it with "
                            "--node-config 'site-config=\"/path/to/site.yaml\"'")


def decode_instruction(content: RecordDict, site: SiteConfig) -> TrainInstruction:
    """The round config and the global / autoencoder state dicts of a train message.

    Public weights the message leaves out come from the site's cache (:mod:`client.weights_cache`):
    raises :class:`AutoencoderMissing` / :class:`DenoiserMissing` when the cache lacks them, and
    :class:`RebuiltModelMismatch` when the trained subset does not rebuild the global model."""
    try:
        round_config = RoundConfig.from_record(dict(content[ROUND_CONFIG]))
        received = unpack_state(content[GLOBAL_WEIGHTS])
    except KeyError as err:
        raise ProtocolViolation(f"train message lacks the record {err}") from None
    global_state = rebuild_global(site, received, round_config)
    autoencoder = frozen_autoencoder(
        site, unpack_state(content[FROZEN_AUTOENCODER]) if FROZEN_AUTOENCODER in content
        else None, round_config.autoencoder_sha256)
    if autoencoder is None:
        raise AutoencoderMissing(round_config.server_round)
    return TrainInstruction(round_config, global_state, autoencoder)


def _refusal(message: Message, site: SiteConfig, reason: RefusalReason, server_round: int) -> Message:
    """A refusal decided before the round starts (nothing private computed, ledger untouched)."""
    reply = TrainReply(status=ReplyStatus.REFUSED, reason=reason, site_id=site.site_id,
                       round=server_round)
    return Message(encode_reply(SiteOutcome(reply, None, 0.0), {}), reply_to=message)


def encode_reply(outcome: SiteOutcome, weight_shapes: Mapping[str, tuple[int, ...]]) -> RecordDict:
    """The reply records, checked against the allow-list (:func:`privacy.protocol.check_reply`)."""
    reply = outcome.reply
    layout: dict[str, tuple[str, Mapping[str, Any]]] = {
        SITE_ACCOUNTING: (METRICS, reply.accounting()), SITE_STATUS: (CONFIG, reply.status_fields())}
    if outcome.weights is not None:
        layout[SITE_WEIGHTS] = (ARRAYS, {k: tuple(v.shape) for k, v in outcome.weights.items()})
    check_reply(layout, weight_shapes)
    records: dict[str, Any] = {SITE_ACCOUNTING: MetricRecord(reply.accounting()),
                               SITE_STATUS: ConfigRecord(reply.status_fields())}
    if outcome.weights is not None:
        records[SITE_WEIGHTS] = ArrayRecord(torch_state_dict=pack_state(outcome.weights))
    return RecordDict(records)


def past_deadline(round_config: RoundConfig, now: float | None = None) -> float | None:
    """Seconds past the round's deadline (None: in time, or no deadline). Clocks are compared
    as they are: server and sites keep NTP time."""
    if not round_config.deadline:
        return None
    late = (time.time() if now is None else now) - round_config.deadline
    return late if late > 0 else None


def process_started_at() -> float | None:
    """When this process started (Unix seconds, from Linux's /proc; None elsewhere): with
    Flower's fresh process per message, the time before :func:`handle_train` runs is the cost of
    starting Python and importing the ClientApp."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = float(Path("/proc/uptime").read_text().split()[0]) - \
            int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - age


def handle_train(message: Message, context: Context, defaults: Mapping[str, Any]) -> Message:
    """Answer a train message with a reply whose content passed the allow-list check."""
    received = time.time()
    site = resolve_site(context, defaults)
    try:
        instruction = decode_instruction(message.content, site)
    except (AutoencoderMissing, DenoiserMissing) as missing:
        # Structured, so that the server sends the full weights again next round.
        log.warning("%s: %s; refusing the round", site.site_id, missing)
        reason = RefusalReason.AUTOENCODER_MISSING if isinstance(missing, AutoencoderMissing) \
            else RefusalReason.DENOISER_MISSING
        return _refusal(message, site, reason, missing.server_round)
    except RebuiltModelMismatch as err:
        log.error("%s: refusing %s", site.site_id, err)
        return _refusal(message, site, RefusalReason.MODEL_MISMATCH, err.server_round)
    except ProtocolViolation as err:
        log.error("%s: refusing a malformed train message: %s", site.site_id, err)
        round_config = message.content.get(ROUND_CONFIG, {})
        return _refusal(message, site, RefusalReason.PROTOCOL_MISMATCH,
                        int(round_config.get("server-round", 0)))
    late = past_deadline(instruction.round_config)
    if late is not None:
        # Before any private computation: the server has closed this round, so training now would
        # spend epsilon on weights it throws away. The ledger is not touched.
        log.warning("%s: refusing round %d: received %.1fs after its deadline", site.site_id,
                    instruction.round_config.server_round, late)
        return _refusal(message, site, RefusalReason.DEADLINE_PASSED,
                        instruction.round_config.server_round)
    timings = {"received": received, "decode_seconds": time.time() - received}
    started = process_started_at()
    if started is not None:
        timings["process_started"] = started
    outcome = run_site_round(site, instruction, deployment=is_deployment(context), timings=timings)
    shapes = {name: tuple(tensor.shape) for name, tensor in instruction.global_state.items()}
    log.info("%s: round %d %s%s (epsilon %.4g of %g)", site.site_id, outcome.reply.round,
             outcome.reply.status.value, f" ({outcome.reply.reason.value})" if outcome.reply.reason.value
             else "", outcome.reply.epsilon, outcome.reply.target_epsilon)
    return Message(encode_reply(outcome, shapes), reply_to=message)


def make_client_app(config_path: str | None = None, device: str | None = None) -> ClientApp:
    """A ClientApp whose default run config names the experiment YAML (used in simulation) and,
    with ``device``, overrides the config's device for the simulated sites."""
    defaults = {CONFIG_PATH_KEY: config_path} if config_path else {}
    if device:
        defaults[DEVICE_KEY] = device
    client_app = ClientApp()

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        if is_deployment(context):   # a real SuperNode: show fedsynth lines in its log
            show_in_flower_log()
        return handle_train(message, context, defaults)

    @client_app.query("gate")  # privacy.protocol.GATE_MESSAGE_TYPE: the release gate (client.gate)
    def gate(message: Message, context: Context) -> Message:
        from client.gate import answer_gate_message
        if is_deployment(context):
            show_in_flower_log()
        answer = answer_gate_message(resolve_site(context, defaults), message.content,
                                     deployment=is_deployment(context))
        return Message(answer, reply_to=message)

    return client_app


app = make_client_app()
