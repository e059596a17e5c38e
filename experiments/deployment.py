"""What a real deployment needs: TLS certificates, SuperNode keys, the Flower CLI's connection, commands.

Flower 1.41 layout (checked against the installed ``flower-superlink``/``flower-supernode``/``flwr``):

- ``flower-superlink`` serves the Fleet, Control and Runtime APIs on one HTTP(S) port (``--port``,
  default 8000). TLS: ``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``. SuperNode
  authentication: ``--enable-supernode-auth``; only SuperNodes whose public key was registered with
  ``flwr supernode register <key.pub> <connection>`` may connect.
- ``flower-supernode --superlink HOST:PORT`` (``--root-certificates ca.crt`` or ``--insecure``),
  ``--auth-supernode-private-key <OpenSSH EC key>``, ``--port`` for its local Runtime API (default
  9094, one per SuperNode on a machine), ``--node-config 'site-config="/path/site.yaml"'``.
- ``flower-supernode --isolation process`` leaves running the ClientApps to a task runner the site
  starts itself against that Runtime API (``--superexec-auth-secret-file`` on both sides); fedsynth's
  is ``fedsynth site-exec`` (:mod:`client.site_exec`).
- ``flwr run <app dir> <connection>`` reads the connection (address, root certificate) from
  ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``), not from pyproject.toml.

Certificates and keys are made with the ``cryptography`` package (a Flower dependency): an EC P-384
CA, a server certificate signed by it for the given host names / IP addresses, and EC P-384 SuperNode
key pairs in OpenSSH format (what ``flwr supernode register`` and ``--auth-supernode-private-key``
read).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CONNECTION = "fedsynth"
DEFAULT_PORT = 9092
SUPERNODE_FIRST_PORT = 9094
CERT_DAYS = 365


class DeployError(ValueError):
    """A deployment setting that cannot be used. One line with the fix."""


# Files ``fedsynth deploy`` writes into its --out folder (an earlier deploy may be redone there).
DEPLOY_OUTPUTS = ("commands.txt", "certs", "supernodes", "flwr")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name (RFC 1123); else :class:`DeployError`."""
    where = f"--host {host!r}"
    if not host.strip():
        raise DeployError(f"{where}: is empty; pass the SuperLink's host name or IP address")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        raise DeployError(f"{where[:40]}...: a host name has at most 253 characters (got "
                          f"{len(name)}); pass the SuperLink's host name")
    for label in name.split("."):
        if len(label) > 63:
            raise DeployError(f"{where[:40]}...: each dot-separated part of a host name has at "
                              f"most 63 characters (one has {len(label)}); pass the real name")
        if not _HOST_LABEL.match(label):
            raise DeployError(f"{where}: not a host name or IP address (a host name is letters, "
                              f"digits and '-' between dots; no slash, port or scheme); pass "
                              f"e.g. superlink.example.org or 10.0.0.5 and the port as --port")
    return host


@dataclass(frozen=True)
class Certificates:
    ca: Path            # give to every SuperNode and to the flwr CLI (root certificate)
    ca_key: Path        # keep offline: it signs server certificates
    server_cert: Path
    server_key: Path


def _private_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
    return path


def _san(host: str):
    from cryptography import x509
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(folder: Path, hosts: Sequence[str]) -> Certificates:
    """A CA and a server certificate for ``hosts`` (DNS names or IP addresses) in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise DeployError("the server certificate needs at least one host name or IP address; pass --host")
    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=CERT_DAYS))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsynth consortium CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    certificates = Certificates(folder / "ca.crt", folder / "ca.key", folder / "server.pem",
                                folder / "server.key")
    folder.mkdir(parents=True, exist_ok=True)
    certificates.ca.write_bytes(ca.public_bytes(pem))
    _private_write(certificates.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    certificates.server_cert.write_bytes(cert.public_bytes(pem))
    _private_write(certificates.server_key, key.private_bytes(pem, pkcs8, none))
    return certificates


def make_supernode_key(folder: Path, name: str = "supernode") -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: ``(private key, public key)`` files in ``folder``.

    The private key stays at the hospital; the public key is registered at the SuperLink.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = _private_write(Path(folder) / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = Path(folder) / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def write_flower_config(flwr_home: Path, address: str, root_certificates: Path | None,
                        name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with the SuperLink connection ``name`` (and as the default)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(port: int, certificates: Certificates | None, host: str = "0.0.0.0",
                      database: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (or ``--insecure``)."""
    command = ["flower-superlink", "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certificates is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certificates.ca), "--ssl-certfile",
                    str(certificates.server_cert), "--ssl-keyfile", str(certificates.server_key),
                    "--enable-supernode-auth"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(superlink: str, site_config: Path, port: int, ca: Path | None,
                      private_key: Path | None, *, site_exec: bool = False,
                      superexec_secret: Path | None = None) -> list[str]:
    """``flower-supernode`` for one hospital, its site config passed as node config.

    ``site_exec``: ``--isolation process``, the site runs ``fedsynth site-exec`` against the
    Runtime API on 127.0.0.1:``port`` (:func:`site_exec_command`) instead of Flower's SuperExec;
    ``superexec_secret``: the secret file that runner must present (:func:`write_superexec_secret`).
    """
    command = ["flower-supernode", "--superlink", superlink, "--port", str(port),
               "--node-config", f'site-config="{Path(site_config).resolve()}"']
    if site_exec:
        command += ["--isolation", "process"]
        if superexec_secret is not None:
            command += ["--superexec-auth-secret-file", str(superexec_secret)]
    command += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return command


def site_exec_command(port: int, approved_fab: str | None,
                      superexec_secret: Path | None = None) -> list[str]:
    """``fedsynth site-exec`` for the SuperNode whose Runtime API listens on 127.0.0.1:``port``;
    ``approved_fab`` None: any FAB (a local trial)."""
    command = ["fedsynth", "site-exec", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]
    command += ["--approve-fab", approved_fab] if approved_fab else ["--approve-any-fab"]
    if superexec_secret is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret)]
    return command


def write_superexec_secret(folder: Path) -> Path:
    """``folder/superexec.secret`` (0600, 32 random bytes as hex): the SuperNode accepts task
    requests on its Runtime API only from a runner holding it, not from any local process."""
    import secrets

    path = Path(folder) / "superexec.secret"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def app_fab_hash(app_dir: Path) -> str:
    """The SHA-256 of the FAB that ``flwr run APP_DIR`` builds and submits (Flower's own build),
    i.e. the hash a site approves with ``fedsynth site-exec --approve-fab``."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def run_config_argument(config_path: Path, run_dir: Path, checkpoint: Path | None,
                        resume: bool = False, *, mode: str = "federate",
                        release_num: int | None = None, release_out: Path | None = None) -> str:
    """The ``--run-config`` value of ``flwr run`` (absolute paths: the ServerApp runs elsewhere).

    ``mode="release"``: ``checkpoint`` is the model to release from (None: the federation's final
    checkpoint), ``release_num`` / ``release_out`` the release's size and folder.
    """
    pairs = [f'mode="{mode}"', f'config-path="{Path(config_path).resolve()}"',
             f'run-dir="{Path(run_dir).resolve()}"']
    if checkpoint is not None:
        pairs.append(f'checkpoint="{Path(checkpoint).resolve()}"')
    if resume:
        pairs.append("resume=true")
    if release_num is not None:
        pairs.append(f"release-num={int(release_num)}")
    if release_out is not None:
        pairs.append(f'release-out="{Path(release_out).resolve()}"')
    return " ".join(pairs)


def find_app_dir(start: Path | None = None) -> Path:
    """The Flower app folder to pass to ``flwr run``: the first of the folder above :mod:`server`
    (a checkout), ``start`` (default: the working folder) and its parents whose ``pyproject.toml``
    has a ``[tool.flwr.app]`` section. A pip-installed fedsynth (site-packages) is not one."""
    import tomllib

    from server.server_app import APP_DIR

    start = Path(start or Path.cwd()).resolve()
    for folder in [APP_DIR, start, *start.parents]:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                flwr = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {})
            except (tomllib.TOMLDecodeError, OSError):
                continue
            if "app" in flwr:
                return folder
    raise DeployError(f"no Flower app folder (pyproject.toml with [tool.flwr.app]) at or above "
                      f"{start}; run from the fedsynth checkout or pass --app DIR")


def flwr_run_command(app_dir: Path, run_config: str, connection: str = CONNECTION) -> list[str]:
    return ["flwr", "run", str(Path(app_dir).resolve()), connection, "--run-config", run_config, "--stream"]


def shell(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """A command as one copy-pasteable shell line."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(part) for part in command)
