"""Submitting a run to a SuperLink once the federation is ready (the chart's run Job uses it).

``fedcifar submit`` writes the ``flwr`` connection into ``$FLWR_HOME/config.toml``, waits
(deadline-bounded) until the SuperLink answers ``/health`` and every expected client's metrics
endpoint reports the expected partition count — after ``helm upgrade`` the old pods must be
replaced first, or the run would mix two splits — and then execs ``flwr run``.

With ``$FEDCIFAR_ROOT_CERTIFICATES`` (the chart sets it when ``tls.enabled``) the connection uses
TLS verified with that CA (``root-certificates`` instead of ``insecure = true``) and ``/health`` is
checked over HTTPS. With ``$FEDCIFAR_SUPERNODE_PUBLIC_KEYS`` it registers those SuperNode keys
(``flwr supernode register``, idempotent) before waiting for the clients, so that the new
clients of a ``helm upgrade`` get in at once.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedcifar import security

CONNECTION = "fedcifar"


class NotReady(RuntimeError):
    """The federation did not become ready before the deadline."""


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: str | None = None) -> Path:
    """The ``[superlink.<name>]`` entry of the flwr CLI, as the default connection (TLS verified
    with ``root_certificates`` when given, else ``insecure = true``)."""
    return security.write_connection(flwr_home, name, address, root_certificates)


def wait_until(what: str, ready: Callable[[], bool], timeout: float, interval: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} not ready after {timeout:.0f}s")
        time.sleep(interval)


def superlink_healthy(address: str, root_certificates: str | None = None) -> bool:
    return security.superlink_healthy(address, root_certificates)


def client_partitions(url: str) -> int | None:
    """The ``num_partitions`` a client node reports on its metrics endpoint (None: not reachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedcifar_client_info":
                return int(sample.labels["num_partitions"])
    return None


def clients_ready(urls: list[str], num_partitions: int) -> Callable[[], bool]:
    def ready() -> bool:
        seen = {url: client_partitions(url) for url in urls}
        waiting = [url for url, n in seen.items() if n != num_partitions]
        if waiting:
            print(f"fedcifar: waiting for {len(waiting)} client(s) with {num_partitions} partitions: "
                  + ", ".join(f"{u} ({seen[u]})" for u in waiting), flush=True)  # fmt: skip
        return not waiting

    return ready


def submit(
    *, app: str, superlink: str, run_config: str, client_metrics: list[str], num_partitions: int | None,
    timeout: float, stream: bool = True,
) -> None:
    """Wait for the federation, then replace this process with ``flwr run``."""
    flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    ca = os.environ.get(security.ROOT_CERTIFICATES_ENV) or None
    write_connection(flwr_home, CONNECTION, superlink, ca)
    wait_until(f"SuperLink {superlink}", lambda: superlink_healthy(superlink, ca), timeout)
    print(f"fedcifar: SuperLink {superlink} is healthy{' (TLS)' if ca else ''}", flush=True)
    keys = os.environ.get(security.PUBLIC_KEYS_ENV)
    if keys:
        security.register_missing_public_keys(Path(keys), flwr_home)
    if client_metrics:
        wait_until("clients", clients_ready(client_metrics, num_partitions or len(client_metrics)), timeout)
        print(f"fedcifar: {len(client_metrics)} clients ready", flush=True)
    command = [str(Path(sys.executable).parent / "flwr"), "run", app, CONNECTION, "--run-config", run_config]
    if stream:
        command.append("--stream")
    print("fedcifar: " + shlex.join(command), flush=True)
    os.execv(command[0], command)
