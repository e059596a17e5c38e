"""``fedsynth budget plan``: each site's noise and epsilon schedule, before anything runs.

For every site of ``federation.sites``: N = the distinct patients of its manifest (or
``--patients``), q = expected_batch_size / N, sigma calibrated to the site's own budget over
``federation.rounds`` x ``federation.local_epochs`` epochs, and the cumulative epsilon after each
round. Nothing is written; the site writes the same plan to its ledger when it first trains.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "budget", help="plan each site's DP noise and epsilon per round",
        description="Privacy budget planning (nothing is trained or written).")
    actions = parser.add_subparsers(dest="budget_command", metavar="ACTION")
    plan = actions.add_parser(
        "plan", help="print each site's sigma and epsilon after each round",
        description="For each site of the config: the noise multiplier sigma calibrated to the "
                    "site's budget (target_epsilon, delta) over the planned rounds, the sample "
                    "rate q = B/N over patients, and the cumulative epsilon after each round. N is "
                    "the number of distinct patient_id in the site's manifest unless --patients is "
                    "given.")
    plan.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                      help="experiment config")
    plan.add_argument("--patients", action="append", default=[], metavar="[SITE=]N",
                      help="patients at a site (SITE=N, repeatable) or at every site (N), "
                           "instead of counting its manifest; with a config without sites, plans "
                           "one site of N")
    plan.set_defaults(handler=_plan)
    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# Rounds listed one per line; a longer plan shows the first and last ones and every 10%.
ROUNDS_IN_FULL = 24


def shown_rounds(rounds: int) -> list[int]:
    """The round numbers ``budget plan`` prints: all of them up to :data:`ROUNDS_IN_FULL`, else
    the first and last 5 and every tenth of the plan (the curve's shape without a screenful per
    site)."""
    if rounds <= ROUNDS_IN_FULL:
        return list(range(1, rounds + 1))
    picks = set(range(1, 6)) | set(range(rounds - 4, rounds + 1))
    picks |= {max(1, round(rounds * k / 10)) for k in range(1, 10)}
    return sorted(picks)


class PatientsOptionError(ValueError):
    """A malformed ``--patients`` value."""


def _patient_overrides(values: list[str], site_ids: list[str]) -> tuple[int | None, dict[str, int]]:
    everywhere, per_site = None, {}
    for value in values:
        site, _, count = value.rpartition("=")
        try:
            number = int(count)
        except ValueError:
            number = 0
        if number < 1:
            raise PatientsOptionError(f"--patients {value}: expected N or SITE=N with N >= 1; "
                                      f"pass e.g. --patients 40 or --patients site_0=40")
        if not site:
            everywhere = number
        elif site_ids and site not in site_ids:
            raise PatientsOptionError(f"--patients {value}: no site {site!r} in the config "
                                      f"(sites: {', '.join(site_ids)}); name one of them")
        else:
            per_site[site] = number
    return everywhere, per_site


def _count_patients(site) -> int:
    from client.site_data import read_manifest

    return len({record.patient_key for record in read_manifest(site.data_dir, site.manifest)})


def _plan(args: argparse.Namespace) -> int:
    from configs import load_config

    config = load_config(args.config, check_paths=False)
    sites = list(config.federation.sites)
    everywhere, per_site = _patient_overrides(args.patients, [s.site_id for s in sites])
    from privacy.calibration import LARGE_DELTA_FACTOR, LARGE_DELTA_KEY, calibrate

    if not sites:
        if everywhere is None:
            raise PatientsOptionError(f"{args.config}: federation.sites is empty; add the sites or "
                                      f"pass --patients N to plan one site of N patients")
        targets = [("site", everywhere, config.privacy.target_epsilon, config.privacy.delta,
                    False)]
    else:
        targets = []
        for site in sites:
            budget = config.site_budget(site)
            count = per_site.get(site.site_id, everywhere)
            targets.append((site.site_id, count if count is not None else _count_patients(site),
                            budget.target_epsilon, budget.delta,
                            bool(site.budget and site.budget.allow_large_delta)))
    federation, privacy = config.federation, config.privacy
    print(f"{args.config}: {federation.rounds} rounds x {federation.local_epochs} local epochs, "
          f"{privacy.expected_batch_size} patients per step (expected), {privacy.accountant} "
          f"accountant, clipping norm {privacy.max_grad_norm:g}")
    for site_id, patients, target, delta, allow_large_delta in targets:
        plan = calibrate(target_epsilon=target, delta=delta, num_patients=patients,
                         expected_batch_size=privacy.expected_batch_size, rounds=federation.rounds,
                         local_epochs=federation.local_epochs, accountant=privacy.accountant,
                         where=f"site {site_id}", allow_large_delta=allow_large_delta)
        print(f"\nsite {site_id}: N={patients} patients, q={plan.sample_rate:.4g}, "
              f"sigma={plan.noise_multiplier:.4f}, {plan.steps_per_round} steps per round, "
              f"budget epsilon {target:g} at delta {delta:g}")
        print("  round  epsilon")
        rounds = shown_rounds(federation.rounds)
        for previous, number in zip([0, *rounds], rounds):
            if number > previous + 1:
                print(f"  {'...':>5}")
            print(f"  {number:>5}  {plan.epsilon_after(number):.4f}")
        print(f"  total  {plan.epsilon_after(federation.rounds):.4f} of {target:g}")
        if delta > 1 / (LARGE_DELTA_FACTOR * patients):
            print(f"  note: delta {delta:g} is above 1/(10N) = "
                  f"{1 / (LARGE_DELTA_FACTOR * patients):.3g}, accepted only because the site's "
                  f"config sets {LARGE_DELTA_KEY}: true")
    return 0
