"""Metric names, values, and their survival across Flower's short-lived app processes."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedcifar.local.federation import free_port
from fedcifar.metrics import ClientMetrics, ServerMetrics, SuperLinkMetrics, serve_multiprocess
from fedcifar.node.process import prepare_multiprocess_dir


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, name: str, **labels) -> float:
    for family in fams.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not exposed")


def exposition() -> dict:
    registry = CollectorRegistry()
    server, client = ServerMetrics(registry), ClientMetrics(registry)
    SuperLinkMetrics(registry).fleet_refused.labels("other_node", "site-b").inc()
    server.train_loss.set(1.5)
    server.round_duration.observe(3.0)
    server.round_phase.labels("evaluate").observe(0.3)
    server.rounds_completed.inc()
    server.sent_bytes.inc(100)
    client.train_loss.labels("site-a", "1").set(0.75)
    client.examples_trained.labels("site-a", "1").inc(250)
    client.messages.labels("site-a", "1", "train").inc()
    client.train_duration.labels("site-a", "1").observe(0.5)
    client.info.labels("site-a", "1", "2", "cpu", "false").set(1)
    client.sent_bytes.labels("site-a", "1").inc(10)
    client.received_bytes.labels("site-a", "1").inc(20)
    return families(generate_latest(registry).decode())


def test_names_follow_prometheus_conventions():
    fams = exposition()
    for name, family in fams.items():
        if name.endswith("_created"):  # client_python's creation timestamps, not ours
            continue
        assert name.startswith("fedcifar_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if "duration" in name:
            assert name.endswith("_seconds"), name
        if "bytes" in name:
            assert "_bytes" in name and not name.endswith("_kb"), name
        assert family.documentation, name
    assert fams["fedcifar_round_duration_seconds"].type == "histogram"
    assert fams["fedcifar_client_train_duration_seconds"].type == "histogram"


def test_required_series_are_exposed_with_values():
    fams = exposition()
    assert sample(fams, "fedcifar_train_loss") == 1.5
    assert sample(fams, "fedcifar_rounds_completed_total") == 1
    assert sample(fams, "fedcifar_round_duration_seconds_count") == 1
    assert sample(fams, "fedcifar_round_duration_seconds_sum") == 3.0
    assert sample(fams, "fedcifar_round_duration_seconds_bucket", le="5.0") == 1
    assert sample(fams, "fedcifar_round_phase_seconds_sum", phase="evaluate") == 0.3
    assert sample(fams, "fedcifar_round_phase_seconds_bucket", phase="evaluate", le="0.5") == 1
    assert sample(fams, "fedcifar_sent_bytes_total") == 100
    assert sample(fams, "fedcifar_client_train_loss", site="site-a", partition="1") == 0.75
    assert sample(fams, "fedcifar_client_examples_trained_total", site="site-a", partition="1") == 250
    assert sample(fams, "fedcifar_client_info", site="site-a", partition="1", num_partitions="2", device="cpu") == 1
    for name in (
        "fedcifar_round",
        "fedcifar_eval_loss",
        "fedcifar_eval_accuracy",
        "fedcifar_participating_clients",
        "fedcifar_examples_trained_total",
        "fedcifar_received_bytes_total",
        "fedcifar_client_sent_bytes_total",
        "fedcifar_client_received_bytes_total",
    ):
        sample(fams, name)


WRITER = """
from fedcifar.metrics import client_metrics
import sys
m = client_metrics()
m.info.labels(m.site, "0", "2", "cpu", "false").set(1)
m.train_loss.labels(m.site, "0").set(float(sys.argv[1]))
m.examples_trained.labels(m.site, "0").inc(100)
m.train_duration.labels(m.site, "0").observe(0.2)
"""


def test_values_survive_the_processes_that_wrote_them(tmp_path, monkeypatch):
    """Two ClientApp-like processes come and go; the node's endpoint keeps serving their sum/last value."""
    metrics_dir = tmp_path / "mp"
    prepare_multiprocess_dir(metrics_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "FEDCIFAR_SITE": "hospital-a"}
    for loss in ("2.0", "1.25"):  # sequential, like two training messages
        subprocess.run([sys.executable, "-c", WRITER, loss], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    port = free_port()
    server = serve_multiprocess(port, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    fams = families(text)
    site = {"site": "hospital-a", "partition": "0"}  # the site from the node's $FEDCIFAR_SITE
    assert sample(fams, "fedcifar_client_examples_trained_total", **site) == 200
    assert sample(fams, "fedcifar_client_train_loss", **site) == 1.25  # most recent
    assert sample(fams, "fedcifar_client_train_duration_seconds_count", **site) == 2
    assert sample(fams, "fedcifar_client_info", partition="0", num_partitions="2", device="cpu") == 1


def test_prepare_multiprocess_dir_drops_stale_files(tmp_path):
    stale = tmp_path / "mp" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    prepare_multiprocess_dir(stale.parent)
    assert list(stale.parent.iterdir()) == []
