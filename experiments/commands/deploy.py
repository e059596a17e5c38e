"""``fedsynth deploy``: certificates, SuperNode keys and the step-by-step commands of a real deployment."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy", help="make TLS certificates and SuperNode keys; print the deployment commands",
        description="Prepare a Flower deployment of CONFIG in OUT: a CA and a server certificate "
                    "for --host (TLS), one EC P-384 key pair per site in federation.sites (SuperNode "
                    "authentication), each site's own site.yaml, the Flower CLI connection "
                    "(OUT/flwr/config.toml, use FLWR_HOME=OUT/flwr) and the server's public "
                    "validation set. Then print, step by step, the flower-superlink, flwr supernode "
                    "register, flower-supernode and flwr run commands. In production each hospital "
                    "makes its own key and keeps the private half.")
    parser.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                        help="experiment YAML config")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help="folder for certificates, keys and the commands")
    parser.add_argument("--host", action="append", metavar="NAME",
                        help="the SuperLink's host name or IP as the sites reach it (repeatable; "
                             "default: localhost and 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9092, help="the SuperLink's port (default 9092)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication (a local trial only)")
    parser.add_argument("--run-dir", type=Path, metavar="RUN_DIR",
                        help="the server's run folder (default: the config's run_dir, "
                             "else ./runs/<config name>)")
    parser.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="pretrained checkpoint (default: RUN_DIR/checkpoint.pt)")
    parser.add_argument("--bind", metavar="ADDRESS",
                        help="the address the SuperLink listens on (default: the first --host, "
                             "127.0.0.1 without --host)")
    parser.add_argument("--app", type=Path, metavar="DIR",
                        help="the Flower app folder passed to flwr run (default: the fedsynth "
                             "checkout at or above the working folder)")
    parser.add_argument("--release-num", type=int, metavar="N",
                        help="samples in the printed release command (default: "
                             "release.num_samples)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from configs import load_config
    from experiments.deployment import DEPLOY_OUTPUTS, DeployError, check_host
    from experiments.preflight import check_output_folder, removed_if_failed

    if not 1 <= args.port <= 65535:
        raise DeployError(f"--port {args.port}: not a TCP port; pass 1..65535")
    hosts = [check_host(host) for host in (args.host or ["localhost", "127.0.0.1"])]
    config = load_config(args.config)
    out = args.out.resolve()
    run_dir = (args.run_dir or config.run_dir or Path("runs") / args.config.stem).resolve()
    checkpoint = (args.checkpoint or run_dir / "checkpoint.pt").resolve()
    if not checkpoint.is_file():
        where = "--checkpoint" if args.checkpoint else "the run folder's checkpoint"
        raise DeployError(f"{where} {checkpoint}: checkpoint not found; run "
                         f"`fedsynth pretrain` first or pass --checkpoint FILE")
    check_output_folder(args.out, own=DEPLOY_OUTPUTS,
                        inputs=[args.config, checkpoint, config.data.public_dir,
                                *(site.data_dir for site in config.federation.sites)])
    with removed_if_failed(out):
        return _write_deployment(args, config, out, run_dir, checkpoint, hosts)


def _write_deployment(args, config, out: Path, run_dir: Path, checkpoint: Path,
                      hosts: list[str]) -> int:
    import yaml

    from configs import config_to_dict
    from experiments.deployment import (CONNECTION, SUPERNODE_FIRST_PORT, app_fab_hash,
                                        find_app_dir, flwr_run_command, make_certificates,
                                        make_supernode_key, run_config_argument, shell,
                                        site_exec_command, superlink_command, supernode_command,
                                        write_flower_config, write_superexec_secret)
    from experiments.federate import prepare_public_validation

    address = f"{hosts[0]}:{args.port}"
    certificates = None if args.insecure else make_certificates(out / "certs", hosts)
    flwr_home = out / "flwr"
    write_flower_config(flwr_home, address, None if certificates is None else certificates.ca)
    prepare_public_validation(config, run_dir)
    app_dir = find_app_dir(args.app) if args.app else find_app_dir()
    fab_hash = app_fab_hash(app_dir)   # what `flwr run APP_DIR` will submit, as the folder is now
    bind = args.bind or (hosts[0] if args.host else "127.0.0.1")
    env = {"FLWR_HOME": str(flwr_home)}

    steps = ["# 1. Consortium server: start the SuperLink (keep it running)",
             shell(superlink_command(args.port, certificates, host=bind,
                                   database=run_dir / "superlink.db"))]
    site_lines: list[str] = []
    registrations: list[str] = []
    for index, site in enumerate(config.federation.sites):
        folder = out / "supernodes" / site.site_id
        site_yaml = folder / "site.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        site_yaml.write_text(yaml.safe_dump(config_to_dict(site), sort_keys=False))
        private = None
        if certificates is not None:
            private, public = make_supernode_key(folder)
            registrations.append(shell(["flwr", "supernode", "register", str(public), CONNECTION,
                                        "--name", site.site_id], env))
        extra = f" and {certificates.ca}" if certificates else ""
        runtime_port = SUPERNODE_FIRST_PORT + index
        secret = write_superexec_secret(folder)
        site_lines += [f"# {site.site_id}: copy {folder}{extra} to the hospital; in production the "
                       f"hospital makes its own key and only the public half leaves it",
                       shell(supernode_command(address, site_yaml, runtime_port,
                                               None if certificates is None else certificates.ca,
                                               private, site_exec=True, superexec_secret=secret)),
                       "#   and, next to it, the site's task runner (warm ClientApp processes; "
                       "runs only the FAB hash the hospital approved, with its installed fedsynth)",
                       shell(site_exec_command(runtime_port, fab_hash, secret))]
    if registrations:
        steps += ["# 2. Register each hospital's SuperNode public key (only these may connect)"]
        steps += registrations
    steps += ["# 3. Each hospital starts its SuperNode with its own site config"]
    steps += site_lines or ["flower-supernode --superlink " + address + " --root-certificates ca.crt "
                            "--auth-supernode-private-key supernode --node-config "
                            "'site-config=\"/path/to/site.yaml\"'"]
    run_config = run_config_argument(args.config, run_dir, checkpoint)
    steps += ["# 4. Start the federation (the run config comes from the same YAML)",
              shell(flwr_run_command(app_dir, run_config), env),
              "# 5. After an interruption, continue from the last finished round",
              shell(flwr_run_command(app_dir, run_config_argument(args.config, run_dir, checkpoint,
                                                                  resume=True)), env),
              "# 6. Release: sample, gate every candidate at every site over the same SuperLink, "
              "write (run it again to resume an interrupted release)",
              shell(flwr_run_command(app_dir, run_config_argument(
                  args.config, run_dir, None, mode="release",
                  release_num=args.release_num or config.release.num_samples,
                  release_out=run_dir / "release")), env),
              "#    or, equivalently: " + shell(["fedsynth", "release", "--config",
                                                 str(Path(args.config).resolve()), "--num",
                                                 str(args.release_num or config.release.num_samples),
                                                 "--out", str(run_dir / "release"),
                                                 "--run-dir", str(run_dir),
                                                 "--deployment", str(out)])]
    steps += [f"# The FAB hash above is that of `flwr run {app_dir}` now; any change to the app "
              f"folder's client/, server/, privacy/, models/ or configs/ changes it, and the sites "
              f"then refuse the run until they approve the new hash"]
    commands = out / "commands.txt"
    commands.write_text("\n".join(steps) + "\n")
    print("\n".join(steps))
    print(f"\n(also written to {commands})")
    return 0
