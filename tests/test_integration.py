"""A real local federation: a SuperLink and 2 SuperNodes as processes, 2 rounds on real images.

While it runs, a scraper reads the server's and both clients' /metrics endpoints; afterwards
``history.json`` must agree with what those scrapes returned, round by round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from fedcifar.server.history import load_history
from fedcifar.server.recorder import PHASES
from fedcifar.task import Net
from tests.conftest import ROOT
from tests.support import free_port_block, processes_in, scrape, value

pytestmark = pytest.mark.integration
CLIENTS, ROUNDS = 2, 2


class Scraper(threading.Thread):
    """Polls every endpoint until stopped; keeps every successful snapshot."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports, self.snapshots = ports, {p: [] for p in ports}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for port in self.ports:
                snap = scrape(port)
                if snap:
                    self.snapshots[port].append(snap)
            self.stop.wait(0.25)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, mini_dir):
    out = tmp_path_factory.mktemp("run")
    base = free_port_block(CLIENTS + 1)
    ports = [base + i for i in range(CLIENTS + 1)]
    scraper = Scraper(ports)
    scraper.start()
    cmd = [
        sys.executable,
        "-m",
        "fedcifar",
        "run",
        "--clients",
        str(CLIENTS),
        "--rounds",
        str(ROUNDS),
        "--data",
        str(mini_dir),
        "--out",
        str(out),
        "--metrics-port",
        str(base),
        "--linger",
        "2",
        "-c",
        "fraction-evaluate=1.0",
    ]
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "FEDCIFAR_DATA"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    scraper.stop.set()
    scraper.join()
    print(done.stdout, done.stderr, f"took {time.monotonic() - started:.1f}s", sep="\n")
    assert done.returncode == 0, done.stderr
    return out, ports, scraper.snapshots, done


def test_history_has_every_round(federation):
    out, *_ = federation
    history = load_history(out)
    assert history["status"] == "completed"
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert r["participating_clients"] == CLIENTS and r["partitions"] == [0, 1]
        assert r["sites"] == ["local", "local"]  # fedcifar run registers its nodes' keys as local/slot-<i>
        assert r["examples_trained"] == 500  # 250 images per partition, 1 local epoch
        assert r["round_seconds"] > 0 and r["failures"] == 0
        assert r["train_loss"] > 0
        assert r["sent_bytes"] > 0 and r["received_bytes"] > 0
    assert history["data"].startswith("parquet:")


def test_outputs_checkpoint_and_plot(federation):
    out, *_ = federation
    checkpoint = torch.load(out / "model.pt")
    assert checkpoint["round"] == ROUNDS
    Net().load_state_dict(checkpoint["model"])
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_metrics_match_history(federation):
    out, ports, snapshots, _ = federation
    rounds = load_history(out)["rounds"]
    server = snapshots[ports[0]]
    final = server[-1]
    assert value(final, "fedcifar_rounds_completed_total") == ROUNDS
    assert value(final, "fedcifar_round") == ROUNDS
    assert value(final, "fedcifar_run_rounds") == ROUNDS
    assert value(final, "fedcifar_participating_clients") == CLIENTS
    assert value(final, "fedcifar_connected_clients") == CLIENTS
    assert value(final, "fedcifar_round_duration_seconds_count") == ROUNDS
    assert value(final, "fedcifar_round_duration_seconds_sum") == pytest.approx(
        sum(r["round_seconds"] for r in rounds), rel=1e-9
    )
    for phase in PHASES:  # where the rounds' time went, as history.json has it
        assert value(final, "fedcifar_round_phase_seconds_count", phase=phase) == ROUNDS
        assert value(final, "fedcifar_round_phase_seconds_sum", phase=phase) == pytest.approx(
            sum(r["phase_seconds"][phase] for r in rounds), rel=1e-9
        )
    assert value(final, "fedcifar_examples_trained_total") == sum(r["examples_trained"] for r in rounds)
    assert value(final, "fedcifar_sent_bytes_total") == sum(r["sent_bytes"] for r in rounds)
    assert value(final, "fedcifar_received_bytes_total") == sum(r["received_bytes"] for r in rounds)
    # each round's figures were visible while that round was the latest one
    for r in rounds:
        during = [s for s in server if s.get(("fedcifar_rounds_completed_total", ())) == r["round"]]
        assert during, f"no scrape caught round {r['round']}"
        for snap in during:
            assert value(snap, "fedcifar_eval_accuracy") == r["eval_accuracy"]
            assert value(snap, "fedcifar_eval_loss") == r["eval_loss"]
            assert value(snap, "fedcifar_train_loss") == r["train_loss"]


def test_the_superlink_exports_each_runs_state_from_flowers_run_list(federation):
    """What outlives the ServerApp (superlink/run_state.py): the run running, then finished as completed."""
    out, ports, snapshots, _ = federation
    history = load_history(out)
    run = str(history["run_id"])
    server = snapshots[ports[0]]
    listed = [snap for snap in server if value(snap, "fedcifar_superlink_run_list_up") == 1]
    states = [
        (labels["status"], labels["sub_status"])
        for snap in listed
        for (name, pairs), up in snap.items()
        if name == "fedcifar_run_info" and (labels := dict(pairs))["run_id"] == run and up == 1
    ]
    assert ("running", "") in states and states[-1] == ("finished", "completed"), sorted(set(states))
    finished_at = value(listed[-1], "fedcifar_run_status_since_timestamp_seconds", run_id=run)
    assert history["rounds"][-1]["finished_at"] <= finished_at <= time.time()
    final = server[-1]  # the ServerApp's own gauges outlive it
    # the ServerApp's own: its last progress, every slot in the last round
    assert value(final, "fedcifar_run_progress_timestamp_seconds") == history["rounds"][-1]["finished_at"]
    for slot in range(CLIENTS):
        assert value(final, "fedcifar_slot_rounds_since_accepted", partition=str(slot), site="local") == 0


def test_client_metrics_match_history(federation):
    out, ports, snapshots, _ = federation
    rounds = load_history(out)["rounds"]
    finals = [snapshots[port][-1] for port in ports[1:]]
    for partition, final in enumerate(finals):
        p = str(partition)
        assert (
            value(
                final,
                "fedcifar_client_info",
                device="cpu",
                gpu_requested="false",
                num_partitions=str(CLIENTS),
                partition=p,
                site="local",
            )
            == 1
        )
        # activated; the SuperNode's Flower id is not published (a Fleet request names its node by it)
        assert [k for k in final if k[0] == "fedcifar_client_node"] == [("fedcifar_client_node", (("site", "local"),))]
        assert value(final, "fedcifar_client_node", site="local") == 1
        assert value(final, "fedcifar_client_examples_trained_total", partition=p, site="local") == 250 * ROUNDS
        assert value(final, "fedcifar_client_messages_total", kind="train", partition=p, site="local") == ROUNDS
        assert value(final, "fedcifar_client_messages_total", kind="evaluate", partition=p, site="local") == ROUNDS
        assert value(final, "fedcifar_client_round", partition=p, site="local") == ROUNDS
        assert value(final, "fedcifar_client_app_peak_rss_bytes", partition=p, site="local") > 50 * 2**20
    # the server's aggregated loss is the example-weighted mean of the clients' last losses
    losses = [value(f, "fedcifar_client_train_loss", partition=str(i), site="local") for i, f in enumerate(finals)]
    assert rounds[-1]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    accuracies = [
        value(f, "fedcifar_client_eval_accuracy", partition=str(i), site="local") for i, f in enumerate(finals)
    ]
    assert rounds[-1]["client_eval_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies), rel=1e-9)
    sent = sum(
        value(f, "fedcifar_client_sent_bytes_total", partition=str(i), site="local") for i, f in enumerate(finals)
    )
    assert sent == sum(r["received_bytes"] for r in rounds)


def test_console_shows_rounds_and_nothing_is_left_running(federation):
    out, ports, _, done = federation
    assert "round 2/2" in done.stderr and "final eval accuracy" in done.stderr
    assert all(scrape(port) is None for port in ports)  # endpoints are gone
    leftovers = processes_in(out)
    assert leftovers == [], f"processes still running in {out}: {leftovers}"
    # each SuperNode left the federation properly: a restarted one could rejoin at once
    assert (out / "logs" / "superlink.log").read_text().count("Deactivated node_id") == CLIENTS
