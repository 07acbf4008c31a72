"""Long-lived node processes: a Flower SuperLink or SuperNode with a Prometheus endpoint beside it.

``fedcifar superlink`` and ``fedcifar supernode`` start the Flower binary as a child process
and serve ``/metrics`` for as long as it lives, from the multiprocess directory that the
Flower apps it spawns write into (see ``metrics.py``). Options they do not know are passed
to ``flower-superlink`` / ``flower-supernode`` unchanged, so every Flower flag still works.

``fedcifar supernode --partition-id auto`` takes the partition from the Kubernetes
StatefulSet ordinal: the ``apps.kubernetes.io/pod-index`` label (exposed as ``POD_INDEX``
through the downward API) where the cluster sets it, else the hostname's ``-<n>`` suffix.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fedcifar.config import check_partition
from fedcifar.metrics import MULTIPROC_ENV, prepare_multiprocess_dir, serve_multiprocess

POD_INDEX_ENV = "POD_INDEX"
STOP_GRACE_SECONDS = 15


def flower_binary(name: str) -> str:
    """The Flower console script installed beside this interpreter (else from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install fedcifar's dependencies (pip install -e .)")
    return found


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


def node_config(partition_id: int, num_partitions: int, data_path: str | None) -> str:
    """The ``--node-config`` string a SuperNode passes to its ClientApps."""
    check_partition(partition_id, num_partitions)
    pairs = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_path:
        pairs.append(f'data-path="{Path(data_path).expanduser().resolve()}"')
    return " ".join(pairs)


def probe_device() -> str:
    """The device a ClientApp on this node trains on by default ('cuda' or 'cpu').

    Asked in a short-lived subprocess, so that this long-lived process never imports torch.
    """
    code = "from fedcifar.task import pick_device; print(pick_device('auto').type)"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def run_with_metrics(
    command: list[str], metrics_port: int, metrics_host: str, metrics_dir: str | None,
    *collectors: object,
) -> int:
    """Serve metrics, run ``command`` to its end (forwarding SIGTERM/SIGINT), return its code."""
    owned = metrics_dir is None
    directory = Path(metrics_dir or tempfile.mkdtemp(prefix="fedcifar-metrics-"))
    prepare_multiprocess_dir(directory)
    os.environ[MULTIPROC_ENV] = str(directory)  # inherited by Flower and the apps it spawns
    server = serve_multiprocess(metrics_port, metrics_host, *collectors)
    print(f"fedcifar: metrics on http://{metrics_host}:{metrics_port}/metrics", flush=True)
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
        server.shutdown()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
    return code
