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
    if args.action == "show":
        yaml.safe_dump(config_to_dict(config), sys.stdout, sort_keys=False)
    else:
        print(f"{args.config}: ok")
    return 0
