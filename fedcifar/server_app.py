"""fedcifar ServerApp: FedAvg over the SuperNodes, server-side evaluation on the test split.

Every round is timed from sending the training messages to the end of the server-side
evaluation; its figures go to Prometheus (``metrics.ServerMetrics``), to ``history.json``
and the checkpoint in the output folder (rewritten after every round), and ``history.png``
is drawn at the end.

Faults a round survives (see ``ResilientFedAvg``): a client that dies or errors (its reply is
missing or an error, counted by partition), a slow client (replies are awaited at most
``round-timeout`` seconds), and a bad update (NaN/Inf, wrong shapes, a partition twice):
refused before aggregation and counted, as is a reply claiming a slot that its key is not bound
to. A round that aggregates nothing is tried again, up to ``round-retries`` times. Failures and
refusals are counted by slot (``partition``) and by site: the site (and slot) a SuperNode's key
was registered under (``grid.get_nodes()``; a node cannot claim them). With ``resume = true`` the
run continues from the checkpoint in ``out-dir`` (``checkpoint.py``), after the last completed
round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcifar.checkpoint import Checkpoint, check_same_training, load_checkpoint
from fedcifar.config import RunConfig
from fedcifar.data import load_full, resolve_source
from fedcifar.flower_tuning import pulls_bounded_by, shorten_object_pull_backoff
from fedcifar.history import PLOT_FILE, History, RoundRecord, plot_history
from fedcifar.metrics import FAILURE_REASONS, REJECT_REASONS, UNKNOWN_SITE, ServerMetrics, record_bytes, server_metrics
from fedcifar.security import site_of_node, slot_of_node
from fedcifar.task import MODEL_KEY, Net, evaluate, flat_weights, initial_model, load_flat_weights, pick_device

log = logging.getLogger("flwr.fedcifar")
REPLY_POLL_SECONDS = 0.05  # Flower's handler prints it in the app's log
NODE_POLL_SECONDS = 1.0
app = ServerApp()


class RoundFailed(RuntimeError):
    """A round could not be completed; the last completed one is checkpointed."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_object_pull_backoff()  # replies are pulled as soon as they are listed (flower_tuning.py)
    config = RunConfig.from_flower(context.run_config)
    out_dir = output_dir(config, context.run_id)
    source = resolve_source()
    device = pick_device(config.device)
    # loaded before any round, so unusable data fails at once; on a GPU, copied there once
    test_data = load_full(source, "test").to(device)
    net = Net()
    checkpoint = load_checkpoint(out_dir, net.state_dict()) if config.resume else None
    if checkpoint:
        check_same_training(checkpoint, config.training_fingerprint(), out_dir)
        history = History.from_dict(checkpoint.history)
        history.resumed(context.run_id, checkpoint.round, config.to_flower())
        checkpoint.restore_rng()
        net.load_state_dict(checkpoint.model)
        log.info("Resuming from %s after round %d", out_dir, checkpoint.round)
    else:
        history = History(
            run_id=context.run_id, config=config.to_flower(), data=source.describe(), device=str(device)
        )
        net = initial_model(config.seed)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> None:
        load_flat_weights(net, arrays[MODEL_KEY].numpy())
        loss, accuracy = evaluate(net, test_data, device)
        strategy.finish_round(server_round, loss, accuracy, net, config)

    strategy = ResilientFedAvg(history, out_dir, server_metrics(), config)
    arrays = ArrayRecord({MODEL_KEY: Array(flat_weights(net))})
    first = checkpoint.round + 1 if checkpoint else 1
    if first == 1:
        evaluate_global(0, arrays)
    run_rounds(strategy, PollingGrid(grid, REPLY_POLL_SECONDS), arrays, first, config, evaluate_global)
    history.status = "completed"
    history.save(out_dir)
    plot_history(asdict(history), out_dir / PLOT_FILE)
    log.info("Run %s completed; outputs in %s", context.run_id, out_dir)


def run_rounds(
    strategy: ResilientFedAvg, grid: PollingGrid, arrays: ArrayRecord, first: int, config: RunConfig,
    evaluate_fn: Callable[[int, ArrayRecord], None],
) -> ArrayRecord:
    """FedAvg's round loop (``Strategy.start``), from round ``first``, retrying rounds that aggregate nothing."""
    train_config = ConfigRecord({"lr": config.learning_rate})
    for server_round in range(first, config.num_server_rounds + 1):
        log.info("[ROUND %d/%d]", server_round, config.num_server_rounds)
        strategy.begin_round(server_round)
        for attempt in range(1, config.round_retries + 2):
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
            replies = grid.send_and_receive(messages, timeout=config.round_timeout, done=strategy.all_partitions_in)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            strategy.record_attempt(server_round, attempt, succeeded=aggregated is not None)
            if aggregated is not None:
                break
        else:
            where = (
                f"round {server_round - 1} is the last checkpointed one: fix the clients, then resume the run "
                "(fedcifar run --resume OUT_DIR, or -c resume=true)" if server_round > 1
                else "no round was completed: fix the clients (or the hyper-parameters), then start again"
            )  # fmt: skip
            raise RoundFailed(
                f"round {server_round} aggregated no client update in {config.round_retries + 1} attempts "
                f"(see the failures and refused updates above); {where}"
            )
        arrays = aggregated
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=config.round_timeout))
        evaluate_fn(server_round, arrays)
    return arrays


class PollingGrid:
    """The run's Grid, but ``send_and_receive`` looks for replies every ``interval`` seconds.

    Flower 1.42's ``send_and_receive`` sleeps 3 s between pulls, so a round waits up to 3 s
    after its last reply; this is the same push-then-pull loop at a shorter interval, which
    also stops early once ``done(replies)`` holds (e.g. every partition has answered), and
    whose pulls end by the deadline too (``flower_tuning.pulls_bounded_by``).
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid, self.interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None,
        done: Callable[[list[Message]], bool] | None = None,
    ) -> list[Message]:  # fmt: skip
        messages = list(messages)
        if not messages:
            return []
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            left = float("inf") if deadline is None else deadline - time.monotonic()
            with pulls_bounded_by(left):  # a reply whose sender died mid-upload must not hold the round
                pulled = list(self._grid.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending and done is not None and done(replies):
                break
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


def reply_partition(message: Message) -> int | None:
    """The ``partition-id`` a reply reports, if it carries one."""
    if message.has_error() or not isinstance(metrics := message.content.get("metrics"), MetricRecord):
        return None
    partition = metrics.get("partition-id")
    return partition if isinstance(partition, int) else None


def update_problem(content: RecordDict, reference: dict[str, tuple[tuple[int, ...], str]], num_partitions: int) -> str | None:
    """Why a training reply must not be averaged (a ``REJECT_REASONS`` key), or None if it is sound."""
    metrics = content.get("metrics")
    examples = metrics.get("num-examples") if isinstance(metrics, MetricRecord) else None
    partition = metrics.get("partition-id") if isinstance(metrics, MetricRecord) else None
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return "bad_metrics"
    if not isinstance(partition, int) or not 0 <= partition < (num_partitions or partition + 1):
        return "bad_metrics"
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord) or set(arrays) != set(reference):
        return "wrong_shape"
    for name, (shape, dtype) in reference.items():
        if tuple(arrays[name].shape) != shape or arrays[name].dtype != dtype:
            return "wrong_shape"
    for name in reference:
        if not np.isfinite(arrays[name].numpy()).all():
            return "non_finite"
    return None


class ResilientFedAvg(FedAvg):
    """FedAvg that survives faulty clients and records each round in metrics, history and a checkpoint.

    Unlike FedAvg it never waits forever for ``min-nodes``, never averages a NaN/Inf or
    misshapen update or one partition twice, and counts every missing, failed or refused
    reply against the partition it came from (learnt from the node's earlier replies).
    """

    def __init__(self, history: History, out_dir: Path, metrics: ServerMetrics, config: RunConfig) -> None:
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
        self.node_wait = config.round_timeout
        self.num_partitions = config.num_partitions
        self.partition_of: dict[int, int] = {}  # node id -> partition, from its replies
        self.site_of: dict[int, str] = {}  # node id -> site, from the name its key was registered under
        self.slot_of: dict[int, int] = {}  # node id -> the slot its key is bound to (name <site>/slot-<k>)
        self._last_reply: dict[int, int] = {}  # node id -> when it last replied (a count of pulls)
        self._failed: set[int] = set()  # nodes whose latest message went unanswered or failed
        self._skipped: set[int] = set()  # superseded nodes, once logged
        self._pulls = 0
        self._outbox: list[Message] = []  # the messages sent last, until their replies are counted
        self._reference: dict[str, tuple[tuple[int, ...], str]] = {}
        self._round: dict[str, object] = {}
        metrics.num_rounds.set(config.num_server_rounds)

    def begin_round(self, server_round: int) -> None:
        self._round = {"started": time.perf_counter(), "sent": 0, "received": 0, "failures": 0, "rejected": 0}
        self.metrics.round.set(server_round)

    def record_attempt(self, server_round: int, attempt: int, succeeded: bool) -> None:
        self._round["attempts"] = attempt
        if not succeeded:
            self.metrics.failed_round_attempts.inc()
            log.warning("round %d, attempt %d: no client update was accepted", server_round, attempt)

    def all_partitions_in(self, replies: list[Message]) -> bool:
        """Whether sound-looking replies from every partition are in (so stale node ids need no wait)."""
        if not self.num_partitions or self.fraction_train < 1:
            return False
        return {self._slot(m) for m in replies} >= set(range(self.num_partitions))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_nodes(grid)
        nodes = list(grid.get_nodes())
        self.site_of.update((node.node_id, site_of_node(node.name)) for node in nodes)
        self.slot_of.update((node.node_id, slot) for node in nodes if (slot := slot_of_node(node.name)) is not None)
        self.metrics.connected_clients.set(len(nodes))
        self._reference = {name: (tuple(a.shape), a.dtype) for name, a in arrays.items()}
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._sending(arrays, self._skip_superseded(messages))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        self._wait_for_nodes(grid)
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._sending(arrays, self._skip_superseded(messages))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = sorted(self._accept_updates(self._received(list(replies))), key=reply_partition)
        contents = [m.content for m in accepted]
        self._round.update(
            partitions=[int(c["metrics"]["partition-id"]) for c in contents],
            sites=[self._site(m.metadata.src_node_id) for m in accepted],
            examples=sum(int(c["metrics"]["examples-trained"]) for c in contents),
            train_seconds=[float(c["metrics"]["train-seconds"]) for c in contents],
        )
        arrays, metrics = super().aggregate_train(server_round, accepted)
        self._round["train_loss"] = float(metrics["train_loss"]) if metrics else float("nan")
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok = [m for m in self._received(list(replies)) if not m.has_error()]
        metrics = super().aggregate_evaluate(server_round, ok)
        if metrics:
            self._round.update(
                client_eval_loss=float(metrics["eval_loss"]),
                client_eval_accuracy=float(metrics["eval_accuracy"]),
            )
        return metrics

    def finish_round(self, server_round: int, loss: float, accuracy: float, net: Net, config: RunConfig) -> None:
        """Called by the server-side evaluation, the last step of a round (round 0: before any)."""
        m = self.metrics
        if server_round == 0:
            m.eval_loss.set(loss)
            m.eval_accuracy.set(accuracy)
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
            rejected_updates=r["rejected"],
            attempts=r.get("attempts", 1),
            client_train_seconds=r.get("train_seconds", []),
            client_eval_loss=r.get("client_eval_loss"),
            client_eval_accuracy=r.get("client_eval_accuracy"),
            sites=r.get("sites", []),
        )
        self.history.rounds.append(record)
        # the checkpoint first: a crash between the two files leaves history.json a round behind, never ahead
        Checkpoint(
            model=net.state_dict(), round=server_round, history=asdict(self.history),
            fingerprint=config.training_fingerprint(), rng_state=random.getstate(),
        ).save(self.out_dir)  # fmt: skip
        self.history.save(self.out_dir)
        # the round's figures together with its count, after the files: a scrape during the saves
        # saw the next round's accuracy beside the previous round's count
        m.eval_loss.set(loss)
        m.eval_accuracy.set(accuracy)
        m.train_loss.set(record.train_loss)
        m.participating_clients.set(record.participating_clients)
        m.examples_trained.inc(record.examples_trained)
        m.round_duration.observe(record.round_seconds)
        m.rounds_completed.inc()
        log.info(
            "round %d: train_loss=%.4f eval_loss=%.4f eval_accuracy=%.4f %.1fs; slots (site): %s",
            server_round, record.train_loss, loss, accuracy, record.round_seconds,
            ", ".join(f"{p} ({site})" for p, site in zip(record.partitions, record.sites)) or "none",
        )  # fmt: skip

    # -- faults ------------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> None:
        """FedAvg's wait for ``min-nodes`` connected SuperNodes, but bounded by ``round-timeout``."""
        deadline = time.monotonic() + self.node_wait
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() >= deadline:
                raise RoundFailed(
                    f"only {connected} of min-nodes={self.min_available_nodes} SuperNodes connected after "
                    f"{self.node_wait:.0f}s: start the missing ones (or lower -c min-nodes), then resume"
                )
            time.sleep(NODE_POLL_SECONDS)

    def _skip_superseded(self, messages: Iterable[Message]) -> list[Message]:
        kept = []
        for m in messages:
            node_id = m.metadata.dst_node_id
            if not self._superseded(node_id):
                kept.append(m)
            elif node_id not in self._skipped:
                self._skipped.add(node_id)
                log.info("node %d no longer gets messages: partition %s (site %s) answers from a newer node",
                         node_id, self._partition_label(node_id), self._site(node_id))  # fmt: skip
        return kept

    def _superseded(self, node_id: int) -> bool:
        """A node that failed, whose partition another node has answered for since (a restarted
        pod or process registers anew): Flower lists the dead id until its heartbeats are missed
        (a minute or more), and every message to it would be one more counted failure."""
        partition = self.partition_of.get(node_id)
        if node_id not in self._failed or partition is None:
            return False
        since = self._last_reply.get(node_id, -1)
        return any(
            p == partition and self._last_reply.get(other, -1) > since
            for other, p in self.partition_of.items() if other != node_id
        )  # fmt: skip

    def _sending(self, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        sent = record_bytes(arrays) * len(messages)
        self._round["sent"] += sent
        self.metrics.sent_bytes.inc(sent)
        self._outbox = messages  # the Grid sets their message ids when it pushes them
        return messages

    def _partition_label(self, node_id: int) -> str:
        return str(self.partition_of.get(node_id, "unknown"))

    def _slot(self, reply: Message) -> int | None:
        """The slot a sound-looking reply answers for: its key's, where the key is bound to one."""
        claimed = reply_partition(reply)
        return None if claimed is None else self.slot_of.get(reply.metadata.src_node_id, claimed)

    def _site(self, node_id: int) -> str:
        return self.site_of.get(node_id, UNKNOWN_SITE)

    def _learn_partition(self, node_id: int, partition: int) -> None:
        known = 0 <= partition < self.num_partitions if self.num_partitions else False
        if known and self.partition_of.get(node_id) != partition:  # zero series, so dashboards show the slot
            for reason in FAILURE_REASONS:
                self.metrics.failures.labels(str(partition), self._site(node_id), reason)
            for reason in REJECT_REASONS:
                self.metrics.rejected_updates.labels(str(partition), self._site(node_id), reason)
        self.partition_of[node_id] = partition

    def _received(self, replies: list[Message]) -> list[Message]:
        """Count bytes, error replies and missing replies (by partition); learn node partitions."""
        self._pulls += 1
        for m in replies:
            if (partition := self._slot(m)) is not None:
                self._learn_partition(m.metadata.src_node_id, partition)
                self._last_reply[m.metadata.src_node_id] = self._pulls
                self._failed.discard(m.metadata.src_node_id)
        # an error the SuperLink made up (e.g. node unavailable) does not come from the node: use the request
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox}
        answered = set()
        for m in replies:
            node_id = sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            answered.add(node_id)
            if m.has_error():
                self._failure(node_id, "error", m.error.reason)
        for node_id in sent_to.values():
            if node_id not in answered:
                self._failure(node_id, "timeout", "no reply before the round's deadline")
        self._outbox = []
        received = sum(
            record_bytes(m.content["arrays"]) for m in replies
            if not m.has_error() and isinstance(m.content.get("arrays"), ArrayRecord)
        )  # fmt: skip
        self._round["received"] += received
        self.metrics.received_bytes.inc(received)
        return replies

    def _failure(self, node_id: int, reason: str, detail: str) -> None:
        partition, site = self._partition_label(node_id), self._site(node_id)
        self._failed.add(node_id)
        self._round["failures"] += 1
        self.metrics.failures.labels(partition, site, reason).inc()
        log.warning("client failure (%s): node %d, partition %s, site %s: %s", reason, node_id, partition, site, detail)

    def _accept_updates(self, replies: list[Message]) -> list[Message]:
        """Sound training replies, at most one per partition; the others are counted and dropped."""
        accepted, partitions = [], set()
        for m in replies:
            if m.has_error():
                continue
            problem = update_problem(m.content, self._reference, self.num_partitions)
            partition = reply_partition(m)
            bound = self.slot_of.get(m.metadata.src_node_id)
            if problem is None and bound is not None and partition != bound:
                problem, partition = "wrong_slot", bound  # another key's slot: the honest node keeps it
            if problem is None and partition in partitions:
                problem = "duplicate_partition"
            if problem:
                node_id = m.metadata.src_node_id
                label = str(partition) if isinstance(partition, int) else self._partition_label(node_id)
                self._round["rejected"] += 1
                self.metrics.rejected_updates.labels(label, self._site(node_id), problem).inc()
                log.warning("update refused (%s): node %d, partition %s, site %s", problem, node_id, label,
                            self._site(node_id))  # fmt: skip
                continue
            partitions.add(partition)
            accepted.append(m)
        return accepted
