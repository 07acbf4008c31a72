"""Experiment tracking in MLflow, from the ServerApp alone.

Off unless ``MLFLOW_TRACKING_URI`` is in the ServerApp's environment (``fedcifar run --mlflow``, the
chart's ``tracking.mlflow``). The URI and any credential (MLflow's own ``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``) reach the ServerApp through its environment,
never through the run config, which every SuperNode receives. The other settings are environment
variables too (``Settings``): they are the server operator's, not the submitter's.

One MLflow run per output folder: its id is kept in ``mlflow-run.json`` there, so a resumed run
continues the same MLflow run and sends only the rounds after its last logged step (the recorder
hands over checkpointed rounds only, so a round is never logged twice).

Nothing here may slow or fail a round: the round loop only enqueues. A thread sends, in order,
retrying an operation with backoff while the server is down or hangs (every HTTP request bounded by
``MLFLOW_HTTP_REQUEST_TIMEOUT``), and buffers up to ``MAX_PENDING`` operations meanwhile; a failed
attempt is counted (``fedcifar_tracking_errors_total{reason="failed"}``) and logged once per outage,
an operation given up is counted ``reason="lost"``. At the end of the run the ServerApp waits at most
``flush_seconds`` for the rest (the models and artifacts), then counts what is left as lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcifar.common import atomic
from fedcifar.config import CENTRAL_DP
from fedcifar.metrics import ServerMetrics
from fedcifar.server.history import HISTORY_FILE, PLOT_FILE, History, RoundRecord
from fedcifar.server.stopping import Stop

log = logging.getLogger("flwr.fedcifar")
RUN_FILE = "mlflow-run.json"
MAX_PENDING = 10_000  # operations buffered while the server is away (a round is one or two)
BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)
# MLflow's HTTP client retries 7 times over minutes by default: here one request is bounded, and
# the retrying is this thread's (the round loop never waits for either)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
ROUND_METRICS = (
    "eval_loss",
    "eval_accuracy",
    "train_loss",
    "round_seconds",
    "participating_clients",
    "examples_trained",
    "failures",
    "rejected_updates",
    "attempts",
    "client_eval_loss",
    "client_eval_accuracy",
    "epsilon",
    "clipping_norm",
)
STEP_METRIC = "eval_accuracy"  # every round has it: its last step is the last round logged


@dataclass(frozen=True)
class Settings:
    """What the server's operator asks for, from the ServerApp's environment."""

    uri: str
    experiment: str = "fedcifar"  # FEDCIFAR_MLFLOW_EXPERIMENT
    model_name: str = "fedcifar-cifar10"  # FEDCIFAR_MLFLOW_MODEL: the registered model
    per_slot: bool = False  # FEDCIFAR_MLFLOW_PER_SLOT=1: each slot's un-noised figures, by site
    flush_seconds: float = 60.0  # FEDCIFAR_MLFLOW_FLUSH_SECONDS: the most the end of a run waits

    def local_artifacts(self) -> str | None:
        """Beside a local SQLite store, where `mlflow ui` in its folder looks (None: the server decides)."""
        if not self.uri.startswith("sqlite:///"):
            return None
        return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings | None:
        uri = env.get("MLFLOW_TRACKING_URI", "").strip()
        if not uri:
            return None
        return cls(
            uri=uri,
            experiment=env.get("FEDCIFAR_MLFLOW_EXPERIMENT") or cls.experiment,
            model_name=env.get("FEDCIFAR_MLFLOW_MODEL") or cls.model_name,
            per_slot=env.get("FEDCIFAR_MLFLOW_PER_SLOT", "") in ("1", "true"),
            flush_seconds=float(env.get("FEDCIFAR_MLFLOW_FLUSH_SECONDS") or cls.flush_seconds),
        )


def per_slot_refusal(per_slot: bool, dp: str) -> str | None:
    """Why the per-slot series may not be logged (None: they may): under central DP they are
    un-noised figures of each site's data."""
    if per_slot and dp in CENTRAL_DP:
        return f"per-slot series are not logged under central DP (dp={dp}): they are un-noised figures of a site's data"
    return None


@dataclass
class FinalModels:
    """What the end of a run logs as MLflow models: the last and the best global model."""

    net: torch.nn.Module  # a Net to load the state dicts into
    last: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    history: History
    example: np.ndarray  # a batch of test images as the model takes them (float32, N x 3 x 32 x 32)


@dataclass
class Tracker:
    """Enqueues; a daemon thread sends (``start`` opens the run, ``round`` and ``finish`` follow)."""

    settings: Settings
    out_dir: Path
    metrics: ServerMetrics
    _ops: deque = field(default_factory=deque)
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _closing: bool = False
    _done: threading.Event = field(default_factory=threading.Event)
    _client: Any = None
    _run_id: str | None = None
    _created: bool = False  # this process created the run (a resumed one has its params)
    _last_step: int = 0
    _failing_since: float | None = None

    # -- what the ServerApp calls (never blocks, never raises) -----------------------------------

    def start(self, history: History, tags: dict[str, str]) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self._put("run", lambda: self._open_run(history, tags))
        self._put("params", lambda: self._created and self._client.log_batch(self._run_id, params=_params(history)))
        self._put("rounds", lambda: [self._log_round(r, []) for r in history.rounds])  # what a crash kept back
        threading.Thread(target=self._work, name="mlflow-tracking", daemon=True).start()

    def round(self, record: RoundRecord, accepted: list) -> None:
        self._put("round", lambda: self._log_round(record, accepted))

    def stopped(self, stop: Stop) -> None:
        """A run that ended early says why on its MLflow run (tags ``fedcifar.stop_reason``, ``fedcifar.stopped``)."""
        tags = {"fedcifar.stop_reason": stop.reason, "fedcifar.stopped": f"after round {stop.round}: {stop.detail}"}
        self._put("stopped", lambda: [self._client.set_tag(self._run_id, k, v) for k, v in tags.items()])

    def finish(self, status: str, models: FinalModels | None) -> None:
        """Artifacts, the two models (when the run completed) and the run's end; waits at most
        ``flush_seconds`` for everything still buffered."""
        self._put("artifacts", self._log_artifacts)
        if models is not None:
            self._put("models", lambda: self._log_models(models))
        self._put("end", lambda: self._client.set_terminated(self._run_id, status))
        with self._wake:
            self._closing = True
            self._wake.notify()
        if not self._done.wait(self.settings.flush_seconds):
            lost = len(self._ops)
            self.metrics.tracking_errors.labels("lost").inc(lost)
            log.warning(
                "MLflow tracking: %d operation(s) not sent within %.0fs (FEDCIFAR_MLFLOW_FLUSH_SECONDS) are lost; "
                "the run's outputs stay in %s",
                lost,
                self.settings.flush_seconds,
                self.out_dir,
            )

    # -- the thread --------------------------------------------------------------------------------

    def _put(self, name: str, operation: Callable[[], None]) -> None:
        with self._wake:
            if len(self._ops) >= MAX_PENDING:
                self._ops.popleft()
                self.metrics.tracking_errors.labels("lost").inc()
            self._ops.append((name, operation))
            self._wake.notify()

    def _work(self) -> None:
        tries = 0
        while True:
            with self._wake:
                while not self._ops and not self._closing:
                    self._wake.wait()
                if not self._ops:
                    self._done.set()
                    return
                name, operation = self._ops[0]
            try:
                if self._run_id is None and name != "run":
                    raise RuntimeError("no MLflow run yet")
                operation()
            except Exception as err:  # the server down, hanging, refusing: retried, never raised
                self._failed(name, err)
                time.sleep(BACKOFF_SECONDS[min(tries, len(BACKOFF_SECONDS) - 1)])
                tries += 1
                continue
            if self._failing_since is not None:
                log.info("MLflow tracking: sent again after %.0fs", time.monotonic() - self._failing_since)
                self._failing_since = None
            tries = 0
            with self._wake:
                self._ops.popleft()

    def _failed(self, name: str, err: Exception) -> None:
        self.metrics.tracking_errors.labels("failed").inc()
        if self._failing_since is None:  # once per outage
            self._failing_since = time.monotonic()
            log.warning(
                "MLflow tracking at %s failed (%s: %s); retrying in the background, rounds go on",
                self.settings.uri,
                name,
                f"{type(err).__name__}: {str(err)[:200]}",
            )

    # -- the operations ----------------------------------------------------------------------------

    def _open_run(self, history: History, tags: dict[str, str]) -> None:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(self.settings.uri)
        client = MlflowClient(self.settings.uri)
        experiment = client.get_experiment_by_name(self.settings.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(self.settings.experiment, artifact_location=self.settings.local_artifacts())
        )
        run_id = self._known_run(client, experiment_id)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "fedcifar.resumes", str(len(history.resumes)))
            steps = [m.step for m in client.get_metric_history(run_id, STEP_METRIC)]
            self._last_step = max(steps, default=0)
            log.info("MLflow tracking: continuing run %s after step %d", run_id, self._last_step)
        else:
            run_id = client.create_run(experiment_id, tags=tags, run_name=f"fedcifar-{self.out_dir.name}").info.run_id
            self._created = True
            atomic.write_bytes(
                self.out_dir / RUN_FILE,
                json.dumps(
                    {"tracking_uri": self.settings.uri, "experiment_id": experiment_id, "run_id": run_id}
                ).encode(),
            )
            log.info(
                "MLflow tracking: run %s in experiment %r at %s", run_id, self.settings.experiment, self.settings.uri
            )
        self._client, self._run_id = client, run_id

    def _known_run(self, client: Any, experiment_id: str) -> str | None:
        """The run this folder logged to before, when it is on this server and in this experiment."""
        try:
            known = json.loads((self.out_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if known.get("tracking_uri") != self.settings.uri or known.get("experiment_id") != experiment_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(known["run_id"]).info.run_id
        except MlflowException:  # e.g. the server's store was reset: a new run
            return None

    def _log_round(self, record: RoundRecord, accepted: list) -> None:
        from mlflow.entities import Metric

        if record.round <= self._last_step:
            return
        at = int(record.finished_at * 1000)
        figures = {name: getattr(record, name) for name in ROUND_METRICS}
        if self.settings.per_slot:
            for a in accepted:
                prefix = f"slots/{_metric_safe(a.site)}/slot-{a.slot}"
                figures |= {
                    f"{prefix}/train_loss": a.train_loss,
                    f"{prefix}/examples_trained": a.examples_trained,
                    f"{prefix}/train_seconds": a.train_seconds,
                }
        batch = [
            Metric(name, float(value), at, record.round)
            for name, value in figures.items()
            if value is not None and np.isfinite(value)
        ]
        self._client.log_batch(self._run_id, metrics=batch)
        self._last_step = record.round

    def _log_artifacts(self) -> None:
        for name in (HISTORY_FILE, PLOT_FILE):
            if (self.out_dir / name).exists():
                self._client.log_artifact(self._run_id, str(self.out_dir / name))

    def _log_models(self, models: FinalModels) -> None:
        """The last and the best global model as MLflow PyTorch models, registered as two versions of
        ``model_name`` with aliases ``last`` and ``best`` and their round and figures as tags."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        history, rounds = models.history, models.history.rounds
        chosen = {"best": (models.best, history.best), "last": (models.last, _figures(rounds[-1]))}
        with mlflow.start_run(run_id=self._run_id):
            for alias, (state, figures) in chosen.items():
                models.net.load_state_dict(state)
                models.net.eval()
                with torch.no_grad():
                    output = models.net(torch.from_numpy(models.example)).numpy()
                info = mlflow.pytorch.log_model(
                    models.net,
                    name=f"{alias}-model",
                    registered_model_name=self.settings.model_name,
                    signature=infer_signature(models.example, output),
                    input_example=models.example,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    tags={k: str(v) for k, v in figures.items()},
                )
                version = str(info.registered_model_version)
                for key, value in {"fedcifar.model": alias, **figures}.items():
                    self._client.set_model_version_tag(self.settings.model_name, version, key, str(value))
                self._client.set_registered_model_alias(self.settings.model_name, alias, version)
                log.info(
                    "MLflow tracking: %s model (round %s) is %s version %s",
                    alias,
                    figures["round"],
                    self.settings.model_name,
                    version,
                )


def _figures(record: RoundRecord) -> dict[str, Any]:
    return {"round": record.round, "eval_accuracy": record.eval_accuracy, "eval_loss": record.eval_loss}


def _params(history: History) -> list:
    """The whole run config, the data source, the device and the differential privacy in force."""
    from mlflow.entities import Param

    params = {**history.config, "data": history.data, "device": history.device}
    params |= {f"privacy.{k}": v for k, v in history.privacy.items()}
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _metric_safe(name: str) -> str:
    """A site name as a metric name's part (MLflow takes letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def start_tracking(
    settings: Settings | None, out_dir: Path, metrics: ServerMetrics, history: History, tags: dict[str, str]
) -> Tracker | None:
    if settings is None:
        return None
    tracker = Tracker(settings, out_dir, metrics)
    tracker.start(history, tags)
    return tracker
