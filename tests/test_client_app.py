"""The ClientApp's two paths — the node's warm trainer over its socket, or a trainer in-process —
give the same model and figures, and the shim itself never imports torch."""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
from multiprocessing import AuthenticationError

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcifar import client_app
from fedcifar.client_app import TrainerError, privacy_mod, run_task
from fedcifar.data import load_partition, resolve_source
from fedcifar.node.protocol import TRAINER_ENV, TRAINER_KEY_ENV, Reply, Task
from fedcifar.node.trainer import Trainer
from fedcifar.strategies import LOSS_BEFORE_TRAINING
from fedcifar.task import MODEL_KEY, evaluate, flat_weights, initial_model, pick_device
from tests.support import wait


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
    """A real `python -m fedcifar.node.trainer` process, as `fedcifar supernode` starts it."""
    socket_path, key = tmp_path / "trainer.sock", secrets.token_hex(16)
    env = {**os.environ, TRAINER_KEY_ENV: key, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcifar.node.trainer",
            "--socket",
            str(socket_path),
            "--partition-id",
            "1",
            "--num-partitions",
            "2",
        ],
        env=env,
    )

    def started() -> bool:
        if socket_path.exists():
            return True
        assert proc.poll() is None, "trainer did not start"  # it exited: the socket will never come
        return False

    wait("the trainer's socket", started, 120, interval=0.05)
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
    partition = load_partition(resolve_source(mini_dir), "test", 1, 2)
    expected = evaluate(initial_model(42), partition, pick_device("auto"))
    assert evaluation.arrays is None
    assert (evaluation.metrics["eval_loss"], evaluation.metrics["eval_accuracy"]) == pytest.approx(expected, rel=1e-5)


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


# -- what the ClientApp adds for some strategies and DP modes ----------------------------------


def train_message(model: np.ndarray, **config) -> Message:
    content = RecordDict({"arrays": ArrayRecord({MODEL_KEY: Array(model)}), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type="train")


def answering(update: np.ndarray):
    """The ClientApp's handler, as the mods see it: a reply whose model moved by ``update``."""

    def call_next(msg: Message, _context: Context) -> Message:
        model = msg.content["arrays"][MODEL_KEY].numpy()
        reply = RecordDict({"arrays": ArrayRecord({MODEL_KEY: Array(model + update)}), "metrics": MetricRecord({})})
        return Message(reply, reply_to=msg)

    return call_next


def context(**run_config) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


@pytest.mark.usefixtures("task_identity")
def test_client_side_clipping_uses_the_norm_the_server_sent():
    model, update = np.zeros(1000, np.float32), np.full(1000, 1.0, np.float32)  # norm 31.6
    clipped = privacy_mod(train_message(model, clipping_norm=2.0), context(dp="client-fixed"), answering(update))
    assert np.linalg.norm(clipped.content["arrays"][MODEL_KEY].numpy() - model) == pytest.approx(2.0, rel=1e-5)
    unclipped = privacy_mod(train_message(model), context(dp="none"), answering(update))
    np.testing.assert_array_equal(unclipped.content["arrays"][MODEL_KEY].numpy(), update)
    # a server that sent no norm gets Flower's error reply, not an unclipped update
    assert privacy_mod(train_message(model), context(dp="client-fixed"), answering(update)).has_error()
    adaptive = privacy_mod(train_message(model, clipping_norm=2.0), context(dp="client-adaptive"), answering(update))
    assert adaptive.content["metrics"]["norm_bit"] == 1  # it clipped: the server's adaptive norm learns from it


@pytest.mark.usefixtures("task_identity")
def test_local_dp_noise_differs_between_clientapps_forked_with_one_generator_state():
    model, update = np.zeros(20_000, np.float32), np.zeros(20_000, np.float32)
    ctx = context(dp="local", **{"clipping-norm": 1.0, "sensitivity": 2.0, "local-epsilon": 0.5})
    replies = []
    for _ in range(2):
        np.random.seed(0)  # what two ClientApps forked from the node's warm server would both start from
        replies.append(privacy_mod(train_message(model), ctx, answering(update)).content["arrays"][MODEL_KEY].numpy())
    assert not np.allclose(replies[0], replies[1])
    expected = 2.0 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 0.5  # the classic Gaussian mechanism's stdev
    assert np.std(replies[0]) == pytest.approx(expected, rel=0.03)


@pytest.mark.usefixtures("task_identity")
def test_evaluate_messages_pass_the_privacy_mod_untouched():
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    reply = Message(RecordDict({"metrics": MetricRecord({"eval_loss": 1.0})}), reply_to=msg)
    assert privacy_mod(msg, context(dp="local"), lambda m, c: reply) is reply


def test_qfedavg_runs_get_the_loss_before_training(mini_dir):
    plain = Trainer().run(task(mini_dir))
    fair = Trainer().run(task(mini_dir, strategy="qfedavg"))
    assert LOSS_BEFORE_TRAINING not in plain.metrics
    net, data = initial_model(42), load_partition(resolve_source(mini_dir), "train", 1, 2)
    expected, _ = evaluate(net, data, pick_device("auto"))
    assert fair.metrics[LOSS_BEFORE_TRAINING] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(fair.arrays[MODEL_KEY], plain.arrays[MODEL_KEY])  # the training is the same


@pytest.mark.usefixtures("task_identity")
def test_fedprox_messages_carry_mu_to_the_trainer(mini_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(client_app, "run_task", lambda task, timeout: seen.append(task) or Reply({}))
    node = {"partition-id": 1, "num-partitions": 2}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    config = ConfigRecord({"server-round": 1, "lr": 0.01, "proximal-mu": 0.25})
    msg = Message(
        RecordDict({"arrays": ArrayRecord({MODEL_KEY: Array(np.zeros(3, np.float32))}), "config": config}),
        dst_node_id=1,
        message_type="train",
    )
    client_app._handle("train", msg, ctx)
    assert seen[0].proximal_mu == 0.25
    without = trained_with_mu(mini_dir, 0.0)
    assert not np.array_equal(trained_with_mu(mini_dir, 1.0), without)  # the trainer applies it


def trained_with_mu(mini_dir, mu: float) -> np.ndarray:
    return Trainer().run(dataclasses.replace(task(mini_dir, strategy="fedprox"), proximal_mu=mu)).arrays[MODEL_KEY]
