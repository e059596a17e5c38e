"""``fedsynth config check|show``: validate a config before anything runs."""

from __future__ import annotations

import argparse
import sys

import yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="validate a config or print it with every default filled in",
        description="Validate a fedsynth YAML config. Problems are reported one per line "
                    "naming the key and the fix (exit 2).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("check", "validate a config (and that its input paths exist)"),
                       ("show", "print the config with every default filled in")):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("config", help="path to the YAML config")
        sub.add_argument("--site", action="store_true",
                         help="the file is a site config (site.example.yaml), not an experiment config")
        sub.add_argument("--no-path-check", action="store_true",
                         help="do not require input paths to exist yet")
        sub.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from configs import config_to_dict, load_config, load_site_config

    load = load_site_config if args.site else load_config
    config = load(args.config, check_paths=not args.no_path_check)
    if args.action == "check":
        _check_delta_policy(config, args.site)
    if args.action == "show":
        yaml.safe_dump(config_to_dict(config), sys.stdout, sort_keys=False)
    else:
        print(f"{args.config}: ok")
    return 0


def _check_delta_policy(config, is_site: bool) -> None:
    """Each site's delta against its patient count (the delta policy, one line on failure), for
    the sites whose manifest is readable from here."""
    from client.manifest import SiteDataError, read_manifest
    from privacy.calibration import check_delta

    sites = [config] if is_site else list(config.federation.sites)
    for site in sites:
        if not (site.data_dir / site.manifest).is_file():
            continue
        try:
            patients = len({r.patient_key for r in read_manifest(site.data_dir, site.manifest)})
        except SiteDataError:
            continue   # `fedsynth data check` reports manifest problems
        budget = site.budget if is_site or site.budget is not None else config.site_budget(site)
        if budget is None:
            continue
        check_delta(budget.delta, patients, f"site {site.site_id}",
                    bool(getattr(budget, "allow_large_delta", False)))
