"""`fedcifar submit`: the flwr connection it writes and its readiness checks, against real endpoints."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import tomllib

import pytest
from flwr.app import Context, RecordDict

from fedcifar.client_app import NodeSetup
from fedcifar.config import ConfigError
from fedcifar.deploy import control, flwr_cli
from fedcifar.deploy.flwr_cli import write_connection
from fedcifar.deploy.portforward import splice
from fedcifar.deploy.submit import (
    NotReady,
    client_partitions,
    clients_ready,
    control_api,
    follow_logs,
    submit,
    wait_until,
)
from fedcifar.local.federation import free_port
from fedcifar.metrics import serve_multiprocess
from fedcifar.node.process import prepare_multiprocess_dir
from tests.conftest import ROOT


def test_connection_file_is_what_flwr_reads(tmp_path):
    path = write_connection(tmp_path, "fedcifar", "release-fedcifar-superlink:8000")
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "fedcifar"
    assert config["superlink"]["fedcifar"] == {"address": "release-fedcifar-superlink:8000", "insecure": True}


@pytest.fixture
def node_endpoint(tmp_path, monkeypatch):
    """A real node metrics endpoint; a trainer-like process reported partition 1 of 3."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "mp"))
    prepare_multiprocess_dir(tmp_path / "mp")
    writer = (
        "from fedcifar.metrics import client_metrics; m = client_metrics(); "
        "m.info.labels(m.site, '1', '3', 'cpu', 'false').set(1)"
    )
    subprocess.run([sys.executable, "-c", writer], check=True)
    port = free_port()
    server = serve_multiprocess(port, "127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()


def activate() -> None:
    """What the SuperNode process writes once the SuperLink activated it (flower_tuning.report_activation)."""
    writer = "from fedcifar.metrics import client_metrics; m = client_metrics(); m.node.labels(m.site).set(1)"
    subprocess.run([sys.executable, "-c", writer], check=True)


def test_clients_ready_only_once_activated_with_the_expected_partition_count(node_endpoint):
    assert client_partitions(node_endpoint) is None  # running, but not yet in the federation
    assert not clients_ready([node_endpoint], 3)()
    activate()
    assert client_partitions(node_endpoint) == 3
    assert clients_ready([node_endpoint], 3)()
    assert not clients_ready([node_endpoint], 4)()  # e.g. a pod not yet replaced by helm upgrade
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    assert client_partitions(unreachable) is None
    assert not clients_ready([node_endpoint, unreachable], 3)()


def test_wait_until_is_bounded():
    with pytest.raises(NotReady, match="SuperLink x not ready after 0s"):
        wait_until("SuperLink x", lambda: False, timeout=0.2, interval=0.05)
    assert not control.superlink_healthy(f"127.0.0.1:{free_port()}")


def context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_client_refuses_a_run_expecting_another_partition_count():
    setup = NodeSetup.from_context(context({"partition-id": 2, "num-partitions": 3}, {"num-partitions": 3}))
    assert (setup.partition_id, setup.num_partitions) == (2, 3)
    with pytest.raises(ConfigError, match="holds partition 2 of 3, but the run expects 4 partitions"):
        NodeSetup.from_context(context({"partition-id": 2, "num-partitions": 3}, {"num-partitions": 4}))
    with pytest.raises(ConfigError, match="This SuperNode has no partition"):
        NodeSetup.from_context(context({}, {}))


def test_connection_with_tls_is_verified_with_the_ca(tmp_path, monkeypatch):
    """tls.enabled: root-certificates instead of insecure, as flwr 1.42 reads it."""
    from flwr.cli.flower_config import read_superlink_connection

    path = write_connection(tmp_path, "fedcifar", "release-fedcifar-superlink:8000", "/etc/fedcifar/tls/ca.crt")
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["fedcifar"] == {
        "address": "release-fedcifar-superlink:8000",
        "root-certificates": "/etc/fedcifar/tls/ca.crt",
    }
    assert "insecure" not in path.read_text()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection("fedcifar")  # what `flwr run` reads
    assert connection.root_certificates == "/etc/fedcifar/tls/ca.crt" and connection.insecure is False


def test_without_a_pod_selector_the_control_api_is_the_superlink_address():
    with control_api("svc:8000", None, 9093) as address:
        assert address == "svc:8000"


def test_splice_copies_both_ways_and_closes_both_ends():
    """The run Job's port-forward relay: a local connection spliced to a port-forward stream."""
    local, local_peer = socket.socketpair()
    remote, remote_peer = socket.socketpair()
    relay = threading.Thread(target=splice, args=(local_peer, remote_peer))
    relay.start()
    big = bytes(range(256)) * 4096  # 1 MiB: more than one recv, more than the sockets buffer
    threading.Thread(target=local.sendall, args=(big,)).start()
    received = b""
    while len(received) < len(big):
        received += remote.recv(65536)
    assert received == big
    remote.sendall(b"reply")
    assert local.recv(16) == b"reply"
    remote.close()  # the pod side goes away: the relay ends and closes the local side
    relay.join(5)
    assert not relay.is_alive() and local.recv(16) == b""
    local.close()


def test_following_the_run_is_bounded(tmp_path, capsys, monkeypatch):
    hung = tmp_path / "flwr"
    hung.write_text("#!/bin/sh\nsleep 30\n")  # a `flwr log --stream` whose run never ends
    hung.chmod(0o755)
    monkeypatch.setattr(flwr_cli, "flower_binary", lambda name: str(hung))
    started = time.monotonic()
    assert not follow_logs(7, timeout=0.5)
    assert time.monotonic() - started < 20  # well before the hung stream's 30 s: it gave up at 0.5 s
    assert "gave up following run 7 after 0s" in capsys.readouterr().out
    monkeypatch.setattr(flwr_cli, "flower_binary", lambda name: "/bin/true")
    assert follow_logs(7, timeout=5)  # the stream ended: the run's status decides


def test_a_run_config_the_run_cannot_carry_out_is_refused_before_any_wait():
    """The run Job's first act: Bulyan with f=1 needs 7 replies per round, the release has 4 slots."""
    with pytest.raises(ConfigError, match="Bulyan needs at least 4f \\+ 3 = 7 replies"):
        submit(
            app=str(ROOT),
            superlink="127.0.0.1:9",
            client_metrics=[],
            num_partitions=4,
            timeout=1,
            run_config="num-partitions=4 strategy='bulyan' num-malicious-nodes=1",
        )


def test_a_superlink_that_never_answers_ends_the_wait_with_a_sentence():
    """The run Job's wait for /health, through submit() itself (a SuperLink nobody listens for)."""
    with pytest.raises(NotReady, match=r"SuperLink 127\.0\.0\.1:\d+ not ready after 1s"):
        submit(
            app=str(ROOT),
            superlink=f"127.0.0.1:{free_port()}",
            client_metrics=[],
            num_partitions=2,
            timeout=1,
            run_config="num-partitions=2",
        )
