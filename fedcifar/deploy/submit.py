"""Submitting a run to a SuperLink once the federation is ready (the chart's run Job uses it).

``fedcifar submit`` writes the ``flwr`` connection into ``$FLWR_HOME/config.toml``, waits
(deadline-bounded) until the SuperLink answers ``/health`` and every expected client's metrics
endpoint reports the expected partition count — after ``helm upgrade`` the old pods must be
replaced first, or the run would mix two splits — then stops any run still going (one run at
a time per federation), submits the run with ``flwr run``, streams its logs and exits 0 only if
it completed: a Job retry then resumes a failed run from its checkpoint. A server release, whose
SuperNodes run at other sites, waits with ``--min-nodes`` for that many SuperNodes online in
Flower's own node list instead (the Control API's ``ListNodes``).

In the chart the Control API is not on the SuperLink's public port (a proxy refuses it there):
with ``--control-pod-selector`` and ``--control-port`` the ``flwr`` commands reach Flower on the
SuperLink pod's loopback through the Kubernetes API server's port-forward (``portforward.py``), as an
operator's ``kubectl port-forward`` does; ``--superlink`` is then used for ``/health`` only.

With ``$FEDCIFAR_ROOT_CERTIFICATES`` (the chart sets it when ``tls.enabled``) the connection uses
TLS verified with that CA (``root-certificates`` instead of ``insecure = true``) and ``/health`` is
checked over HTTPS. With ``$FEDCIFAR_SUPERNODE_PUBLIC_KEYS`` it registers those SuperNode keys
(``flwr supernode register``, idempotent) before waiting for the clients, so that the new
clients of a ``helm upgrade`` get in at once.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedcifar.config import RunConfig, app_defaults, parse_overrides
from fedcifar.deploy import control, registrar
from fedcifar.deploy.flwr_cli import CONNECTION, flwr, flwr_json, write_connection


class NotReady(RuntimeError):
    """The federation did not become ready before the deadline."""


def wait_until(what: str, ready: Callable[[], bool], timeout: float, interval: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} not ready after {timeout:.0f}s")
        time.sleep(interval)


def client_partitions(url: str) -> int | None:
    """The ``num_partitions`` a client node reports once its SuperNode is activated (None: not yet,
    or not reachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    partitions, activated = None, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedcifar_client_info":
                partitions = int(sample.labels["num_partitions"])
            elif sample.name == "fedcifar_client_node" and sample.value == 1:
                activated = True
    return partitions if activated else None


def clients_ready(urls: list[str], num_partitions: int) -> Callable[[], bool]:
    def ready() -> bool:
        seen = {url: client_partitions(url) for url in urls}
        waiting = [url for url, n in seen.items() if n != num_partitions]
        if waiting:
            print(
                f"fedcifar: waiting for {len(waiting)} client(s) activated with {num_partitions} partitions: "
                + ", ".join(f"{u} ({seen[u]})" for u in waiting),
                flush=True,
            )
        return not waiting

    return ready


ACTIVE = ("pending", "starting", "running")
ONLINE = "online"  # Flower's NodeStatus of an activated SuperNode that keeps its heartbeats


def active_runs() -> list[int]:
    """Runs of this SuperLink that have not finished."""
    runs = flwr_json("ls", CONNECTION).get("runs") or []
    return [int(run["run-id"]) for run in runs if str(run.get("status", "")).split(":")[0] in ACTIVE]


def stop_active_runs(timeout: float = 120) -> None:
    """One run at a time per federation: stop what an earlier Job attempt or revision left going.

    A stopped run keeps its checkpoint; the new run (``resume = true``) continues from it.
    """
    for run_id in active_runs():
        print(f"fedcifar: stopping run {run_id}, still going from an earlier attempt or revision", flush=True)
        flwr("stop", str(run_id), CONNECTION)
    wait_until("earlier runs to stop", lambda: not active_runs(), timeout)


def online_nodes() -> list[str]:
    """The names (``<site>/<key name>``, else ids) of the SuperNodes the SuperLink lists as online."""
    return sorted(node.name or str(node.node_id) for node in control.control_nodes() if node.status == ONLINE)


def nodes_online(count: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            online = online_nodes()
        except Exception as err:  # noqa: BLE001 - Flower's client raises its own and httpx errors; retried
            print(f"fedcifar: listing SuperNodes failed (retrying): {err}", flush=True)
            return False
        if len(online) < count:
            print(
                f"fedcifar: waiting for {count} SuperNodes online, {len(online)} so far: "
                + (", ".join(online) or "none"),
                flush=True,
            )
        return len(online) >= count

    return ready


def run_status(run_id: int) -> str:
    runs = flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs") or []
    return str(runs[0]["status"]) if runs else "unknown (SuperLink unreachable)"


def follow_logs(run_id: int, timeout: float | None) -> bool:
    """Stream the run's logs until it ends or the link drops (True), or give up after ``timeout``
    seconds, the longest the run may take, and say so (False)."""
    try:
        flwr("log", str(run_id), CONNECTION, "--stream", timeout=timeout, capture=False)
    except subprocess.TimeoutExpired:
        print(
            f"fedcifar: gave up following run {run_id} after {timeout:.0f}s (--run-timeout: rounds x round-timeout "
            "x (round-retries + 3)); it may still be going on the SuperLink",
            flush=True,
        )
        return False
    return True


@contextmanager
def control_api(superlink: str, pod_selector: str | None, port: int) -> Iterator[str]:
    """The address ``flwr`` uses for the Control API: ``superlink`` itself, or a local port-forward
    to ``port`` on the loopback of the pod that ``pod_selector`` picks."""
    if not pod_selector:
        yield superlink
        return
    from fedcifar.deploy.portforward import PortForward

    forward = PortForward(pod_selector, port)
    pod = forward.check()
    with forward as address:
        print(f"fedcifar: Control API through a port-forward to {forward.namespace}/{pod}:{forward.port}", flush=True)
        yield address


def submit(
    *,
    app: str,
    superlink: str,
    run_config: str,
    client_metrics: list[str],
    num_partitions: int | None,
    timeout: float,
    stream: bool = True,
    control_pod_selector: str | None = None,
    control_port: int = 9093,
    min_nodes: int = 0,
    run_timeout: float | None = None,
) -> int:
    """Wait for the federation, stop runs still going, start the run and stream its logs.

    Returns 0 only when the run finished as completed, so that a Job whose run failed, or lost
    its SuperLink, is retried; with ``resume = true`` in the run config the retry continues from
    the last checkpointed round.
    """
    # a wrong run config (or a strategy its nodes cannot carry out) fails here, before any wait
    RunConfig.from_flower({**app_defaults(Path(app)), **parse_overrides([run_config])})
    ca = os.environ.get(registrar.ROOT_CERTIFICATES_ENV) or None
    wait_until(f"SuperLink {superlink}", lambda: control.superlink_healthy(superlink, ca), timeout)
    print(f"fedcifar: SuperLink {superlink} is healthy{' (TLS)' if ca else ''}", flush=True)
    with control_api(superlink, control_pod_selector, control_port) as control_address:
        flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        write_connection(flwr_home, CONNECTION, control_address, ca)
        keys = os.environ.get(registrar.PUBLIC_KEYS_ENV)
        if keys:
            registrar.register_missing_public_keys(registrar.own_key_folder(Path(keys)), flwr_home)
        if client_metrics:
            wait_until("clients", clients_ready(client_metrics, num_partitions or len(client_metrics)), timeout)
            print(f"fedcifar: {len(client_metrics)} clients ready", flush=True)
        if min_nodes:  # SuperNodes of other sites, whose metrics this Job cannot reach: ask Flower
            wait_until(f"{min_nodes} SuperNodes", nodes_online(min_nodes), timeout)
            print(f"fedcifar: {min_nodes} SuperNodes online", flush=True)
        stop_active_runs()
        command = ["run", app, CONNECTION, "--run-config", run_config]
        print("fedcifar: " + shlex.join(["flwr", *command]), flush=True)
        reply = flwr_json(*command)
        if not reply.get("success"):
            print(f"fedcifar: flwr run failed: {reply or 'no reply'}", flush=True)
            return 1
        run_id = int(reply["run-id"])
        print(f"fedcifar: submitted run {run_id}", flush=True)
        if not stream:
            return 0
        if not follow_logs(run_id, run_timeout):
            return 1
        status = run_status(run_id)
        print(f"fedcifar: run {run_id} {status}", flush=True)
        return 0 if status == "finished:completed" else 1
