"""Experiment tracking in MLflow (``server/tracking.py``), against a real ``mlflow server`` process
(SQLite backend) started here: a 3-round local federation logs its params, every per-round metric,
the per-slot series, its artifacts and two registered models, the best of which reproduces its
recorded accuracy; a resume continues the same MLflow run with no step twice while the server hangs
(SIGSTOP) and comes back; the tracking settings reach the ServerApp alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from fedcifar.cli import main as cli_main
from fedcifar.data import load_full, resolve_source
from fedcifar.local.federation import LocalFederation, free_port
from fedcifar.metrics import ServerMetrics
from fedcifar.server.history import History, RoundRecord, load_history
from fedcifar.server.stopping import Stop
from fedcifar.server.tracking import RUN_FILE, Settings, Tracker, per_slot_refusal
from fedcifar.task import scale_pixels
from tests.conftest import ROOT
from tests.support import as_foreground_job, free_port_block, scrape, value, wait

EVERY_ROUND = ("eval_loss", "eval_accuracy", "train_loss", "round_seconds", "participating_clients")
EVERY_ROUND += ("examples_trained", "failures", "rejected_updates", "attempts")
MODEL, EXPERIMENT = "fedcifar-test", "tracking-test"


# -- the settings, and who gets them ---------------------------------------------------------------


def test_tracking_is_off_without_a_uri_and_reads_the_operators_settings():
    assert Settings.from_env({}) is None
    got = Settings.from_env(
        {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "FEDCIFAR_MLFLOW_PER_SLOT": "1", "FEDCIFAR_MLFLOW_MODEL": "m"}
    )
    assert (got.uri, got.per_slot, got.model_name, got.experiment) == ("http://mlflow:5000", True, "m", "fedcifar")
    assert Settings("sqlite:////srv/x/mlflow.db").local_artifacts() == "file:///srv/x/mlartifacts"


def test_per_slot_series_are_refused_under_central_dp():
    assert per_slot_refusal(True, "server-fixed") and per_slot_refusal(True, "client-adaptive")
    assert per_slot_refusal(True, "none") is None and per_slot_refusal(True, "local") is None
    assert per_slot_refusal(False, "server-fixed") is None


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--mlflow", "http://127.0.0.1:5000"], "private network namespace"),
        (["--mlflow", "--mlflow-per-slot", "-c", "dp=server-fixed"], "not logged under central DP"),
        (["--mlflow-per-slot"], "need --mlflow"),
    ],
)
def test_fedcifar_run_refuses_tracking_that_could_not_work(argv, says, mini_dir, tmp_path, capsys):
    code = cli_main(["run", "--data", str(mini_dir), "--out", str(tmp_path / "out"), *argv])
    assert code != 0
    assert says in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_tracking_environment_reaches_the_superlink_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-shell")
    fed = LocalFederation(clients=1, app_dir=ROOT, work_dir=tmp_path, server_env={"MLFLOW_TRACKING_URI": "u"})
    assert not [k for k in fed.env() if k.startswith(("MLFLOW_", "FEDCIFAR_MLFLOW_"))]  # every node's environment
    assert fed.server_env == {"MLFLOW_TRACKING_URI": "u"}


# -- a tracking server that hangs never holds a round ---------------------------------------------


def test_a_hanging_tracking_server_costs_a_round_nothing_and_its_losses_are_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    hanging = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    metrics = ServerMetrics(CollectorRegistry())
    tracker = Tracker(Settings(f"http://127.0.0.1:{hanging.getsockname()[1]}", flush_seconds=2), tmp_path, metrics)
    tracker.start(History(run_id=1, config={}, data="x", device="cpu"), {})
    for r in range(1, 4):
        started = time.perf_counter()
        tracker.round(RoundRecord(r, 2.0, 2.0, 0.1, 1.0, 2, [0, 1], 500, 1, 1), [])
        assert time.perf_counter() - started < 0.05
    errors = metrics.tracking_errors
    wait("a failed attempt, counted", lambda: errors.labels("failed")._value.get() >= 1, timeout=60)
    started = time.perf_counter()
    tracker.finish("FINISHED", None)
    assert time.perf_counter() - started < 4  # flush_seconds, then given up
    assert errors.labels("lost")._value.get() >= 1
    hanging.close()


def test_a_run_that_stops_early_says_why_on_its_mlflow_run(tmp_path):
    """Early stopping or the privacy budget: tags fedcifar.stop_reason and fedcifar.stopped (a local store)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(Settings(uri), tmp_path, ServerMetrics(CollectorRegistry()))
    tracker.start(History(run_id=1, config={}, data="x", device="cpu"), {})
    tracker.stopped(Stop("patience", 4, "no round improved the test accuracy ..."))
    tracker.finish("FINISHED", None)
    run = MlflowClient(uri).get_run(json.loads((tmp_path / RUN_FILE).read_text())["run_id"])
    assert run.data.tags["fedcifar.stop_reason"] == "patience"
    assert run.data.tags["fedcifar.stopped"] == "after round 4: no round improved the test accuracy ..."
    assert run.info.status == "FINISHED"


# -- against a real MLflow server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers stop and go on together (SIGSTOP below)
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as the chart runs it: no job runner
    )
    uri = f"http://127.0.0.1:{port}"
    wait("mlflow server", lambda: _healthy(uri), timeout=120)
    yield uri, server
    os.killpg(server.pid, signal.SIGCONT)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _run(out: Path, uri: str, mini_dir: Path, *args: str, metrics_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FEDCIFAR_DATA"}
    env["MLFLOW_TRACKING_USERNAME"] = "canary-user"  # a credential of the shell: the ServerApp's alone
    env["FEDCIFAR_MLFLOW_FLUSH_SECONDS"] = "300"  # the models are logged at the end, on a busy machine
    command = [sys.executable, "-m", "fedcifar", "run", "--data", str(mini_dir), "--shared-network", "--mlflow", uri]
    command += ["--mlflow-experiment", EXPERIMENT, "--mlflow-model", MODEL, "--mlflow-per-slot"]
    command += ["--metrics-port", str(metrics_port), *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=as_foreground_job
    )


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, mini_dir, tmp_path_factory):
    uri, _ = mlflow_server
    out = tmp_path_factory.mktemp("run") / "out"
    ports = free_port_block(3)  # --metrics-port: the server's, then one per client
    run = _run(out, uri, mini_dir, "--clients", "2", "--rounds", "3", "--out", str(out), metrics_port=ports)
    output = run.communicate(timeout=600)[0].decode()
    assert run.returncode == 0, output
    return uri, out


def _errors(port: int) -> float:
    try:
        return value(scrape(port) or {}, "fedcifar_tracking_errors_total", reason="failed")
    except KeyError:
        return 0


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_a_run_logs_its_config_every_round_the_per_slot_series_and_its_outputs(tracked_run):
    uri, out = tracked_run
    client, history = _client(uri), load_history(out)
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (
        params["num-server-rounds"] == "3" and params["strategy"] == "fedavg" and params["data"].startswith("parquet:")
    )
    assert run.data.tags["flwr.version"] and run.data.tags["fedcifar.version"]
    for name in EVERY_ROUND:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3], name
    for slot in (0, 1):
        steps = [m.step for m in client.get_metric_history(run_id, f"slots/local/slot-{slot}/train_loss")]
        assert steps == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"history.json", "history.png"}
    # the run config every SuperNode receives holds nothing of the tracking
    assert "mlflow" not in json.dumps(history["config"]).lower() and uri not in json.dumps(history["config"])


def test_the_best_and_the_last_model_are_registered_and_the_best_reproduces_its_accuracy(tracked_run, mini_dir):
    import mlflow.pytorch

    uri, out = tracked_run
    client, history = _client(uri), load_history(out)
    best, last = client.get_model_version_by_alias(MODEL, "best"), client.get_model_version_by_alias(MODEL, "last")
    assert sorted([best.version, last.version]) == ["1", "2"]
    assert int(best.tags["round"]) == history["best"]["round"] and int(last.tags["round"]) == 3
    on_disk = torch.load(out / "best-model.pt", weights_only=True)
    assert on_disk["round"] == history["best"]["round"]
    assert history["best"]["eval_accuracy"] == max(r["eval_accuracy"] for r in history["rounds"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/{MODEL}/{best.version}")
    test = load_full(resolve_source(str(mini_dir)), "test")
    # an exported program (MLflow's pt2 format, no pickle): plain calls, no train/eval switch
    with torch.no_grad():
        logits = model(scale_pixels(test.images, history["config"]["normalize"]))
    accuracy = (logits.argmax(1) == test.labels).float().mean().item()
    assert accuracy == pytest.approx(float(best.tags["eval_accuracy"]), abs=1e-6)


def test_a_resume_continues_the_same_run_through_a_hanging_server_with_no_step_twice(
    tracked_run, mlflow_server, mini_dir
):
    uri, out = tracked_run
    _, server = mlflow_server
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    port = free_port_block(3)
    os.killpg(server.pid, signal.SIGSTOP)  # hangs: connections open, nothing answers
    try:
        run = _run(out, uri, mini_dir, "--resume", str(out), "--rounds", "5", metrics_port=port)
        wait("rounds 4 and 5", lambda: len((load_history(out) or {}).get("rounds", [])) == 5, timeout=300)
        failed = wait("a counted error", lambda: _errors(port))
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    output = run.communicate(timeout=300)[0].decode()
    assert run.returncode == 0, output
    assert failed >= 1
    rounds = load_history(out)["rounds"]
    # the tracker only enqueues: a request to the hanging server (10 s before it gives up) is nothing a
    # round waits for. A process's first round also starts the nodes' trainers: compared with round 1
    first, warm = rounds[0]["round_seconds"], max(r["round_seconds"] for r in rounds[1:3])
    assert rounds[3]["round_seconds"] < 1 + 2 * first and rounds[4]["round_seconds"] < 1 + 3 * warm
    client = _client(uri)
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == run_id
    assert len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])) == 1
    for name in EVERY_ROUND:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3, 4, 5], name
    assert client.get_run(run_id).info.status == "FINISHED", output
