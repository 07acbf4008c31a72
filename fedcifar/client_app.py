"""fedcifar ClientApp: trains and evaluates the global model on this node's CIFAR-10 partition.

The slot comes from the SuperNode's node config (``partition-id`` of ``num-partitions``; optionally
``data-partition-id`` of ``data-num-partitions``, the slice of a site's own data it trains, and
``data-path``), the hyper-parameters from the run config. This module imports no torch: it
turns the message into a ``trainer.Task`` and hands it to the node's long-lived trainer over a
local socket (``$FEDCIFAR_TRAINER``, set by ``fedcifar supernode``), or, on a plain SuperNode,
to a ``Trainer`` in this process. The trainer records every figure (messages, bytes, training):
a ClientApp process (one per message) writes no metrics file of its own, so the node's metrics
folder does not grow with the messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing.connection import Client

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedcifar.config import ConfigError, RunConfig, check_partition
from fedcifar.flower.tuning import tune
from fedcifar.node.protocol import TRAINER_ENV, TRAINER_KEY_ENV, Reply, Task


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The run config's differential privacy on this node's training replies: Flower's clipping mods
    (they read the clipping norm the server's wrapper puts in the message) or its LocalDpMod."""
    dp = context.run_config.get("dp", "none")
    if msg.metadata.message_type != "train" or dp not in ("client-fixed", "client-adaptive", "local"):
        return call_next(msg, context)
    tune("clientapp")  # an update of zeros is clipped to itself (flower/clipping.py)
    if dp == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    config = RunConfig.from_flower(context.run_config)
    # LocalDpMod draws from numpy's global generator, which a ClientApp forked from the node's warm
    # server would inherit, the same in every process: noise that repeats can be subtracted
    np.random.seed()
    local_dp = LocalDpMod(config.clipping_norm, config.sensitivity, config.local_epsilon, config.local_delta)
    return local_dp(msg, context, call_next)


app = ClientApp(mods=[privacy_mod])


class TrainerError(RuntimeError):
    """The trainer refused or failed the task; Flower sends the reason back as an error reply."""


@dataclass(frozen=True)
class NodeSetup:
    """What a message needs from the node and run configs."""

    partition_id: int  # the node's slot in the federation
    num_partitions: int
    config: RunConfig
    data_path: str | None
    data_partition: tuple[int, int] | None  # the slice of the node's own data (split=site)

    @classmethod
    def from_context(cls, context: Context) -> NodeSetup:
        node = context.node_config
        if "partition-id" not in node or "num-partitions" not in node:
            raise ConfigError(
                "This SuperNode has no partition: start it with "
                "--node-config 'partition-id=<i> num-partitions=<n>' (or use `fedcifar supernode`)."
            )
        partition_id, num_partitions = node["partition-id"], node["num-partitions"]
        check_partition(partition_id, num_partitions)
        config = RunConfig.from_flower(context.run_config)
        if config.num_partitions and config.num_partitions != num_partitions:
            # e.g. a pod not yet restarted by `helm upgrade`: its partition belongs to another split
            raise ConfigError(
                f"this SuperNode holds partition {partition_id} of {num_partitions}, but the run "
                f"expects {config.num_partitions} partitions: restart it with --num-partitions "
                f"{config.num_partitions}"
            )
        data_path = str(node["data-path"]) if node.get("data-path") else None
        data_partition = None
        if "data-partition-id" in node:
            data_partition = (node["data-partition-id"], node.get("data-num-partitions"))
            check_partition(*data_partition)
        return cls(partition_id, num_partitions, config, data_path, data_partition)


def run_task(task: Task, timeout: float | None = None) -> Reply:
    """Hand the task to the node's trainer (socket) or, without one, to a trainer in this process;
    wait for the trainer's reply at most ``timeout`` seconds (None: as long as it takes)."""
    address = os.environ.get(TRAINER_ENV)
    if address:
        with Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ[TRAINER_KEY_ENV])) as conn:
            conn.send(task)
            if not conn.poll(timeout):
                raise TrainerError(f"the node's trainer gave no reply within {timeout:.0f}s (the run's round-timeout)")
            reply = conn.recv()
    else:
        from fedcifar.node.trainer import Trainer  # imports torch: only on this cold path

        reply = Trainer().run(task)
    if reply.error:
        raise TrainerError(reply.error)
    return reply


def _handle(kind: str, msg: Message, context: Context) -> Message:
    setup = NodeSetup.from_context(context)
    config = msg.content["config"]
    received = msg.content["arrays"]
    task = Task(
        kind=kind,
        arrays={name: array.numpy() for name, array in received.items()},
        server_round=int(config["server-round"]),
        lr=float(config["lr"]) if "lr" in config else None,
        partition_id=setup.partition_id,
        num_partitions=setup.num_partitions,
        run_config=dict(context.run_config),
        data_path=setup.data_path,
        data_partition=setup.data_partition,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # Flower's FedProx sends it
    )
    reply = run_task(task, timeout=setup.config.round_timeout)  # the round is over by then: its reply is dropped
    content = RecordDict({"metrics": MetricRecord(reply.metrics)})
    if reply.arrays is not None:
        content["arrays"] = ArrayRecord({name: Array(a) for name, a in reply.arrays.items()})
    return Message(content=content, reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)
