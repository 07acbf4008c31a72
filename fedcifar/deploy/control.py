"""The SuperLink's Control API and ``/health``, as fedcifar's nodes and registrar use them: is it up,
which nodes does it list, register a public key, end a killed SuperNode's activation."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from fedcifar.deploy.flwr_cli import CONNECTION, flag_value
from fedcifar.deploy.key_formats import load_private_key

NODE_ID_FILE_ENV = "FEDCIFAR_NODE_ID_FILE"  # where a SuperNode notes the node id its activation got
ALREADY_REGISTERED = "Public key already in use"

if TYPE_CHECKING:
    from flwr.supercore.control.control_http_client import ControlHttpClient


def retire_previous_activation(command: list[str], node_id_file: Path) -> int | None:
    """End the activation this SuperNode's previous process left behind, killed before it could end it
    itself (Flower's SuperNode deactivates on the way out): the SuperLink keeps a node online, and
    refuses to activate its key again, until it has missed two heartbeats (a minute). The request is
    signed with the node's own key, as its own shutdown's would be, for the node id its previous
    process noted (``flower.activation.report_activation``); returns that id, or None (nothing noted, no
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


def control_client(address: str, root_certificates: bytes | None) -> ControlHttpClient:
    """Flower's Control API client for the SuperLink at ``address`` (TLS verified with the CA when given)."""
    from flwr.supercore.control.control_http_client import ControlHttpClient

    return ControlHttpClient.from_server_address(address, root_certificates is None, root_certificates, [])


def connection_client(flwr_home: Path, connection: str = CONNECTION) -> ControlHttpClient:
    """The Control API client of ``flwr_home``'s connection ``connection`` (``flwr_cli.write_connection``),
    in this process: Flower's own reader takes ``$FLWR_HOME``, which a thread may not change."""
    entry = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][connection]
    ca = entry.get("root-certificates")
    return control_client(entry["address"], Path(ca).read_bytes() if ca else None)


def register_node_key(control: ControlHttpClient, public_key: bytes, name: str) -> str:
    """Register a public key (as Flower's ``public_key_to_bytes`` writes it) under the node ``name``
    through ``control``, in this process, as ``flwr supernode register`` sends it: "registered", or
    "already registered": under its first name, which Flower keeps and does not say (``registered_names``)."""
    import httpx
    from flwr.proto.control_pb2 import RegisterNodeRequest

    try:
        reply = control.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
    except httpx.HTTPStatusError as err:
        if ALREADY_REGISTERED in err.response.text:
            return "already registered"
        raise RuntimeError(
            f"registering SuperNode key {name} failed: HTTP {err.response.status_code} {err.response.text[-500:]}"
        ) from None
    except (httpx.HTTPError, ValueError) as err:  # unreachable, or a reply that is no protobuf
        raise RuntimeError(f"registering SuperNode key {name} failed: {err!r}") from None
    if not reply.node_id:
        raise RuntimeError(f"registering SuperNode key {name} failed: the SuperLink gave it no node id")
    return "registered"


def register_public_key(openssh: bytes, flwr_home: Path, name: str, connection: str = CONNECTION) -> str:
    """``register_node_key`` for an OpenSSH public key, through ``flwr_home``'s connection (a ``flwr``
    process per key, as before, took a second each: minutes for a few hundred nodes)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    public_key = public_key_to_bytes(serialization.load_ssh_public_key(openssh))
    try:
        control = connection_client(flwr_home, connection)
    except (OSError, KeyError, ValueError) as err:  # the connection file or its CA missing or malformed
        raise RuntimeError(f"registering SuperNode key {name} failed: the connection in {flwr_home}: {err!r}") from None
    try:
        return register_node_key(control, public_key, name)
    finally:
        control.close()


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


LIST_KEYS = (
    "import json; from fedcifar.deploy.control import control_nodes; "
    "from fedcifar.deploy.key_formats import openssh_public_key; "
    "print(json.dumps([[openssh_public_key(n.public_key).decode(), n.name] for n in control_nodes()]))"
)


def registered_names(flwr_home: Path) -> dict[bytes, str]:
    """The node name of each public key (OpenSSH) the SuperLink of ``flwr_home``'s connection holds, those
    unregistered since included (Flower never frees a key); asked in a process of its own, since
    Flower's client reads ``$FLWR_HOME``, which this process may not change under its other threads."""
    done = subprocess.run(
        [sys.executable, "-c", LIST_KEYS],
        env={**os.environ, "FLWR_HOME": str(flwr_home)},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    try:
        return {key.encode(): name for key, name in json.loads(done.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError, TypeError):
        raise RuntimeError(f"listing the SuperLink's nodes failed: {(done.stdout + done.stderr)[-500:]}") from None
