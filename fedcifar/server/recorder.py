"""A round's figures, and where they go once the round is over: the checkpoint, ``history.json``,
``best-model.pt`` when the round's model is the best yet, Prometheus and the experiment tracker, in
that order (a crash between the files leaves the history a round behind, never ahead, and a resume
rewrites the best model from the checkpoint; a scrape never sees one round's accuracy beside another
round's count; the tracker is sent only checkpointed rounds, so a resume never repeats a step)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcifar.metrics import UNKNOWN_SITE, ServerMetrics
from fedcifar.server.checkpoint import Checkpoint, save_best_model
from fedcifar.server.history import BEST_MODEL_FILE, History, RoundRecord
from fedcifar.server.stopping import Stop
from fedcifar.server.tracking import Tracker

log = logging.getLogger("flwr.fedcifar")
# where a round's server time goes (``RoundRecord.phase_seconds``): sending the training messages and
# collecting the replies (the nodes' training included), checking and aggregating them, the server's
# evaluation of the aggregate (beside the next round: not within round_seconds), federated evaluation
# (when fraction-evaluate asks for it)
PHASES = ("exchange", "aggregate", "evaluate", "federated_evaluate")


@dataclass
class Accepted:
    """A training reply that was aggregated."""

    slot: int
    site: str
    examples_trained: int
    train_seconds: float
    train_loss: float


@dataclass
class RoundTally:
    """What one round has seen so far, attempts included."""

    started: float = field(default_factory=time.perf_counter)
    sent_bytes: int = 0
    received_bytes: int = 0
    failures: int = 0
    refusals: list[dict[str, str]] = field(default_factory=list)  # slot, site, reason of each refused reply
    attempts: int = 0
    accepted: list[Accepted] = field(default_factory=list)  # the last attempt's, by slot
    train_loss: float = float("nan")
    client_eval_loss: float | None = None
    client_eval_accuracy: float | None = None
    clipping_norm: float | None = None  # central DP: the norm the round's updates were clipped to
    epsilon: float | None = None  # central DP: the privacy spent after this round
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES), attempts summed
    ended: float | None = None  # when the next round started (this one's evaluation runs beside it)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the seconds the block takes to ``phase``, even when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent(phase, time.perf_counter() - started)

    def spent(self, phase: str, seconds: float) -> None:
        """Adds ``seconds`` to ``phase`` (one of ``PHASES``)."""
        assert phase in PHASES, phase
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def record(self, server_round: int, eval_loss: float, eval_accuracy: float) -> RoundRecord:
        return RoundRecord(
            round=server_round,
            train_loss=self.train_loss,
            eval_loss=eval_loss,
            eval_accuracy=eval_accuracy,
            round_seconds=(self.ended or time.perf_counter()) - self.started,
            participating_clients=len(self.accepted),
            partitions=[a.slot for a in self.accepted],
            examples_trained=sum(a.examples_trained for a in self.accepted),
            sent_bytes=self.sent_bytes,
            received_bytes=self.received_bytes,
            failures=self.failures,
            rejected_updates=len(self.refusals),
            attempts=self.attempts,
            client_train_seconds=[a.train_seconds for a in self.accepted],
            client_eval_loss=self.client_eval_loss,
            client_eval_accuracy=self.client_eval_accuracy,
            sites=[a.site for a in self.accepted],
            refusals=self.refusals,
            clipping_norm=self.clipping_norm,
            epsilon=self.epsilon,
            phase_seconds=dict(self.phases),
        )


@dataclass
class Recorder:
    history: History
    out_dir: Path
    metrics: ServerMetrics
    fingerprint: dict[str, Any]
    tracker: Tracker | None = None
    best_model: dict | None = None  # the state dict of ``history.best``'s round

    def resumed(self, best_model: dict | None) -> None:
        """After a resume: the checkpoint's best model, written again (a crash may have left
        ``best-model.pt`` a round ahead of the checkpoint)."""
        self.best_model = best_model
        if best_model is not None:
            save_best_model(self.out_dir, best_model, self.history.best)

    def initial(self, loss: float, accuracy: float) -> None:
        """The global model's figures before any round."""
        self.metrics.eval_loss.set(loss)
        self.metrics.eval_accuracy.set(accuracy)
        self.history.initial_eval_loss, self.history.initial_eval_accuracy = loss, accuracy
        self.history.save(self.out_dir)

    def stopped(self, stop: Stop) -> None:
        """The run ends early: why and where, in its log, ``history.json``, metrics and tracking run."""
        self.history.stopped = stop.to_dict()
        self.history.save(self.out_dir)
        self.metrics.runs_stopped_early.labels(stop.reason).inc()
        if self.tracker:
            self.tracker.stopped(stop)
        log.warning(
            "the run stops after round %d of %s: %s", stop.round, self.history.config["num-server-rounds"], stop.detail
        )

    def round(
        self,
        server_round: int,
        tally: RoundTally,
        loss: float,
        accuracy: float,
        model: dict,
        strategy_state: dict[str, Any],
        privacy_state: dict[str, Any] | None,
        rng_state: tuple,
    ) -> RoundRecord:
        """The round's figures and checkpoint; the states as they were when the round handed over to
        the next (``random``'s included, so a resumed run samples as the uninterrupted one would)."""
        record = tally.record(server_round, loss, accuracy)
        self.history.rounds.append(record)
        best = self.history.best
        improved = best is None or accuracy > best["eval_accuracy"]  # ties keep the earlier round
        if improved:
            self.history.best = {"round": server_round, "eval_accuracy": accuracy, "eval_loss": loss}
            self.best_model = {name: tensor.detach().clone() for name, tensor in model.items()}
        Checkpoint(
            model=model,
            round=server_round,
            history=asdict(self.history),
            fingerprint=self.fingerprint,
            rng_state=rng_state,
            strategy_state=strategy_state,
            privacy_state=privacy_state,
            best_model=self.best_model,
        ).save(self.out_dir)
        self.history.save(self.out_dir)
        if improved:
            save_best_model(self.out_dir, self.best_model, self.history.best)
        m = self.metrics
        m.eval_loss.set(loss)
        m.eval_accuracy.set(accuracy)
        m.train_loss.set(record.train_loss)
        m.participating_clients.set(record.participating_clients)
        m.examples_trained.inc(record.examples_trained)
        m.round_duration.observe(record.round_seconds)
        for phase, seconds in record.phase_seconds.items():
            m.round_phase.labels(phase).observe(seconds)
        m.rounds_completed.inc()
        m.progress_time.set(record.finished_at)
        for slot, (since, site) in rounds_since_accepted(
            self.history.rounds, self.history.config["num-partitions"]
        ).items():
            m.slot_rounds_since_accepted.labels(str(slot), site).set(since)
        if record.clipping_norm is not None:
            m.dp_clipping_norm.set(record.clipping_norm)
        if record.epsilon is not None:
            m.dp_epsilon.set(record.epsilon)
        if self.tracker:
            self.tracker.round(record, tally.accepted)
        log.info(
            "round %d: train_loss=%.4f eval_loss=%.4f eval_accuracy=%.4f %.1fs; slots (site): %s%s",
            server_round,
            record.train_loss,
            loss,
            accuracy,
            record.round_seconds,
            ", ".join(f"{p} ({site})" for p, site in zip(record.partitions, record.sites, strict=True)) or "none",
            f"; {len(record.refusals)} replies refused" if record.refusals else "",
        )
        if improved:
            log.info("round %d: the best model yet (%s)", server_round, BEST_MODEL_FILE)
        if record.epsilon is not None:
            log.info(
                "round %d: privacy spent epsilon=%.4g at delta=%g",
                server_round,
                record.epsilon,
                self.history.config["dp-delta"],
            )
        return record


def rounds_since_accepted(rounds: list[RoundRecord], slots: int) -> dict[int, tuple[int, str]]:
    """For each of ``slots``: the rounds since its last aggregated training reply (every round so far
    when it has none), and the site of that reply ("unknown" before one)."""
    last: dict[int, tuple[int, str]] = {}
    for record in rounds:
        for slot, site in zip(record.partitions, record.sites, strict=True):
            last[slot] = (record.round, site)
    now = rounds[-1].round if rounds else 0
    never = (0, UNKNOWN_SITE)
    return {slot: (now - last.get(slot, never)[0], last.get(slot, never)[1]) for slot in range(slots)}
