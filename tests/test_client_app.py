"""The ClientApp's two paths — the node's warm trainer over its socket, or a trainer in-process —
give the same model and figures, and the shim itself never imports torch."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from multiprocessing import AuthenticationError

import numpy as np
import pytest

from fedcifar.client_app import TrainerError, run_task
from fedcifar.protocol import TRAINER_ENV, TRAINER_KEY_ENV, Task
from fedcifar.task import MODEL_KEY, flat_weights, initial_model


def task(mini_dir, kind: str = "train", **run_config) -> Task:
    arrays = {MODEL_KEY: flat_weights(initial_model(42))}
    return Task(
        kind=kind,
        arrays=arrays,
        server_round=1,
        lr=0.01,
        partition_id=1,
        num_partitions=2,
        run_config={"local-epochs": 1, "batch-size": 32, **run_config},
        data_path=str(mini_dir),
    )


@pytest.fixture
def node_trainer(tmp_path, monkeypatch):
    """A real `python -m fedcifar.trainer` process, as `fedcifar supernode` starts it."""
    socket_path, key = tmp_path / "trainer.sock", secrets.token_hex(16)
    env = {**os.environ, TRAINER_KEY_ENV: key, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcifar.trainer",
            "--socket",
            str(socket_path),
            "--partition-id",
            "1",
            "--num-partitions",
            "2",
        ],
        env=env,
    )
    deadline = time.monotonic() + 120
    while not socket_path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "trainer did not start"
        time.sleep(0.05)
    monkeypatch.setenv(TRAINER_ENV, str(socket_path))
    monkeypatch.setenv(TRAINER_KEY_ENV, key)
    yield proc
    proc.terminate()
    proc.wait(10)


def test_warm_trainer_and_in_process_trainer_agree(mini_dir, node_trainer, monkeypatch):
    warm = run_task(task(mini_dir))
    again = run_task(task(mini_dir))  # the second message finds the partition decoded already
    monkeypatch.delenv(TRAINER_ENV)
    cold = run_task(task(mini_dir))
    assert warm.metrics["num-examples"] == 250 and warm.metrics["partition-id"] == 1
    for reply in (again, cold):
        assert reply.metrics["train_loss"] == pytest.approx(warm.metrics["train_loss"], rel=1e-5)
        for name, array in warm.arrays.items():
            np.testing.assert_allclose(reply.arrays[name], array, rtol=1e-4, atol=1e-6)


def test_trainer_errors_come_back_as_errors(mini_dir, node_trainer):
    with pytest.raises(TrainerError, match="'partitioner' must be one of iid, dirichlet"):
        run_task(task(mini_dir, partitioner="shards"))
    evaluation = run_task(task(mini_dir, kind="evaluate"))  # and the trainer is still serving
    assert evaluation.arrays is None and 0 <= evaluation.metrics["eval_accuracy"] <= 1


def test_the_shim_imports_no_torch():
    code = "import sys, fedcifar.client_app; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_trainer_survives_a_clientapp_that_goes_away(mini_dir, node_trainer):
    """A ClientApp killed mid-task (flwr stop, OOM) or a peer without the key costs one connection."""
    from multiprocessing.connection import Client

    address, key = os.environ[TRAINER_ENV], bytes.fromhex(os.environ[TRAINER_KEY_ENV])
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        conn.send(task(mini_dir, **{"local-epochs": 3}))  # and gone before the reply
    with pytest.raises((AuthenticationError, EOFError, OSError)):
        Client(address, family="AF_UNIX", authkey=b"wrong key").close()
    with pytest.raises(TrainerError, match="gave no reply within 0s"):
        run_task(task(mini_dir, **{"local-epochs": 3}), timeout=0.01)  # the ClientApp's wait is bounded
    reply = run_task(task(mini_dir))
    assert node_trainer.poll() is None and reply.metrics["num-examples"] == 250
