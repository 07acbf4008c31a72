"""Another user of the machine cannot reach a local federation's Flower APIs (issue 20, row 6).

``fedcifar run`` runs its federation in a private network namespace (``isolation.py``): its SuperLink's
port (Fleet, Control and runtime API alike) is on a loopback of its own; only its metrics endpoints
are in the machine's network. Checked as a second uid, ``nobody`` (CI runs as root: ``setpriv``)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedcifar.server.history import load_history
from tests.conftest import ROOT
from tests.support import as_foreground_job, processes_in, scrape, value, wait

pytestmark = pytest.mark.integration
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
PYTHON = "/usr/bin/python3"  # an interpreter any uid may run (the venv may sit in root's home)
CONNECT = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5); print('connected')"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on in this test's network (the machine's)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)):
                inodes.add(m[1])
        except OSError:
            continue
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as a second uid")
def test_another_user_cannot_reach_the_flower_apis_only_the_metrics(tmp_path, mini_dir):
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "fedcifar", "run", "--clients", "1", "--rounds", "1", "--data", str(mini_dir)]
        + ["--out", str(out), "--linger", "120"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_foreground_job,
    )
    try:
        wait("the run to end, its federation lingering", lambda: completed(out), timeout=180)
        wait("its metrics", lambda: scrape_port(run, out), timeout=30)
        address = re.search(r'address = "127\.0\.0\.1:(\d+)"', (out / "flwr-home" / "config.toml").read_text())
        superlink = int(address[1])
        metrics = metrics_ports(out)

        # the SuperLink listens, in the federation's own network (root may enter it: the control)
        inside = subprocess.run(["nsenter", "-t", str(run.pid), "-n", PYTHON, "-c", CONNECT, str(superlink)])
        assert inside.returncode == 0
        # ... and nobody else reaches it: nothing listens on that port in the machine's network
        outside = subprocess.run([*NOBODY, PYTHON, "-c", CONNECT, str(superlink)], capture_output=True, text=True)
        assert outside.returncode != 0 and "ConnectionRefusedError" in outside.stderr, outside.stderr
        entering = subprocess.run([*NOBODY, "nsenter", "-t", str(run.pid), "-n", "true"], capture_output=True)
        assert entering.returncode != 0  # nor can another user enter the namespace
        # every process of the federation listens on the machine's network only for its metrics
        federation = processes_in(out.resolve())
        assert len(federation) >= 4  # fedcifar run, SuperLink, SuperNode, their Flower processes
        for pid in federation:
            assert listening_ports(pid) <= set(metrics), (pid, listening_ports(pid), metrics)
        # the metrics are the one thing meant for outside: any user may scrape them
        for port in metrics:
            scraped = subprocess.run([*NOBODY, PYTHON, "-c", CONNECT, str(port)], capture_output=True, text=True)
            assert scraped.stdout.strip() == "connected", scraped.stderr
        assert value(scrape(metrics[0]), "fedcifar_rounds_completed_total") == 1
    finally:
        run.send_signal(signal.SIGINT)
        said, _ = run.communicate(timeout=60)
        print(said)
    assert "1 SuperNodes on a private network" in " ".join(said.split())


def completed(out: Path) -> bool:
    history = load_history(out) if (out / "history.json").exists() else None
    return bool(history) and history["status"] == "completed"


def metrics_ports(out: Path) -> list[int]:
    logs = [out / "logs" / "superlink.log", out / "logs" / "supernode-0.log"]
    return [int(re.search(r"fedcifar: metrics on http://127\.0\.0\.1:(\d+)/", log.read_text())[1]) for log in logs]


def scrape_port(run: subprocess.Popen, out: Path) -> bool:
    assert run.poll() is None, run.stdout.read()
    try:
        return scrape(metrics_ports(out)[0]) is not None
    except (FileNotFoundError, TypeError):
        return False


def test_without_a_private_network_the_run_is_refused_saying_what_to_do(tmp_path, mini_dir):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedcifar", "run", "--data", str(mini_dir), "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PATH": str(Path(sys.executable).parent)},  # no util-linux unshare
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, said
    assert "cannot give the local federation a private network (util-linux's unshare is not on PATH)" in said
    assert "pass --shared-network" in said
    assert not (out / "logs").exists()  # nothing was started


def test_the_refusal_names_the_failing_namespace(tmp_path, mini_dir, monkeypatch):
    """A kernel without user namespaces: unshare itself fails, and the run says so (as a user: no fallback)."""
    from fedcifar.local import isolation

    fake = tmp_path / "bin" / "unshare"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(isolation.os, "geteuid", lambda: 1000)
    with pytest.raises(isolation.IsolationError, match="unshare failed: Operation not permitted"):
        isolation.reexecute(["run"])
