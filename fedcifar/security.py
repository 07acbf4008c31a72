"""TLS and SuperNode authentication around Flower's own mechanisms (the chart's secure defaults).

Flower 1.42 serves Fleet, Control and runtime APIs on one HTTPS port (``flower-superlink
--ssl-ca-certfile --ssl-certfile --ssl-keyfile``); clients verify it with ``--root-certificates``
(SuperNodes) or ``root-certificates`` in ``$FLWR_HOME/config.toml`` (the ``flwr`` CLI). With
``--enable-supernode-auth`` a SuperNode must sign its requests with an ECDSA key (NIST curve) whose
public key a ``flwr`` user registered first through the Control API (``flwr supernode register``).
This module adds what Kubernetes needs on top, nothing more:

- keys in the formats a Secret can hold: ``--auth-supernode-private-key`` may name a PEM key
  (``genPrivateKey "ecdsa"`` in Helm); it is converted to the OpenSSH format Flower reads;
  public keys may be OpenSSH lines, PEM public keys or PEM certificates;
- ``register_public_keys``: registers every key of a folder, idempotently (a key already
  registered counts as done), with the ``flwr`` CLI, under the node name ``<site>/<key name>``
  (``<site>/slot-<k>`` for a key bound to node slot k): the ServerApp reads the site and the slot
  from it (``site_of_node``, ``slot_of_node``), so they are what the operator registered, never what
  a SuperNode claims;
- ``KeyRegistrar``: the ``fedcifar superlink`` side: once the SuperLink answers ``/health``,
  register the folders' keys, write a ready file (the pod's readiness probe), and keep
  registering keys that appear later (``helm upgrade --set clients.replicas=N``, or another
  site's keys added to the sites' Secret: no restart, no new run).

Environment (set by the chart): ``FEDCIFAR_ROOT_CERTIFICATES`` (the CA), ``FEDCIFAR_SUPERNODE_PUBLIC_KEYS``
(this release's public keys, registered for the site ``$FEDCIFAR_SITE``), ``FEDCIFAR_SITE_PUBLIC_KEYS``
(other sites' keys, each file named ``<site>.<key name>.pub``), ``FEDCIFAR_READY_FILE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import subprocess
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcifar.config import SITE_NAME
from fedcifar.flwr_cli import CONNECTION, flwr_json, write_connection
from fedcifar.metrics import DEFAULT_SITE, SITE_ENV, UNKNOWN_SITE

ROOT_CERTIFICATES_ENV = "FEDCIFAR_ROOT_CERTIFICATES"
PUBLIC_KEYS_ENV = "FEDCIFAR_SUPERNODE_PUBLIC_KEYS"
SITE_KEYS_ENV = "FEDCIFAR_SITE_PUBLIC_KEYS"
OFFSET_ENV = "FEDCIFAR_PARTITION_OFFSET"  # this release's first node slot
READY_FILE_ENV = "FEDCIFAR_READY_FILE"
NODE_ID_FILE_ENV = "FEDCIFAR_NODE_ID_FILE"  # where a SuperNode notes the node id its activation got
ALREADY_REGISTERED = "Public key already in use"


# ---------------------------------------------------------------------------------------------
# keys


def load_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """An ECDSA private key from OpenSSH or PEM (SEC1 ``EC PRIVATE KEY`` or PKCS#8) bytes."""
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"not an unencrypted OpenSSH or PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"SuperNode keys must be ECDSA (a NIST curve), got {type(key).__name__}")
    return key


def openssh_private_key(source: Path, target: Path) -> Path:
    """``source`` as the OpenSSH private key Flower reads, written to ``target`` (mode 0600)."""
    key = load_private_key(source.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    return target


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """An ECDSA public key from an OpenSSH line, a PEM public key or a PEM certificate."""
    text = data.strip()
    try:
        if text.startswith(b"ecdsa-sha2-"):
            key = serialization.load_ssh_public_key(text)
        elif b"BEGIN CERTIFICATE" in text:
            key = x509.load_pem_x509_certificate(text).public_key()
        else:
            key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as err:
        raise ValueError(f"not an OpenSSH public key, PEM public key or PEM certificate: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"SuperNode keys must be ECDSA (a NIST curve), got {type(key).__name__}")
    return key


def openssh_public_key(data: bytes) -> bytes:
    return load_public_key(data).public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def public_key_files(folder: Path) -> list[Path]:
    """The key files of a folder, sorted; Kubernetes' ``..data`` links and hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def rewrite_private_key_arg(command: list[str], workdir: Path) -> list[str]:
    """``--auth-supernode-private-key PATH`` of a SuperNode command, pointing to an OpenSSH copy."""
    flag = "--auth-supernode-private-key"
    command = list(command)
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            source, at = Path(command[i + 1]), i + 1
        elif arg.startswith(flag + "="):
            source, at = Path(arg.split("=", 1)[1]), i
        else:
            continue
        if b"OPENSSH PRIVATE KEY" in source.read_bytes():
            return command
        target = openssh_private_key(source, workdir / "supernode-auth.key")
        command[at] = str(target) if at == i + 1 else f"{flag}={target}"
        return command
    return command


# ---------------------------------------------------------------------------------------------
# connections


def retire_previous_activation(command: list[str], node_id_file: Path) -> int | None:
    """End the activation this SuperNode's previous process left behind, killed before it could end it
    itself (Flower's SuperNode deactivates on the way out): the SuperLink keeps a node online, and
    refuses to activate its key again, until it has missed two heartbeats (a minute). The request is
    signed with the node's own key, as its own shutdown's would be, for the node id its previous
    process noted (``flower_tuning.report_activation``); returns that id, or None (nothing noted, no
    key, or the SuperLink refused)."""
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key_path, address = flag_value(command, "--auth-supernode-private-key"), flag_value(command, "--superlink")
    try:
        node_id = int(node_id_file.read_text())
    except (OSError, ValueError):
        return None
    if not key_path or not address:
        return None
    key = load_private_key(Path(key_path).read_bytes())
    ca = flag_value(command, "--root-certificates")
    signed = [NodeAuthHttpInterceptor(key, key.public_key())]
    tls = Path(ca).read_bytes() if ca else None
    with FleetHttpClient.from_server_address(address, "--insecure" in command, tls, signed) as fleet:
        try:
            fleet.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except httpx.HTTPError:  # unreachable, or nothing to end: the note stays for the next start
            return None
    node_id_file.unlink()
    return node_id


def health_url(address: str, root_certificates: str | None) -> str:
    return f"{'https' if root_certificates else 'http'}://{address}/health"


def superlink_healthy(address: str, root_certificates: str | None = None) -> bool:
    """``GET /health`` answers 200; over HTTPS verified with ``root_certificates`` when given."""
    context = ssl.create_default_context(cafile=root_certificates) if root_certificates else None
    try:
        with urllib.request.urlopen(health_url(address, root_certificates), timeout=5, context=context) as reply:
            return reply.status == 200
    except OSError:
        return False


def register_public_key(openssh: bytes, flwr_home: Path, name: str, connection: str = CONNECTION) -> str:
    """Register one OpenSSH public key (the only format Flower reads) under the node ``name`` with
    ``flwr supernode register``: "registered" or "already registered" (under its first name)."""
    key_file = flwr_home / "keys" / f"{name.replace('/', '.')}.pub"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(openssh)
    reply = flwr_json("supernode", "register", str(key_file), connection, "--name", name, flwr_home=flwr_home)
    if reply.get("success"):
        return "registered"
    message = str(reply.get("error-message", reply))
    if ALREADY_REGISTERED in message:
        return "already registered"
    raise RuntimeError(f"flwr supernode register {name} failed: {message[-500:]}")


@dataclass(frozen=True)
class KeyFolder:
    """A folder of SuperNode public keys and the site they belong to; ``site=None``: every file is
    named ``<site>.<key name>.pub`` (the sites' Secret on the SuperLink side). With ``offset``, this
    release's ``supernode-<i>.pub`` is registered as ``<site>/slot-<offset + i>``: the key of pod i
    holds that node slot and no other (``slot_of_node``)."""

    path: Path
    site: str | None = None
    offset: int | None = None

    def named_files(self) -> list[tuple[Path, str | None]]:
        """(file, node name ``<site>/<key name>``) pairs; the name is None where the file's name does
        not say its site."""
        named = []
        for path in public_key_files(self.path):
            site, key = (self.site, path.stem) if self.site else path.stem.partition(".")[::2]
            if self.offset is not None and (ordinal := re.fullmatch(r"supernode-(\d+)", key)):
                key = f"slot-{self.offset + int(ordinal.group(1))}"
            sound = SITE_NAME.fullmatch(site) and key and (self.site or path.suffix == ".pub")
            named.append((path, f"{site}/{key}" if sound else None))
        return named


def site_of_node(name: str) -> str:
    """The site of a node registered as ``<site>/<key name>`` (the part before the first ``/``, when
    it is a DNS label); ``unknown`` for other names, and for nodes registered without one."""
    site = name.partition("/")[0]
    return site if SITE_NAME.fullmatch(site) else UNKNOWN_SITE


def slot_of_node(name: str) -> int | None:
    """The node slot a key registered as ``<site>/slot-<k>`` holds; None for other names."""
    bound = re.fullmatch(r"[^/]+/slot-(\d+)", name)
    return int(bound.group(1)) if bound else None


def own_key_folder(path: Path) -> KeyFolder:
    """This release's keys, registered for its site (``$FEDCIFAR_SITE``), each bound to its pod's slot
    (``$FEDCIFAR_PARTITION_OFFSET`` + ordinal)."""
    return KeyFolder(path, os.environ.get(SITE_ENV) or DEFAULT_SITE, int(os.environ.get(OFFSET_ENV) or 0))


def control_nodes(connection: str = CONNECTION) -> list:
    """Every SuperNode the SuperLink knows (Flower's ``NodeInfo``: id, name, status, ...), asked
    through the Control API of the ``$FLWR_HOME`` connection with Flower's own client, as ``flwr
    supernode ls`` does (whose output leaves the names out)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        return list(client.ListNodes(ListNodesRequest()).nodes_info)
    finally:
        client.close()


def register_missing_public_keys(folder: KeyFolder, flwr_home: Path) -> list[str]:
    """``register_public_keys`` unless the SuperLink lists every node name of the folder already (the
    usual case: its own registrar was first), which keeps "already in use" errors out of its log."""
    try:
        listed = {node.name for node in control_nodes()}
    except Exception:  # noqa: BLE001 - unreachable or refused: registering says why
        listed = set()
    names = [name for _, name in folder.named_files()]
    if set(names) <= listed:
        print(f"fedcifar: the SuperLink lists all {len(names)} SuperNode keys of {folder.path}", flush=True)
        return []
    return register_public_keys([folder], flwr_home)


def register_public_keys(
    folders: list[KeyFolder], flwr_home: Path, done: set[str] | None = None, refused: set[str] | None = None
) -> list[str]:
    """Register every key of ``folders`` not in ``done`` (key contents); returns the new file names.
    A file that is no usable key is refused with a line, once (``refused``); a key the SuperLink did
    not take is tried again on the next call: every other key is tried first, then a RuntimeError
    names the ones that failed."""
    done = set() if done is None else done
    refused = set() if refused is None else refused
    new, failed = [], []
    for folder in folders:
        for path, name in folder.named_files():
            data = path.read_bytes()
            seen = f"{path.name}:{hashlib.sha256(data).hexdigest()}"
            if seen in refused:
                continue
            try:
                openssh = openssh_public_key(data)
            except ValueError as err:
                problem = str(err)
            else:
                problem = (
                    None if name else "name it <site>.<key name>.pub, the site a DNS label (hospital-a.slot-0.pub)"
                )
            if problem:
                print(f"fedcifar: SuperNode key {path.name} not registered: {problem}", flush=True)
                refused.add(seen)
                continue
            fingerprint = openssh.decode()
            if fingerprint in done:
                continue
            try:
                outcome = register_public_key(openssh, flwr_home, name)
            except (RuntimeError, subprocess.SubprocessError) as err:
                failed.append(f"{path.name}: {err}")
                continue
            print(f"fedcifar: SuperNode key {path.name} ({name}): {outcome}", flush=True)
            done.add(fingerprint)
            new.append(path.name)
    if failed:
        raise RuntimeError("; ".join(failed))
    return new


class KeyRegistrar(threading.Thread):
    """Registers folders of SuperNode public keys with the local SuperLink, then keeps watching.

    Writes ``ready_file`` once every key present at start is registered (removed first, since a
    restarted container keeps the pod's emptyDir); a key that fails is retried on the next scan.
    """

    def __init__(
        self,
        *,
        port: int,
        root_certificates: str,
        keys: list[KeyFolder],
        flwr_home: Path,
        ready_file: Path | None,
        interval: float = 5.0,
    ) -> None:
        super().__init__(name="supernode-key-registrar", daemon=True)
        self.address = f"127.0.0.1:{port}"
        self.root_certificates, self.keys, self.flwr_home = root_certificates, keys, flwr_home
        self.ready_file, self.interval = ready_file, interval
        self.registered: set[str] = set()
        self.refused: set[str] = set()  # files that hold no usable key, said once
        self.stopped = threading.Event()
        if ready_file:
            ready_file.unlink(missing_ok=True)

    def run(self) -> None:
        write_connection(self.flwr_home, CONNECTION, self.address, self.root_certificates)
        while not self.stopped.is_set() and not superlink_healthy(self.address, self.root_certificates):
            self.stopped.wait(0.5)
        ready = False
        while not self.stopped.is_set():
            try:
                register_public_keys(self.keys, self.flwr_home, self.registered, self.refused)
                if not ready and self.ready_file:
                    self.ready_file.parent.mkdir(parents=True, exist_ok=True)
                    self.ready_file.write_text(f"{len(self.registered)} SuperNode keys registered\n")
                    print(f"fedcifar: {len(self.registered)} SuperNode keys registered; ready", flush=True)
                ready = True
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:  # e.g. a hung flwr
                print(f"fedcifar: registering SuperNode keys failed (retrying): {err}", flush=True)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a command line."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def superlink_registrar(command: list[str], run_dir: Path) -> KeyRegistrar | None:
    """A ``KeyRegistrar`` for a ``flower-superlink`` command with ``--enable-supernode-auth``, when
    ``$FEDCIFAR_SUPERNODE_PUBLIC_KEYS`` or ``$FEDCIFAR_SITE_PUBLIC_KEYS`` name keys to register
    (else None: register by hand)."""
    own, sites = os.environ.get(PUBLIC_KEYS_ENV), os.environ.get(SITE_KEYS_ENV)
    keys = ([own_key_folder(Path(own))] if own else []) + ([KeyFolder(Path(sites))] if sites else [])
    if "--enable-supernode-auth" not in command or not keys:
        return None
    ca = flag_value(command, "--ssl-ca-certfile")
    if not ca:
        raise ValueError("--enable-supernode-auth needs TLS: pass --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile")
    ready = os.environ.get(READY_FILE_ENV)
    return KeyRegistrar(
        port=int(flag_value(command, "--port") or 8000),
        root_certificates=ca,
        keys=keys,
        flwr_home=run_dir / "registrar-flwr",
        ready_file=Path(ready) if ready else None,
    )
