"""Long-lived node processes: a Flower SuperLink or SuperNode with a Prometheus endpoint beside it.

``fedcifar superlink`` and ``fedcifar supernode`` start the Flower node as a child process (Flower's
own, with ``flower/``'s changes: the Fleet guard in the SuperLink, shorter polling in the
SuperNode) and serve ``/metrics`` for as long as it lives, from the multiprocess directory that the
Flower apps it spawns write into (see ``metrics.py``). Options they do not know are passed
to ``flower-superlink`` / ``flower-supernode`` unchanged, so every Flower flag still works, but
those that would open a port the Fleet guard does not stand in front of (``check_superlink_args``).

``fedcifar supernode --partition-id auto`` takes the partition from the Kubernetes
StatefulSet ordinal: the ``apps.kubernetes.io/pod-index`` label (exposed as ``POD_INDEX``
through the downward API) where the cluster sets it, else the hostname's ``-<n>`` suffix.

TLS and SuperNode authentication flags go to Flower unchanged, with two adaptations for keys held
in Kubernetes Secrets (see ``deploy/key_formats.py``): a PEM ``--auth-supernode-private-key`` is converted to
the OpenSSH format Flower reads, and a SuperLink with ``--enable-supernode-auth`` registers the
public keys in ``$FEDCIFAR_SUPERNODE_PUBLIC_KEYS`` once it is healthy.

What the node writes: the converted key, the trainer's socket, the key registrar's ``flwr`` home and
the runs' reply layouts go in a folder private to the process (``tempfile.mkdtemp()``: 0700, under
``$TMPDIR``; the chart's ``/tmp`` is an emptyDir), removed at the end. ``--metrics-dir DIR`` holds
prometheus_client's files (``<type>_<pid>.db``, those of dead processes removed at start, nothing
else) and the note of the node id (``NODE_ID_FILE``), which must outlive a killed process; nothing
is written beside DIR, and DIR may be any folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from fedcifar.config import check_partition
from fedcifar.deploy.control import NODE_ID_FILE_ENV, retire_previous_activation
from fedcifar.deploy.key_formats import rewrite_private_key_arg
from fedcifar.deploy.registrar import superlink_registrar
from fedcifar.flower.fleet import INTERNAL_GRPC_PREFIX
from fedcifar.metrics import MULTIPROC_ENV, serve_multiprocess, write_multiprocess_values
from fedcifar.node.protocol import TRAINER_ENV, TRAINER_KEY_ENV
from fedcifar.superlink import fleet_budgets
from fedcifar.superlink.fleet_budgets import GuardSettings
from fedcifar.superlink.run_state import RunStateCollector

POD_INDEX_ENV = "POD_INDEX"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = 0.1  # Flower's default: 1 s per app launch
STOP_GRACE_SECONDS = 15
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
NODE_ID_FILE = "fedcifar-node-id"  # in the metrics folder: kept across restarts of the node's container
# prometheus_client's multiprocess files: <type>_<pid>.db (gauges: gauge_<mode>_<pid>.db)
PROMETHEUS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_[0-9]+\.db")


def resolve_ordinal(value: str) -> int:
    """An explicit integer, or 'auto': the pod-index label, then the hostname's ordinal suffix."""
    if value != "auto":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--partition-id must be an integer or 'auto', got {value!r}") from None
    pod_index = os.environ.get(POD_INDEX_ENV, "").strip()
    if pod_index:
        return int(pod_index)
    hostname = os.environ.get("HOSTNAME") or socket.gethostname()
    match = re.search(r"-(\d+)$", hostname)
    if not match:
        raise ValueError(
            f"--partition-id auto needs ${POD_INDEX_ENV} or a StatefulSet hostname ending in "
            f"-<ordinal>, got hostname {hostname!r}: pass --partition-id N instead."
        )
    return int(match.group(1))


def node_config(
    partition_id: int, num_partitions: int, data_path: str | None, data_partition: tuple[int, int] | None = None
) -> str:
    """The ``--node-config`` string a SuperNode passes to its ClientApps.

    ``partition-id`` of ``num-partitions`` is the node's slot in the federation (unique across
    sites: the server accounts by it); ``data_partition`` (id, count), when given, is the slice of
    this node's own data it trains instead of the slot's slice (``--split site``).
    """
    check_partition(partition_id, num_partitions)
    pairs = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_partition:
        check_partition(*data_partition)
        pairs += [f"data-partition-id={data_partition[0]}", f"data-num-partitions={data_partition[1]}"]
    if data_path:
        pairs.append(f'data-path="{Path(data_path).expanduser().resolve()}"')
    return " ".join(pairs)


def check_superlink_args(args: list[str], env: Mapping[str, str], behind_proxy: bool) -> None:
    """Refuse, with a sentence, Flower options and variables that would open a port beside the one the
    Fleet guard (and, ``behind_proxy``, the proxy) stands in front of. The options are read with
    Flower's own parser, as Flower will read them (the last one wins, abbreviations count)."""
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    parser = _parse_args_run_superlink()
    absent = object()  # Flower gives --control-api-address a default: whether it was given at all
    parser.set_defaults(fleet_api_address=absent, control_api_address=absent)
    flower, _ = parser.parse_known_args(args)
    for option in ("fleet_api_address", "control_api_address"):
        if getattr(flower, option) is not absent:
            raise ValueError(
                f"fedcifar superlink refuses --{option.replace('_', '-')}: it serves Flower's legacy gRPC API, which "
                "the Fleet guard does not stand in front of; Flower 1.42 serves every API on --host/--port"
            )
    if opened := sorted(name for name in env if name.startswith(INTERNAL_GRPC_PREFIX)):
        raise ValueError(
            f"fedcifar superlink refuses {', '.join(opened)}: it would open Flower's legacy gRPC API beside the "
            "guarded one; unset it"
        )
    if behind_proxy and flower.host not in LOOPBACK:
        raise ValueError(
            f"fedcifar superlink --behind-proxy refuses --host {flower.host}: Flower serves its Control and runtime "
            "APIs on that port too, so it listens on the loopback (127.0.0.1) and the proxy is the public face"
        )


def run_node(
    command: list[str],
    metrics_port: int,
    metrics_host: str,
    metrics_dir: str | None,
    trainer: list[str] | None = None,
    guard: GuardSettings | None = None,
    metrics_fd: int | None = None,
) -> int:
    """Serve metrics (on ``metrics_fd``, an inherited listening socket, when given) and run ``command`` to
    its end (forwarding SIGTERM/SIGINT); return its code.

    With ``trainer`` (a SuperNode), that long-lived trainer process is started first, and the
    Flower node, whose ClientApps reach it over ``$FEDCIFAR_TRAINER``, only once it listens. With
    ``guard`` (a SuperLink), its settings and a private folder for the runs' reply layouts reach the
    SuperLink's process and, through it, the ServerApps (``fleet_guard.py``).
    """
    # the converted key, the trainer's socket, the registrar's flwr home, the reply layouts: a folder of
    # this process (0700) that nobody else can create first or read, removed at the end; never beside
    # the metrics folder, which may be anyone's (--metrics-dir ~, --metrics-dir /tmp/m)
    private = Path(tempfile.mkdtemp(prefix="fedcifar-node-"))
    try:
        return _run_node(private, command, metrics_port, metrics_host, metrics_dir, trainer, guard, metrics_fd)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_node(
    private: Path,
    command: list[str],
    metrics_port: int,
    metrics_host: str,
    metrics_dir: str | None,
    trainer: list[str] | None,
    guard: GuardSettings | None,
    metrics_fd: int | None,
) -> int:
    directory = private / "metrics" if metrics_dir is None else Path(metrics_dir)
    prepare_multiprocess_dir(directory)
    os.environ[MULTIPROC_ENV] = str(directory)  # inherited by Flower and the apps it spawns
    write_multiprocess_values()  # and this process's own metrics (the key registrar's)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_SECONDS))
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = rewrite_private_key_arg(command, private)  # a PEM SuperNode key -> OpenSSH
    if guard:
        layouts = private / "fleet-layouts"
        layouts.mkdir(mode=0o700)
        guard = replace(guard, layouts=str(layouts))
        os.environ.update({fleet_budgets.SETTINGS_ENV: guard.to_env(), fleet_budgets.LAYOUTS_ENV: str(layouts)})
    registrar = superlink_registrar(command, private)
    run_state = (RunStateCollector.of(command),) if guard else ()  # a SuperLink: its runs' states
    server = serve_multiprocess(metrics_port, metrics_host, metrics_fd, run_state)
    host, port = server.socket.getsockname()[:2]
    print(f"fedcifar: metrics on http://{host}:{port}/metrics", flush=True)
    children: list[subprocess.Popen] = []
    signalled: set[int] = set()  # pids already asked to stop

    def stop(signum: int, _frame: object) -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signum)
                signalled.add(child.pid)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        if trainer:
            noted = directory / NODE_ID_FILE  # kept across restarts of the node's container
            os.environ[NODE_ID_FILE_ENV] = str(noted)
            if (retired := retire_previous_activation(command, noted)) is not None:
                print(f"fedcifar: ended node {retired}'s activation, which this node's killed process left", flush=True)
            socket_path = private / "trainer.sock"
            os.environ[TRAINER_ENV] = str(socket_path)
            os.environ[TRAINER_KEY_ENV] = secrets.token_hex(16)
            children.append(subprocess.Popen([*trainer, "--socket", str(socket_path)]))
            wait_for_socket(socket_path, children[-1])
        children.append(subprocess.Popen(command))
        if registrar:
            registrar.start()
        return wait_first(children)
    finally:
        if registrar:
            registrar.stop()
        for child in reversed(children):
            if child.poll() is None:
                # once only: a second SIGTERM cuts Flower's graceful exit short, and with it the
                # SuperNode's deactivation (a restarted pod could not rejoin until it expired)
                if child.pid not in signalled:
                    child.terminate()
                try:
                    child.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    child.kill()
        server.shutdown()


def wait_for_socket(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the trainer exited with code {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the trainer did not listen on {path} within {timeout:.0f}s")
        time.sleep(0.05)


def wait_first(children: list[subprocess.Popen]) -> int:
    """Wait until one child exits (the node is down then) and return its exit code."""
    while True:
        for child in children:
            if child.poll() is not None:
                return child.returncode
        time.sleep(0.2)


def prepare_multiprocess_dir(path: Path) -> None:
    """The metrics folder, created if missing, without the files prometheus_client's multiprocess mode
    left there (``PROMETHEUS_FILE``: a previous node's dead processes, which would linger in the sums);
    every other file stays: the folder may be anyone's (``--metrics-dir``)."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if PROMETHEUS_FILE.fullmatch(entry.name) and not entry.is_dir():
            entry.unlink()
