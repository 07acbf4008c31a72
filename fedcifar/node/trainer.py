"""The node's trainer: what a ClientApp message does, with state that outlives the message.

Flower starts a new ClientApp process for every message, which would re-import torch, re-read
and re-decode the partition and re-initialise CUDA each time. ``fedcifar supernode`` therefore
keeps one ``Trainer`` per node alive in its own process and serves it on a local socket
(``serve``); the ClientApp becomes a thin shim that imports no torch and forwards the message
(``client_app.py``). Without that socket (plain ``flower-supernode``) the ClientApp runs a
``Trainer`` in its own process: same code, same results, just cold.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import threading
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener

import torch

from fedcifar.config import RunConfig
from fedcifar.data import ImageTensors, resident_partition, resolve_source
from fedcifar.metrics import GPU_REQUESTED_ENV, client_metrics, message_bytes
from fedcifar.node.protocol import TRAINER_KEY_ENV, Reply, Task
from fedcifar.strategies import LOSS_BEFORE_TRAINING, STRATEGIES
from fedcifar.task import MODEL_KEY, Net, Recipe, evaluate, flat_weights, load_flat_weights, pick_device, train

log = logging.getLogger("fedcifar.node.trainer")


@dataclass
class Trainer:
    """Runs tasks; keeps decoded partitions on the training device (data.resident_partition)."""

    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, task: Task) -> Reply:
        with self.lock:  # one task at a time per node
            config = RunConfig.from_flower(task.run_config)
            if task.kind == "train":
                reply = self._train(task, config)
            elif task.kind == "evaluate":
                reply = self._evaluate(task, config)
            else:
                raise ValueError(f"unknown task kind {task.kind!r}")
            m, part = client_metrics(), str(task.partition_id)
            m.messages.labels(m.site, part, task.kind).inc()
            m.received_bytes.labels(m.site, part).inc(message_bytes(task.arrays))
            if reply.arrays is not None:
                m.sent_bytes.labels(m.site, part).inc(message_bytes(reply.arrays))
            return reply

    def _data(self, task: Task, config: RunConfig, split: str, device: torch.device) -> ImageTensors:
        partition = task.data_partition or (task.partition_id, task.num_partitions)
        return resident_partition(
            device,
            resolve_source(task.data_path),
            split,
            *partition,
            config.partitioner,
            config.dirichlet_alpha,
            config.seed,
        )

    def _model(self, task: Task) -> Net:
        if set(task.arrays) != {MODEL_KEY}:
            raise ValueError(
                f"the message carries arrays {sorted(task.arrays)}, not one {MODEL_KEY!r} vector: "
                "its ServerApp comes from another version of fedcifar; run the same version on both sides"
            )
        net = Net()
        load_flat_weights(net, task.arrays[MODEL_KEY])
        return net

    def _train(self, task: Task, config: RunConfig) -> Reply:
        device = pick_device(config.device)
        data = self._data(task, config, "train", device)
        net = self._model(task)
        # q-FedAvg weighs each update by the loss of the model it started from on this node's data
        before = (
            evaluate(net, data, device, normalize=config.normalize)[0]
            if STRATEGIES[config.strategy].loss_before_training
            else None
        )
        recipe = Recipe(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            lr=task.lr if task.lr is not None else config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            proximal_mu=task.proximal_mu,
            augmented=config.augment,
            padding=config.augment_padding,
            normalize=config.normalize,
        )
        first_epoch = (task.server_round - 1) * config.local_epochs
        result = train(net, data, recipe, device=device, seed=config.seed + task.partition_id, first_epoch=first_epoch)
        arrays = {MODEL_KEY: flat_weights(net)}
        part, m = str(task.partition_id), client_metrics()
        m.last_round.labels(m.site, part).set(task.server_round)
        m.train_loss.labels(m.site, part).set(result.loss)
        m.examples_trained.labels(m.site, part).inc(result.examples)
        m.train_duration.labels(m.site, part).observe(result.seconds)
        self._record_memory(task)
        log.info(
            "partition %d/%d round %d: %d examples on %s, loss %.4f, %.2fs",
            task.partition_id,
            task.num_partitions,
            task.server_round,
            result.examples,
            device.type,
            result.loss,
            result.seconds,
        )
        metrics = {
            "train_loss": result.loss,
            "num-examples": len(data),
            "examples-trained": result.examples,
            "train-seconds": result.seconds,
            "partition-id": task.partition_id,
        }
        if before is not None:
            metrics[LOSS_BEFORE_TRAINING] = before
        return Reply(metrics, arrays)

    def _evaluate(self, task: Task, config: RunConfig) -> Reply:
        device = pick_device(config.device)
        data = self._data(task, config, "test", device)
        loss, accuracy = evaluate(self._model(task), data, device, normalize=config.normalize)
        part, m = str(task.partition_id), client_metrics()
        m.eval_loss.labels(m.site, part).set(loss)
        m.eval_accuracy.labels(m.site, part).set(accuracy)
        self._record_memory(task)
        metrics = {
            "eval_loss": loss,
            "eval_accuracy": accuracy,
            "num-examples": len(data),
            "partition-id": task.partition_id,
        }
        return Reply(metrics)

    @staticmethod
    def _record_memory(task: Task) -> None:
        # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = client_metrics()
        m.peak_rss.labels(m.site, str(task.partition_id)).set(peak)


def serve(trainer: Trainer, listener: Listener) -> None:
    """Answer tasks on a local socket, one connection per message, until the process is stopped.

    A ClientApp that vanishes mid-task (`flwr stop`, an OOM kill) or a peer without the key costs
    that one connection, never the trainer (and with it the SuperNode)."""
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as err:
            log.warning("refused a connection: %s", err)
            continue
        with conn:
            try:
                task = conn.recv()
                try:
                    reply = trainer.run(task)
                except Exception as err:  # the ClientApp turns it into a Flower error reply
                    log.exception("task failed")
                    reply = Reply({}, error=f"{type(err).__name__}: {err}")
                conn.send(reply)
            except (OSError, EOFError) as err:
                log.warning("the ClientApp went away before its reply: %s", err)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedcifar.node.trainer``: started by ``fedcifar supernode`` (key in $FEDCIFAR_TRAINER_KEY)."""
    parser = argparse.ArgumentParser(description="fedcifar node trainer")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--partition-id", type=int, required=True)
    parser.add_argument("--num-partitions", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listener = Listener(args.socket, family="AF_UNIX", authkey=bytes.fromhex(os.environ[TRAINER_KEY_ENV]))
    device = pick_device("auto").type
    note = " (no CUDA device visible: training falls back to the CPU)" if device == "cpu" else ""
    m = client_metrics()
    asked = "true" if os.environ.get(GPU_REQUESTED_ENV) == "true" else "false"
    m.info.labels(m.site, str(args.partition_id), str(args.num_partitions), device, asked).set(1)
    print(f"fedcifar: trainer for partition {args.partition_id} of {args.num_partitions} on {device}{note}", flush=True)
    serve(Trainer(), listener)


if __name__ == "__main__":
    main()
