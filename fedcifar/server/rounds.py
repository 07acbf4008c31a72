"""The resilient round loop: Flower's strategy decides whom to ask and how to aggregate; this loop
bounds every wait, checks every reply before the strategy sees it, and records each round.

One round: wait (at most ``round-timeout``) for ``min-nodes`` SuperNodes; send the training
messages the strategy configures, skipping dead nodes whose slot a newer node answers for;
collect replies until the deadline or until every slot has answered; count each error or
missing reply as a failure (``ledger.py``) and refuse each reply that fails a check
(``replies.py``) or answers a slot twice; aggregate the rest with the strategy. A training attempt
that finds too few nodes or aggregates nothing is tried again, up to ``round-retries`` times. Then
the strategy's evaluate messages, if any (a failure there costs the round nothing).

The aggregate's evaluation on the server's test split runs beside the next round: the next round's
messages carry the aggregate while it is evaluated (a round's fixed overhead was the evaluation
plus the messages' travel; now the larger of the two). Once the next round's replies are in, the
evaluation settles the round before them. A finite test loss completed it as soon as the
evaluation ended (the record, ``recorder.py``: checkpoint, history, metrics, written by the
evaluator's thread); early stopping then asks whether to go on (the next round's replies are
dropped if not). An aggregate without one never becomes the global model: the next round's
replies, trained from it, are dropped and its round tried again, as an attempt of its own. With
federated evaluation the server's evaluation comes first (the nodes evaluate only a global model)
and the next round begins once it is settled.

Nothing one reply holds, and no exception while handling one, ends the run: it is one refused reply.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from fedcifar.config import RunConfig
from fedcifar.metrics import ServerMetrics, record_bytes
from fedcifar.server.ledger import NodeLedger
from fedcifar.server.polling import PollingGrid
from fedcifar.server.privacy import PrivacyAccount, check_clipped, clipping_norm, private_replies
from fedcifar.server.recorder import Accepted, Recorder, RoundTally
from fedcifar.server.replies import (
    EvaluateReply,
    Expected,
    Refused,
    TrainReply,
    check_evaluate_reply,
    check_train_reply,
    claimed_slot,
)
from fedcifar.server.stopping import BudgetReached, StopRun, early_stop
from fedcifar.server.strategies import restore_strategy_state, strategy_state

log = logging.getLogger("flwr.fedcifar")
NODE_POLL_SECONDS = 1.0
CHECKS = {"train": check_train_reply, "evaluate": check_evaluate_reply}


@dataclass(frozen=True)
class NodeList:
    """What a strategy's ``configure_*`` reads from the Grid: the nodes connected when the round began."""

    node_ids: list[int]

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class RoundFailed(RuntimeError):
    """A round could not be completed; the last completed one is checkpointed."""


class TooFewNodes(RuntimeError):
    """Fewer than ``min-nodes`` SuperNodes connected within ``round-timeout``: the attempt fails."""


class GlobalModel(Protocol):
    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]: ...  # loss, accuracy on the test split

    def state_dict(self) -> dict: ...  # what the checkpoint keeps


@dataclass
class Pending:
    """A round aggregated, its aggregate being evaluated on the server's test split while the next
    round's messages travel."""

    server_round: int
    attempt: int
    tally: RoundTally
    base: ArrayRecord  # the global model the round trained from: a retry starts from it again
    aggregated: ArrayRecord
    strategy_before: dict  # the strategy's state before the attempt, restored if the aggregate is unusable
    saved: tuple = ()  # what the round's checkpoint keeps, as the round hands over: strategy, privacy, rng state
    evaluation: Future | None = None  # the test loss and accuracy; the round recorded if the loss is finite


class Rewind(Exception):
    """The pending round's aggregate has no finite test loss: the run goes back to that round."""

    def __init__(self, pending: Pending) -> None:
        super().__init__(f"round {pending.server_round}'s aggregate has no finite test loss")
        self.pending = pending


@dataclass
class Answer:
    """A reply that passed its checks."""

    node_id: int
    message: Message
    reply: TrainReply | EvaluateReply


@dataclass
class RoundLoop:
    strategy: Strategy
    grid: PollingGrid
    ledger: NodeLedger
    recorder: Recorder
    model: GlobalModel
    expected: Expected
    config: RunConfig
    metrics: ServerMetrics
    privacy: PrivacyAccount
    _verdicts: dict[int, TrainReply | EvaluateReply | Refused] = field(default_factory=dict)  # by id(reply)
    _sent: ArrayRecord = field(default_factory=ArrayRecord)  # the global model this attempt trains from
    _sent_to: dict[str, int] = field(default_factory=dict)  # message id -> the node it went to
    _pending: Pending | None = None  # the round whose aggregate is being evaluated
    _recorded: ArrayRecord | None = None  # the last recorded global model
    _evaluator: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="server-evaluation")
    )

    def run(self, arrays: ArrayRecord, first: int) -> ArrayRecord:
        """Rounds ``first`` .. ``num-server-rounds`` from the global model ``arrays``, unless early
        stopping or the privacy budget ends the run before (``stopping.py``; also a resumed one).
        Returns the last recorded global model."""
        self.metrics.num_rounds.set(self.config.num_server_rounds)
        self.metrics.progress_time.set_to_current_time()
        if first == 1:
            self.recorder.initial(*self.model.evaluate(arrays))
        self._recorded, server_round, retry = arrays, first, None
        try:
            while True:
                try:
                    if server_round > self.config.num_server_rounds:
                        self._settle()  # the last round's evaluation
                        break
                    if self._pending is None and (stop := early_stop(self.config, self._accuracies())):
                        raise StopRun(stop)  # e.g. a resumed run that had met its stop already
                    log.info("[ROUND %d/%d]", server_round, self.config.num_server_rounds)
                    self.metrics.round.set(server_round)
                    tally, attempt = (retry.tally, retry.attempt + 1) if retry else (RoundTally(), 1)
                    pending = self.train(server_round, arrays, tally, attempt)
                    tested = None
                    if self.config.fraction_evaluate:  # the nodes evaluate only a global model: no overlap
                        tested = self._test(pending)
                        if not math.isfinite(tested[0]):
                            self._discard(pending)
                    with tally.timed("federated_evaluate"):
                        self.evaluate(server_round, pending.aggregated, tally)
                    tally.ended = time.perf_counter()  # the next round starts beside this one's evaluation
                    pending.saved = (strategy_state(self.strategy), self.privacy.state_dict(), random.getstate())
                    pending.evaluation = self._evaluator.submit(self._conclude, pending, tested)
                    self._pending = pending
                    arrays, server_round, retry = pending.aggregated, server_round + 1, None
                except Rewind as rewind:  # that round again, from the model it trained from
                    retry = rewind.pending
                    arrays, server_round = retry.base, retry.server_round
        except StopRun as stop:
            self.recorder.stopped(stop.stop)
        finally:
            self._evaluator.shutdown()  # a round evaluated is recorded, whatever ends the run
        return self._recorded

    def train(self, server_round: int, arrays: ArrayRecord, tally: RoundTally, first_attempt: int = 1) -> Pending:
        """The round's aggregate. The round before is settled (``_settle``: it raises ``Rewind`` or
        ``StopRun``) once this round's replies are in, or before: at once with federated evaluation,
        as soon as its evaluation ends while this round waits for nodes, before the run stops."""
        for attempt in range(first_attempt, self.config.round_retries + 2):
            if self.config.fraction_evaluate:  # the round before was tested already: nothing to overlap
                self._settle()
            try:
                self.privacy.check_budget(server_round)  # every attempt may release a noised aggregate
            except BudgetReached:
                self._settle()  # the round before is complete: recorded before the run stops
                raise
            self.metrics.progress_time.set_to_current_time()
            tally.attempts = attempt
            # a failed attempt must leave no trace in what the strategy carries to the next round
            # (FedAdam's moments, FedAvgM's momentum, the adaptive clipping norm)
            state_before = strategy_state(self.strategy)
            self._sent = arrays
            config = ConfigRecord({"lr": self.config.learning_rate})
            try:
                messages = self._configure(self.strategy.configure_train, server_round, arrays, config)
            except TooFewNodes as short:  # e.g. a pod restarting: the next attempt waits for it again
                log.warning("round %d, attempt %d: %s", server_round, attempt, short)
                self.metrics.failed_round_attempts.inc()
                self._settle()
                continue
            every_slot = self._every_slot_in if self.config.fraction_train == 1 else None
            with tally.timed("exchange"):
                replies = self._exchange(messages, tally, every_slot)
            self._settle()  # the round before: its evaluation ran while these messages travelled
            with tally.timed("aggregate"):
                answers = self._accept(replies, "train", tally)
                aggregated = self._aggregate(server_round, arrays, answers, tally)
            tally.accepted = [
                Accepted(
                    a.reply.slot,
                    self.ledger.site(a.node_id),
                    a.reply.examples_trained,
                    a.reply.train_seconds,
                    a.reply.train_loss,
                )
                for a in answers
            ]
            if aggregated is None:
                log.warning("round %d, attempt %d: no client update was accepted", server_round, attempt)
            else:
                # released (noised, under central DP) whether or not it becomes the global model:
                # its test loss is logged, its attempt recorded
                tally.epsilon = self.privacy.release(server_round, attempt)
                return Pending(server_round, attempt, tally, arrays, aggregated, state_before)
            restore_strategy_state(self.strategy, state_before)
            self.metrics.failed_round_attempts.inc()
        where = (
            f"round {server_round - 1} is the last checkpointed one: fix the clients, then resume the run "
            "(fedcifar run --resume OUT_DIR, or -c resume=true)"
            if server_round > 1
            else "no round was completed: fix the clients (or the hyper-parameters), then start again"
        )
        raise RoundFailed(
            f"round {server_round} aggregated no client update in {self.config.round_retries + 1} attempts "
            f"(see the missing nodes, failures and refused replies above); {where}"
        )

    def evaluate(self, server_round: int, arrays: ArrayRecord, tally: RoundTally) -> None:
        """Federated evaluation, when ``fraction-evaluate`` asks for it."""
        if self.config.fraction_evaluate == 0:
            return
        self.metrics.progress_time.set_to_current_time()  # a phase of its own: its wait for nodes, its deadline
        try:  # the round's training is aggregated already: nothing here may lose it
            messages = self._configure(self.strategy.configure_evaluate, server_round, arrays, ConfigRecord())
            answers = self._accept(self._exchange(messages, tally), "evaluate", tally)
        except Exception:
            log.exception("round %d: federated evaluation failed; the round is kept without it", server_round)
            return
        if answers:  # Flower's aggregate_evaluate would multiply before dividing, and overflow
            examples = [a.reply.num_examples for a in answers]
            tally.client_eval_loss = weighted_mean([a.reply.loss for a in answers], examples)
            tally.client_eval_accuracy = weighted_mean([a.reply.accuracy for a in answers], examples)

    # -- the steps ------------------------------------------------------------------------------

    def _test(self, pending: Pending) -> tuple[float, float]:
        """The aggregate's test loss and accuracy on the server's split."""
        started = time.perf_counter()
        loss, accuracy = self.model.evaluate(pending.aggregated)
        pending.tally.spent("evaluate", time.perf_counter() - started)
        return loss, accuracy

    def _conclude(self, pending: Pending, tested: tuple[float, float] | None) -> tuple[float, float]:
        """In the evaluator's thread, once the round has handed over: its test loss and accuracy
        (``tested``: known already); a finite loss completes the round at once (its record:
        checkpoint, history, metrics), whatever the next round does."""
        try:
            loss, accuracy = tested or self._test(pending)
            if math.isfinite(loss):
                model = self.model.state_dict()
                self.recorder.round(pending.server_round, pending.tally, loss, accuracy, model, *pending.saved)
            return loss, accuracy
        except Exception:  # raised again where the round settles, unless the run ends first
            log.exception("round %d: evaluating or recording it failed", pending.server_round)
            raise

    def _settle(self) -> None:
        """The pending round, once its evaluation is done: early stopping asked (``StopRun``); or, if its
        aggregate has no finite test loss, that round tried again (``Rewind``)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        loss, _ = pending.evaluation.result()
        if not math.isfinite(loss):
            self._discard(pending)
        self._recorded = pending.aggregated
        stop = early_stop(self.config, self._accuracies())
        if stop and pending.server_round < self.config.num_server_rounds:  # the next round's replies are dropped
            raise StopRun(stop)

    def _discard(self, pending: Pending) -> None:
        """An aggregate without a finite test loss (well-formed replies whose aggregate is unusable,
        e.g. values near the float32 limit): never the global model; its round is tried again."""
        log.warning(
            "round %d, attempt %d: the aggregate's test loss is not finite; it never becomes the global model "
            "(replies trained from it are dropped)",
            pending.server_round,
            pending.attempt,
        )
        restore_strategy_state(self.strategy, pending.strategy_before)
        self.metrics.failed_round_attempts.inc()
        raise Rewind(pending)

    def _accuracies(self) -> list[float]:
        return [r.eval_accuracy for r in self.recorder.history.rounds]

    def _configure(
        self, configure: Callable, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        nodes = self._wait_for_nodes()
        self.ledger.learn_nodes(nodes)
        self.metrics.connected_clients.set(len(nodes))
        # the strategy samples from this list: Flower's own wait for nodes (unbounded) has nothing to wait for
        known = NodeList([node.node_id for node in nodes])
        return self.ledger.skip_superseded(configure(server_round, arrays, config, known))

    def _wait_for_nodes(self) -> list:
        """FedAvg's wait for ``min-nodes`` connected SuperNodes, but bounded by ``round-timeout``; a
        round before whose evaluation ends meanwhile is settled (in federated evaluation none is pending)."""
        deadline = time.monotonic() + self.config.round_timeout
        while len(nodes := list(self.grid.get_nodes())) < self.config.min_nodes:
            if self._pending is not None and self._pending.evaluation.done():
                self._settle()  # early stopping need not wait for nodes
            if time.monotonic() >= deadline:
                raise TooFewNodes(
                    f"only {len(nodes)} of min-nodes={self.config.min_nodes} SuperNodes connected after "
                    f"{self.config.round_timeout:g}s: start the missing ones (or lower -c min-nodes)"
                )
            time.sleep(NODE_POLL_SECONDS)
        return nodes

    def _exchange(
        self, messages: list[Message], tally: RoundTally, done: Callable[[list[Message]], bool] | None = None
    ) -> list[Message]:
        """Send, collect until the deadline (or ``done``), and count bytes, errors and missing replies."""
        self.ledger.new_exchange()
        self._verdicts.clear()
        self._sent_to = {}  # set once the Grid has pushed them; until then a reply's sender is its source
        sent = sum(_payload_bytes(m) for m in messages)
        tally.sent_bytes += sent
        self.metrics.sent_bytes.inc(sent)
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout, done=done)
        # the Grid set the message ids when it pushed them; an error the SuperLink made up (e.g. node
        # unavailable) does not come from the node, so the node is the one the request went to
        self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for m in replies:
            answered.add(node_id := self._node_of(m))
            if m.has_error():
                self._failure(tally, node_id, "error", m.error.reason)
        for node_id in self._sent_to.values():
            if node_id not in answered:
                self._failure(tally, node_id, "timeout", "no reply before the round's deadline")
        received = sum(_payload_bytes(m) for m in replies if not m.has_error())
        tally.received_bytes += received
        self.metrics.received_bytes.inc(received)
        return replies

    def _node_of(self, reply: Message) -> int:
        return self._sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _failure(self, tally: RoundTally, node_id: int, reason: str, detail: str) -> None:
        tally.failures += 1
        self.ledger.failure(node_id, reason, detail)

    def _verdict(self, message: Message, kind: str) -> TrainReply | EvaluateReply | Refused:
        """The checks' answer for one reply, computed once per exchange."""
        key = id(message)  # alive for the exchange; a reply's own message id is the sender's to shape
        if key not in self._verdicts:
            node_id = self._node_of(message)
            bound = self.ledger.bound_slot.get(node_id)
            # the slots other keys hold matter only to a node whose key holds none (O(nodes) to list)
            held = self.ledger.held_by_others(node_id) if bound is None else frozenset()
            try:
                self._verdicts[key] = CHECKS[kind](message.content, self.expected, bound, held)
                if kind == "train":
                    check_clipped(self.strategy, message.content, self._sent)
            except Refused as refused:
                self._verdicts[key] = refused
            except Exception as err:  # a defect no check foresaw: this reply is refused, the run goes on
                log.exception("checking a %s reply from node %d failed", kind, node_id)
                self._verdicts[key] = Refused("unreadable", f"{type(err).__name__}: {err}")
        return self._verdicts[key]

    def _every_slot_in(self, replies: list[Message]) -> bool:
        """Whether every slot has a reply that passes its checks (so stale node ids need no wait)."""
        slots = set()
        for m in replies:
            if not m.has_error() and not isinstance(verdict := self._verdict(m, "train"), Refused):
                slots.add(verdict.slot)
        return len(slots) == self.expected.num_partitions

    def _accept(self, replies: Iterable[Message], kind: str, tally: RoundTally) -> list[Answer]:
        """The replies that pass their checks, one per slot (the first in), by slot; the others refused."""
        answers: dict[int, Answer] = {}
        for m in replies:
            if m.has_error():
                continue
            node_id, verdict = self._node_of(m), self._verdict(m, kind)
            if not isinstance(verdict, Refused) and verdict.slot in answers:
                verdict = Refused("duplicate_partition", f"slot {verdict.slot} has answered already")
            if isinstance(verdict, Refused):
                refusal = self.ledger.refusal(
                    node_id, claimed_slot(m.content), verdict.reason, f"{kind}: {verdict.detail}"
                )
                tally.refusals.append({**refusal, "kind": kind})
                continue
            answers[verdict.slot] = Answer(node_id, m, verdict)
            self.ledger.answered(node_id, verdict.slot)
        return [answers[slot] for slot in sorted(answers)]

    def _aggregate(
        self, server_round: int, arrays: ArrayRecord, answers: list[Answer], tally: RoundTally
    ) -> ArrayRecord | None:
        """The strategy's aggregate of the accepted replies (None: nothing to aggregate, or it failed)."""
        if not answers:
            return None
        tally.train_loss = weighted_mean([a.reply.train_loss for a in answers], [a.reply.num_examples for a in answers])
        tally.clipping_norm = clipping_norm(self.strategy)  # before adaptive clipping moves it
        try:
            replies = private_replies(self.strategy, [a.message for a in answers], arrays)
            self.privacy.fresh_noise()
            aggregated, _ = self.strategy.aggregate_train(server_round, replies)
        except Exception:  # checked replies, so a fault of the strategy: this attempt aggregated nothing
            log.exception(
                "round %d: %s could not aggregate the accepted replies", server_round, type(self.strategy).__name__
            )
            return None
        if aggregated is None:
            return None
        # the model's own dtypes: server optimisers compute in float64 (FedAdam's bias correction),
        # which would double every message and make the nodes' float32 replies look foreign
        return ArrayRecord(
            {
                name: Array(np.asarray(aggregated[name].numpy(), dtype=want.dtype))
                for name, want in self.expected.layout.items()
            }
        )


def weighted_mean(values: list[float], weights: list[int]) -> float:
    """The weighted mean of checked figures (finite, >= 0), without overflow: each weight is divided
    by the total before it multiplies (a diverged client's honest loss may be near the float limit),
    and the figure is clamped to the largest float."""
    total = sum(weights)
    return min(math.fsum(v * (w / total) for v, w in zip(values, weights, strict=True)), sys.float_info.max)


def _payload_bytes(message: Message) -> int:
    """The arrays a message carries, in bytes as sent (every ArrayRecord, whatever its key)."""
    return sum(record_bytes(record) for record in message.content.array_records.values())
