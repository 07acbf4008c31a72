"""fedcifar ServerApp: FedAvg over the SuperNodes, server-side evaluation on the test split.

Every round is timed from sending the training messages to the end of the server-side
evaluation; its figures go to Prometheus (``metrics.ServerMetrics``), to ``history.json``
and the checkpoint in the output folder (rewritten after every round), and ``history.png``
is drawn at the end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcifar.config import RunConfig
from fedcifar.data import load_full, resolve_source
from fedcifar.history import CHECKPOINT_FILE, PLOT_FILE, History, RoundRecord, plot_history
from fedcifar.metrics import ServerMetrics, record_bytes, server_metrics
from fedcifar.task import Net, evaluate, initial_model, pick_device

log = logging.getLogger("flwr.fedcifar")
REPLY_POLL_SECONDS = 0.05  # Flower's handler prints it in the app's log
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_flower(context.run_config)
    out_dir = output_dir(config, context.run_id)
    source = resolve_source()
    test_data = load_full(source, "test")  # fail before any round if the data is unusable
    device = pick_device(config.device)
    history = History(
        run_id=context.run_id, config=config.to_flower(), data=source.describe(), device=str(device)
    )
    net = Net()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(net, test_data, device)
        strategy.finish_round(server_round, loss, accuracy, net)
        return MetricRecord({"eval_loss": loss, "eval_accuracy": accuracy})

    strategy = MonitoredFedAvg(history, out_dir, server_metrics(), config)
    strategy.start(
        grid=PollingGrid(grid, REPLY_POLL_SECONDS),
        initial_arrays=ArrayRecord(initial_model(config.seed).state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"lr": config.learning_rate}),
        evaluate_fn=evaluate_global,
    )
    history.status = "completed"
    history.save(out_dir)
    plot_history(asdict(history), out_dir / PLOT_FILE)
    log.info("Run %s completed; outputs in %s", context.run_id, out_dir)


class PollingGrid:
    """The run's Grid, but ``send_and_receive`` looks for replies every ``interval`` seconds.

    Flower 1.42's ``send_and_receive`` sleeps 3 s between pulls, so a round waits up to 3 s
    after its last reply; this is the same push-then-pull loop at a shorter interval.
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid, self.interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self._grid.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending:
                time.sleep(self.interval)
        return replies


def output_dir(config: RunConfig, run_id: int) -> Path:
    """``out-dir`` when set, else ``runs/<run id>`` below the SuperLink's working directory."""
    path = Path(config.out_dir) if config.out_dir else Path("runs") / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def aggregate_client_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted means, without the per-client bookkeeping keys."""
    merged = aggregate_metricrecords(contents, weighted_by_key)
    for key in ("partition-id", "train-seconds", "examples-trained"):
        merged.pop(key, None)
    return merged


class MonitoredFedAvg(FedAvg):
    """FedAvg that measures each round and records it in metrics, history and a checkpoint."""

    def __init__(
        self, history: History, out_dir: Path, metrics: ServerMetrics, config: RunConfig
    ) -> None:
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=max(1, round(config.min_nodes * config.fraction_train)),
            min_evaluate_nodes=max(1, round(config.min_nodes * config.fraction_evaluate)),
            min_available_nodes=config.min_nodes,
            train_metrics_aggr_fn=aggregate_client_metrics,
            evaluate_metrics_aggr_fn=aggregate_client_metrics,
        )
        self.history, self.out_dir, self.metrics = history, out_dir, metrics
        self.metrics.num_rounds.set(config.num_server_rounds)
        self._round: dict[str, object] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = {"started": time.perf_counter(), "sent": 0, "received": 0, "failures": 0}
        self.metrics.round.set(server_round)
        self.metrics.connected_clients.set(len(list(grid.get_node_ids())))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._count_sent(arrays, len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._count_sent(arrays, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = self._count_replies(replies)
        contents = [m.content for m in ok]
        by_partition = sorted(contents, key=lambda c: int(c["metrics"]["partition-id"]))
        self._round.update(
            partitions=[int(c["metrics"]["partition-id"]) for c in by_partition],
            examples=sum(int(c["metrics"]["examples-trained"]) for c in contents),
            train_seconds=[float(c["metrics"]["train-seconds"]) for c in by_partition],
        )
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._round["train_loss"] = float(metrics["train_loss"]) if metrics else float("nan")
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._count_replies(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics:
            self._round.update(
                client_eval_loss=float(metrics["eval_loss"]),
                client_eval_accuracy=float(metrics["eval_accuracy"]),
            )
        return metrics

    def finish_round(self, server_round: int, loss: float, accuracy: float, net: Net) -> None:
        """Called by the server-side evaluation, the last step of a round (round 0: before any)."""
        m = self.metrics
        m.eval_loss.set(loss)
        m.eval_accuracy.set(accuracy)
        if server_round == 0:
            self.history.initial_eval_loss, self.history.initial_eval_accuracy = loss, accuracy
            self.history.save(self.out_dir)
            return
        r = self._round
        record = RoundRecord(
            round=server_round,
            train_loss=r.get("train_loss", float("nan")),
            eval_loss=loss,
            eval_accuracy=accuracy,
            round_seconds=time.perf_counter() - r["started"],
            participating_clients=len(r.get("partitions", [])),
            partitions=r.get("partitions", []),
            examples_trained=r.get("examples", 0),
            sent_bytes=r["sent"],
            received_bytes=r["received"],
            failures=r["failures"],
            client_train_seconds=r.get("train_seconds", []),
            client_eval_loss=r.get("client_eval_loss"),
            client_eval_accuracy=r.get("client_eval_accuracy"),
        )
        m.train_loss.set(record.train_loss)
        m.participating_clients.set(record.participating_clients)
        m.examples_trained.inc(record.examples_trained)
        m.round_duration.observe(record.round_seconds)
        m.rounds_completed.inc()
        save_checkpoint(net, server_round, self.out_dir)
        self.history.rounds.append(record)
        self.history.save(self.out_dir)
        log.info(
            "round %d: train_loss=%.4f eval_loss=%.4f eval_accuracy=%.4f %.1fs",
            server_round, record.train_loss, loss, accuracy, record.round_seconds,
        )  # fmt: skip

    def _count_sent(self, arrays: ArrayRecord, copies: int) -> None:
        sent = record_bytes(arrays) * copies
        self._round["sent"] += sent
        self.metrics.sent_bytes.inc(sent)

    def _count_replies(self, replies: list[Message]) -> list[Message]:
        ok = [m for m in replies if not m.has_error()]
        failed = len(replies) - len(ok)
        received = sum(record_bytes(m.content["arrays"]) for m in ok if "arrays" in m.content)
        self._round["failures"] += failed
        self._round["received"] += received
        self.metrics.failures.inc(failed)
        self.metrics.received_bytes.inc(received)
        return ok


def save_checkpoint(net: Net, server_round: int, out_dir: Path) -> Path:
    """The global model after ``server_round``, replaced atomically."""
    path = out_dir / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": net.state_dict(), "round": server_round, "model_class": "Net"}, tmp)
    os.replace(tmp, path)
    return path
