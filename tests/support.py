"""Helpers shared by the tests that run real Flower processes: certificates and keys (a CA, a
SuperLink certificate for localhost/127.0.0.1, SuperNode keys), Flower's environment, bounded waits."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedcifar.config import RunConfig
from fedcifar.server.checkpoint import Checkpoint
from fedcifar.server.history import History, RoundRecord
from fedcifar.task import initial_model

BIN = Path(sys.executable).parent
# no telemetry; Flower starts flower-superexec and the app processes by name, from beside this interpreter
FLOWER_ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
}


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive ports on 127.0.0.1 that are free now (what ``--metrics-port``
    takes: one per process), below the kernel's ephemeral range (32768 up on Linux), so that no
    outgoing connection of this busy machine (a cluster's, a test's) takes one before the run binds it."""
    for _ in range(200):
        base = random.randrange(20000, 32768 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports between 20000 and 32767")


def secure_superlink(pki: Path, port: int, metrics_port: int, metrics_dir: Path | None = None) -> list[str]:
    """``fedcifar superlink`` on 127.0.0.1:``port``, TLS from ``pki`` (``write_pki``), SuperNode auth on."""
    metrics = ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    if metrics_dir is not None:
        metrics += ["--metrics-dir", str(metrics_dir)]
    tls = ["--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "tls.crt")]
    return [
        str(BIN / "fedcifar"),
        "superlink",
        *metrics,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *tls,
        "--ssl-keyfile",
        str(pki / "tls.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]


def wait(what: str, probe, timeout: float = 60, interval: float = 0.3):
    """Poll ``probe`` every ``interval`` seconds until it returns something truthy, and return that;
    fail after ``timeout`` seconds. A probe may raise (an AssertionError: what it waits for can no
    longer come) to fail at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def as_foreground_job() -> None:
    """For ``preexec_fn``: Ctrl-C's disposition at a terminal. A job started in the background by a
    non-interactive shell (``cmd &``, as a CI runner may start pytest) ignores SIGINT, and its children
    inherit that; fedcifar rightly keeps it, so a test must not depend on how pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_in(folder: Path) -> list[int]:
    """Every process whose working directory is ``folder`` (all of a federation's processes)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == folder.resolve():
                found.append(int(pid))
        except OSError:
            continue
    return found


# -- metrics endpoints


def scrape(port: int) -> dict[tuple, float] | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot[(name, tuple(sorted(labels.items())))]


# -- checkpoints


def checkpoint_of(round_: int, config: RunConfig) -> Checkpoint:
    history = History(run_id=7, config=config.to_flower(), data="test", device="cpu")
    history.rounds.append(
        RoundRecord(
            round=1,
            train_loss=1.0,
            eval_loss=1.0,
            eval_accuracy=0.3,
            round_seconds=2.0,
            participating_clients=2,
            partitions=[0, 1],
            examples_trained=10,
            sent_bytes=1,
            received_bytes=1,
        )
    )

    return Checkpoint(
        model=initial_model(1).state_dict(),
        round=round_,
        history=asdict(history),
        fingerprint=config.training_fingerprint(),
        rng_state=random.getstate(),
        strategy_state={},
        privacy_state=None,
        best_model=None,
    )
