"""Submitting a run to a SuperLink once the federation is ready (the chart's run Job uses it).

``fedcifar submit`` writes the ``flwr`` connection into ``$FLWR_HOME/config.toml``, waits
(deadline-bounded) until the SuperLink answers ``/health`` and every expected client's metrics
endpoint reports the expected partition count — after ``helm upgrade`` the old pods must be
replaced first, or the run would mix two splits — and then execs ``flwr run``.
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

CONNECTION = "fedcifar"


class NotReady(RuntimeError):
    """The federation did not become ready before the deadline."""


def write_connection(flwr_home: Path, name: str, address: str, insecure: bool = True) -> Path:
    """The ``[superlink.<name>]`` entry of the flwr CLI, as the default connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\ninsecure = {"true" if insecure else "false"}\n'
    )
    return path


def wait_until(what: str, ready: Callable[[], bool], timeout: float, interval: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} not ready after {timeout:.0f}s")
        time.sleep(interval)


def superlink_healthy(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


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
    write_connection(flwr_home, CONNECTION, superlink)
    wait_until(f"SuperLink {superlink}", lambda: superlink_healthy(superlink), timeout)
    print(f"fedcifar: SuperLink {superlink} is healthy", flush=True)
    if client_metrics:
        wait_until("clients", clients_ready(client_metrics, num_partitions or len(client_metrics)), timeout)
        print(f"fedcifar: {len(client_metrics)} clients ready", flush=True)
    command = [str(Path(sys.executable).parent / "flwr"), "run", app, CONNECTION, "--run-config", run_config]
    if stream:
        command.append("--stream")
    print("fedcifar: " + shlex.join(command), flush=True)
    os.execv(command[0], command)
