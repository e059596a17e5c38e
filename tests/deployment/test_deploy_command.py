"""`fedsynth deploy`: certificates, SuperNode keys, the Flower CLI connection and the printed steps."""

from __future__ import annotations

import stat
import tomllib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from experiments.cli import main
from experiments.deployment import app_fab_hash
from server.federation import federation_dir


def test_deploy_writes_certificates_keys_and_the_commands(new_federation, tmp_path, capsys):
    fed = new_federation(sites=2)
    out = tmp_path / "deploy"
    assert main(["deploy", "--config", str(fed.config_path), "--out", str(out), "--port", "9443",
                 "--checkpoint", str(fed.checkpoint)]) == 0
    printed = capsys.readouterr().out

    ca = x509.load_pem_x509_certificate((out / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "certs" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for secret in (out / "certs" / "ca.key", out / "certs" / "server.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for site_id in fed.site_ids:
        folder = out / "supernodes" / site_id
        key = serialization.load_ssh_private_key((folder / "supernode").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert (folder / "supernode.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert f"site_id: {site_id}" in (folder / "site.yaml").read_text()
        assert f"flwr supernode register {folder / 'supernode.pub'} fedsynth" in printed
        assert f"--auth-supernode-private-key {folder / 'supernode'}" in printed
        assert f"site-config=\"{(folder / 'site.yaml').resolve()}\"" in printed

    connection = tomllib.loads((out / "flwr" / "config.toml").read_text())["superlink"]
    assert connection["default"] == "fedsynth"
    assert connection["fedsynth"] == {"address": "localhost:9443",
                                      "root-certificates": str((out / "certs" / "ca.crt").resolve())}
    assert "--enable-supernode-auth" in printed and "--ssl-certfile" in printed
    assert "flwr run" in printed and f"config-path=\"{fed.config_path}\"" in printed
    assert "resume=true" in printed
    assert (out / "commands.txt").read_text().strip() in printed
    assert (federation_dir(fed.run_dir) / "public_validation.pt").exists()


def test_insecure_deploy_has_no_certificates(new_federation, tmp_path, capsys):
    fed = new_federation(sites=1)
    out = tmp_path / "deploy"
    assert main(["deploy", "--config", str(fed.config_path), "--out", str(out), "--insecure",
                 "--checkpoint", str(fed.checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert not (out / "certs").exists() and not (out / "supernodes" / "site_0" / "supernode").exists()
    assert tomllib.loads((out / "flwr" / "config.toml").read_text())["superlink"]["fedsynth"]["insecure"]
    assert "--insecure" in printed and "register" not in printed


def test_deploy_refuses_a_bad_port(new_federation, tmp_path, capsys):
    fed = new_federation(sites=1)
    assert main(["deploy", "--config", str(fed.config_path), "--out", str(tmp_path / "d"),
                 "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_deploy_binds_the_given_host_and_prints_the_checkout_and_the_release(new_federation, tmp_path,
                                                                            capsys):
    from pathlib import Path
    fed = new_federation(sites=1)
    out = tmp_path / "deploy"
    assert main(["deploy", "--config", str(fed.config_path), "--out", str(out), "--insecure",
                 "--host", "10.1.2.3", "--release-num", "5", "--checkpoint", str(fed.checkpoint)]) == 0
    printed = capsys.readouterr().out
    repo = Path(__file__).resolve().parents[2]
    superlink = next(line for line in printed.splitlines() if line.startswith("flower-superlink"))
    assert "--host 10.1.2.3" in superlink and "0.0.0.0" not in printed
    assert f"flwr run {repo} fedsynth" in printed and "site-packages" not in printed
    release = next(line for line in printed.splitlines() if 'mode="release"' in line)
    assert "release-num=5" in release and f'release-out="{fed.run_dir.resolve() / "release"}"' in release
    assert "fedsynth release" in printed and f"--deployment {out.resolve()}" in printed
    supernode = next(line for line in printed.splitlines() if line.startswith("flower-supernode"))
    assert "--isolation process --superexec-auth-secret-file" in supernode
    site_exec = next(line for line in printed.splitlines() if line.startswith("fedsynth site-exec"))
    secret = out.resolve() / "supernodes" / "site_0" / "superexec.secret"
    assert f"--approve-fab {app_fab_hash(repo)}" in site_exec and str(secret) in site_exec
    assert "--runtime-api-address 127.0.0.1:9094" in site_exec and "--port 9094" in supernode
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text()) == 64


def test_the_fab_holds_the_app_code_and_configs_only():
    """`flwr run` ships the FAB to the SuperLink and every SuperNode: run folders, ledgers, site
    configs and `fedsynth deploy` output lying in the app folder must stay out of it."""
    import subprocess
    import tomllib
    from pathlib import Path

    from flwr.cli.build import get_filtered_fab_paths

    repo = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split()
    strays = ["deploy/supernodes/site_0/site.yaml", "deploy/flwr/config.toml",
              "work/ledgers/site_0/ledger.jsonl", "work/run/federation/state.json",
              "deploy/commands.md"]
    files = {path: b"" for path in tracked + strays}
    config = tomllib.loads((repo / "pyproject.toml").read_text())
    shipped = set(get_filtered_fab_paths(files, config))
    assert {"client/client_app.py", "server/server_app.py", "privacy/protocol.py",
            "models/checkpoint.py", "configs/demo.yaml", "configs/default.yaml"} <= shipped
    assert not shipped & set(strays)
    assert {path.split("/")[0] for path in shipped} <= {"client", "server", "privacy", "models",
                                                        "configs"}
