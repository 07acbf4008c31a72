"""fedcifar ClientApp: trains and evaluates the global model on this node's CIFAR-10 partition.

The partition comes from the SuperNode's node config (``partition-id``, ``num-partitions``,
optionally ``data-path``); the hyper-parameters from the run config. Figures of every
message go to Prometheus (``metrics.ClientMetrics``), served by the node's long-lived process.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcifar.config import ConfigError, RunConfig, check_partition
from fedcifar.data import ImageTensors, load_partition, resolve_source
from fedcifar.metrics import client_metrics, record_bytes
from fedcifar.task import Net, evaluate, pick_device, train

log = logging.getLogger("flwr.fedcifar")
app = ClientApp()


@dataclass(frozen=True)
class NodeSetup:
    """What a message needs from the node and run configs."""

    partition_id: int
    num_partitions: int
    config: RunConfig
    data_path: str | None

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
        return cls(partition_id, num_partitions, config, data_path)

    def load(self, split: str) -> ImageTensors:
        c = self.config
        return load_partition(
            resolve_source(self.data_path), split, self.partition_id, self.num_partitions,
            c.partitioner, c.dirichlet_alpha, c.seed,
        )  # fmt: skip

    @property
    def label(self) -> str:
        return str(self.partition_id)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    setup = NodeSetup.from_context(context)
    cfg, metrics, part = setup.config, client_metrics(), setup.label
    data = setup.load("train")
    device = pick_device(cfg.device)
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"]["server-round"])
    result = train(
        net, data,
        epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        lr=float(msg.content["config"].get("lr", cfg.learning_rate)), momentum=cfg.momentum,
        device=device, seed=cfg.seed + setup.partition_id,
        first_epoch=(server_round - 1) * cfg.local_epochs,
    )  # fmt: skip
    arrays = ArrayRecord({k: v.cpu() for k, v in net.state_dict().items()})
    reply = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({
            "train_loss": result.loss,
            "num-examples": len(data),
            "examples-trained": result.examples,
            "train-seconds": result.seconds,
            "partition-id": setup.partition_id,
        }),
    })  # fmt: skip
    metrics.last_round.labels(part).set(server_round)
    metrics.train_loss.labels(part).set(result.loss)
    metrics.examples_trained.labels(part).inc(result.examples)
    metrics.train_duration.labels(part).observe(result.seconds)
    _count_message(setup, "train", msg, arrays)
    log.info(
        "partition %d/%d round %d: %d examples on %s, loss %.4f, %.2fs",
        setup.partition_id, setup.num_partitions, server_round, result.examples, device.type,
        result.loss, result.seconds,
    )  # fmt: skip
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    setup = NodeSetup.from_context(context)
    metrics, part = client_metrics(), setup.label
    data = setup.load("test")
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = evaluate(net, data, pick_device(setup.config.device))
    metrics.eval_loss.labels(part).set(loss)
    metrics.eval_accuracy.labels(part).set(accuracy)
    _count_message(setup, "evaluate", msg, None)
    reply = RecordDict({
        "metrics": MetricRecord({
            "eval_loss": loss, "eval_accuracy": accuracy, "num-examples": len(data),
            "partition-id": setup.partition_id,
        }),
    })  # fmt: skip
    return Message(content=reply, reply_to=msg)


def _count_message(setup: NodeSetup, kind: str, msg: Message, sent: ArrayRecord | None) -> None:
    metrics, part = client_metrics(), setup.label
    metrics.messages.labels(part, kind).inc()
    metrics.received_bytes.labels(part).inc(record_bytes(msg.content["arrays"]))
    if sent is not None:
        metrics.sent_bytes.labels(part).inc(record_bytes(sent))
    # ru_maxrss is in KiB on Linux
    metrics.peak_rss.labels(part).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
