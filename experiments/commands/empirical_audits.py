"""``fedsynth audit canaries`` and ``fedsynth audit membership`` (registered by
``experiments.commands.audit``): the empirical checks beside the accountant's epsilon."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_empirical_actions(actions: argparse._SubParsersAction) -> None:
    canaries = actions.add_parser(
        "canaries", help="research: an empirical epsilon lower bound from one run with canaries",
        description="One-run privacy auditing (Steinke, Nasr, Jagielski 2023) of the site's "
                    "DP-SGD as fedsynth runs it: m white-box gradient canaries, each included "
                    "with probability 1/2, trained once with the site's sigma, q, C, steps, "
                    "rounds, accountant and delta (from its ledger's plan, else calibrated from "
                    "the config). Writes canary_audit.json and a research ledger to OUT; never "
                    "reads scans, never writes the site's ledger. Exit 1 if the lower bound "
                    "exceeds the accountant's epsilon (an accounting bug), 0 otherwise.")
    _site_arguments(canaries)
    canaries.add_argument("--canaries", type=int, default=1000, metavar="M",
                          help="number of canaries (default 1000)")
    canaries.add_argument("--seed", type=int, default=0, help="seed of the draw and training")
    canaries.add_argument("--rounds", type=int, metavar="R",
                          help="rounds to audit (default: the plan's planned rounds)")
    canaries.add_argument("--confidence", type=float, default=0.95,
                          help="confidence of the lower bound (default 0.95)")
    canaries.set_defaults(handler=_canaries)
    membership = actions.add_parser(
        "membership", help="at a site: membership inference against the final model",
        description="Run AT a site. Members are the patients it trained on, non-members the ones "
                    "its config held out (membership_holdout, recorded in its ledger). Loss "
                    "attack and SecMI step-error attack; writes only AUC and TPR at 1%% and "
                    "0.1%% FPR with 95%% bootstrap intervals to OUT/membership_audit.json.")
    _site_arguments(membership)
    membership.add_argument("--checkpoint", type=Path, required=True, metavar="CK",
                            help="the final model's checkpoint")
    membership.add_argument("--seed", type=int, default=0, help="seed of the fixed noise draws")
    membership.set_defaults(handler=_membership)


def _site_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where to write the audit (outside the site's data folder)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--site-config", type=Path, metavar="FILE",
                       help="the site's own YAML (deployment)")
    where.add_argument("--config", type=Path, metavar="CONFIG",
                       help="an experiment config listing the site in federation.sites (with "
                            "--site)")
    parser.add_argument("--site", metavar="SITE_ID", help="the site's id in --config")


def _site(args: argparse.Namespace):
    from client.membership_audit import MembershipAuditError
    from configs import load_config, load_site_config

    if args.config is None:
        return None, load_site_config(args.site_config)
    config = load_config(args.config)
    matches = [s for s in config.federation.sites if s.site_id == args.site]
    if not matches:
        known = ", ".join(s.site_id for s in config.federation.sites) or "none"
        raise MembershipAuditError(f"{args.config}: --site {args.site!r} is not in "
                                   f"federation.sites (known: {known}); pass one of them")
    return config, matches[0]


def _mechanism(config, site, rounds: int | None):
    """The site's mechanism: its ledger's plan (read only) when it has one, else the config's."""
    from client.manifest import read_manifest
    from privacy.calibration import calibrate
    from privacy.canary_audit import AuditedMechanism, CanaryAuditError
    from privacy.site_ledger import read_site_ledger

    plan = read_site_ledger(site.ledger_path).plan if site.ledger_path.exists() else None
    if plan is not None:
        return AuditedMechanism.from_plan(plan, rounds or plan.planned_rounds)
    if config is None:
        raise CanaryAuditError(f"{site.ledger_path}: has no plan yet; pass --config and --site "
                               f"so the audit can calibrate the site's settings")
    patients = {record.patient_id for record in read_manifest(site.data_dir, site.manifest)}
    num_patients = len(patients) - int(round(site.membership_holdout * len(patients)))
    privacy, budget = config.privacy, config.site_budget(site)
    rounds = rounds or config.federation.rounds
    if not privacy.enabled:
        return AuditedMechanism(0.0, num_patients, privacy.expected_batch_size,
                                config.federation.local_epochs, rounds, privacy.accountant,
                                budget.delta, privacy.max_grad_norm, privacy.clipping,
                                private=False, learning_rate=privacy.learning_rate)
    schedule = calibrate(target_epsilon=budget.target_epsilon, delta=budget.delta,
                         num_patients=num_patients,
                         expected_batch_size=privacy.expected_batch_size, rounds=rounds,
                         local_epochs=config.federation.local_epochs,
                         accountant=privacy.accountant, where=site.site_id)
    return AuditedMechanism(schedule.noise_multiplier, num_patients, privacy.expected_batch_size,
                            config.federation.local_epochs, rounds, privacy.accountant,
                            budget.delta, privacy.max_grad_norm, privacy.clipping,
                            target_epsilon=budget.target_epsilon)


def _check_out(out: Path, site) -> None:
    from privacy.canary_audit import CanaryAuditError

    out, data = out.resolve(), Path(site.data_dir).resolve()
    ledger_dir = site.ledger_path.resolve().parent
    if out == ledger_dir or out == data or data in out.parents or ledger_dir in out.parents:
        raise CanaryAuditError(f"--out {out}: inside the site's data or ledger folder; the audit "
                               f"writes research files only - choose a folder outside {data}")


def _canaries(args: argparse.Namespace) -> int:
    from privacy.canary_audit import run_canary_audit, write_canary_audit

    config, site = _site(args)
    _check_out(args.out, site)
    mechanism = _mechanism(config, site, args.rounds)
    audit = run_canary_audit(mechanism, args.out, canaries=args.canaries, seed=args.seed,
                             confidence=args.confidence)
    path = write_canary_audit(audit, args.out, site.site_id)
    claimed = audit.accountant_epsilon
    print(f"{site.site_id}: {audit.canaries} canaries ({audit.included} included), "
          f"{mechanism.steps} steps at sigma {mechanism.noise_multiplier:.4g}, "
          f"q {mechanism.sample_rate:.4g}, C {mechanism.max_grad_norm:g}")
    print(f"  empirical epsilon >= {audit.epsilon_lower_bound:.3f} at "
          f"{audit.confidence:.0%} confidence (delta {mechanism.delta:g}); accountant epsilon "
          f"{'inf (not private)' if math.isinf(claimed) else f'{claimed:.3f}'}")
    print(f"  wrote {path}")
    if audit.exceeds_accountant:
        print("  PROBLEM: the lower bound exceeds the accountant's epsilon")
        return 1
    return 0


def _membership(args: argparse.Namespace) -> int:
    from client.membership_audit import audit_membership, write_membership_audit
    from models.checkpoint import load_checkpoint

    config, site = _site(args)
    _check_out(args.out, site)
    percentiles = tuple(config.data.intensity_percentiles) if config else (0.5, 99.5)
    audit = audit_membership(site, load_checkpoint(args.checkpoint), seed=args.seed,
                             intensity_percentiles=percentiles)
    path = write_membership_audit(audit, args.out)
    print(f"{site.site_id}: {audit.members} members vs {audit.nonmembers} held-out patients")
    for name, figures in audit.attacks.items():
        auc = figures["auc"]
        tpr = figures["tpr_at_0.01_fpr"]
        print(f"  {name}: AUC {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}], "
              f"TPR@1%FPR {tpr['value']:.3f} [{tpr['ci95'][0]:.3f}, {tpr['ci95'][1]:.3f}]")
    print(f"  wrote {path}")
    return 0
