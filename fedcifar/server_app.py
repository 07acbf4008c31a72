"""fedcifar ServerApp: one of Flower's strategies over the SuperNodes, server-side evaluation on
the test split.

Every round is timed from sending the training messages to the next round's start (the
server-side evaluation of its aggregate runs beside the next round); its figures go to Prometheus
(``metrics.ServerMetrics``), to ``history.json`` and the checkpoint in the output folder
(rewritten after every round), and ``history.png``
is drawn at the end. The round loop and its defences live in ``fedcifar/server/``: a client
that dies, errors or is slow costs its own reply; a reply that fails a check (its records,
the model's exact layout and bytes, finite values, its metrics, a weight above its slot's
size, a slot that is not its key's) is refused and counted; neither ends the run. With
``resume = true`` the run continues from the checkpoint in ``out-dir`` (``checkpoint.py``),
after the last completed round. The best global model (the server's own test accuracy) is kept
beside the checkpoint as ``best-model.pt``; with ``MLFLOW_TRACKING_URI`` in its environment the run is
tracked in MLflow (``server/tracking.py``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

import fedcifar
from fedcifar.config import CENTRAL_DP, ConfigError, RunConfig
from fedcifar.data import DataSource, ImageTensors, load_full, partition_sizes, resolve_source
from fedcifar.flower.tuning import tune
from fedcifar.metrics import server_metrics
from fedcifar.server.checkpoint import check_same_training, load_checkpoint
from fedcifar.server.history import PLOT_FILE, History, plot_history
from fedcifar.server.ledger import NodeLedger
from fedcifar.server.polling import PollingGrid
from fedcifar.server.privacy import PrivacyAccount
from fedcifar.server.recorder import Recorder
from fedcifar.server.replies import Expected
from fedcifar.server.rounds import RoundLoop
from fedcifar.server.stopping import REASONS as STOP_REASONS
from fedcifar.server.strategies import build_strategy, restore_strategy_state
from fedcifar.server.tracking import FinalModels, Settings, per_slot_refusal, start_tracking
from fedcifar.superlink.fleet_budgets import ReplyLayout, publish_reply_layout
from fedcifar.task import (
    MODEL_KEY,
    Net,
    evaluate,
    flat_weights,
    initial_model,
    load_flat_weights,
    pick_device,
    scale_pixels,
)

log = logging.getLogger("flwr.fedcifar")
REPLY_POLL_SECONDS = 0.05  # Flower's handler prints it in the app's log
app = ServerApp()


@dataclass
class ServerModel:
    """The global model as a network, evaluated on the test split on the server's device."""

    net: Net
    test_data: ImageTensors
    device: torch.device
    normalize: bool  # the run config's ``normalize``

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        load_flat_weights(self.net, arrays[MODEL_KEY].numpy())
        return evaluate(self.net, self.test_data, self.device, normalize=self.normalize)

    def state_dict(self) -> dict:
        return self.net.state_dict()

    def example(self) -> np.ndarray:
        """A few test images as the model takes them (a tracked model's input example)."""
        return scale_pixels(self.test_data.images[:4].cpu(), self.normalize).numpy()


@app.main()
def main(grid: Grid, context: Context) -> None:
    tune("serverapp")  # replies are pulled as soon as they are listed (flower/)
    config = RunConfig.from_flower(context.run_config)
    if not config.num_partitions:
        raise ConfigError(
            "num-partitions is 0: the server must know the run's node slots to bound what a reply may claim; "
            "set -c num-partitions=N (the number of SuperNodes; fedcifar run and the chart set it)"
        )
    out_dir = output_dir(config, context.run_id)
    source = resolve_source()
    device = pick_device(config.device)
    # loaded before any round, so unusable data fails at once; on a GPU, copied there once
    model = ServerModel(Net(), load_full(source, "test").to(device), device, config.normalize)
    checkpoint = load_checkpoint(out_dir, model.net.state_dict()) if config.resume else None
    strategy = build_strategy(config)
    privacy = PrivacyAccount.of(strategy, config, out_dir)
    if checkpoint:
        check_same_training(checkpoint, config.training_fingerprint(), out_dir)
        history = History.from_dict(checkpoint.history)
        history.resumed(context.run_id, checkpoint.round, config.to_flower())
        checkpoint.restore_rng()
        restore_strategy_state(strategy, checkpoint.strategy_state)
        model.net.load_state_dict(checkpoint.model)
        log.info("Resuming from %s after round %d", out_dir, checkpoint.round)
    else:
        history = History(
            run_id=context.run_id,
            config=config.to_flower(),
            data=source.describe(),
            device=str(device),
            privacy=privacy.in_force(),
        )
        model.net = initial_model(config.seed)
    # every noised aggregate released in this folder is spent, also one the nodes saw before a crash
    privacy.resume(checkpoint.privacy_state if checkpoint else None)
    arrays = ArrayRecord({MODEL_KEY: Array(flat_weights(model.net))})
    expected = expected_replies(config, source, arrays)
    # the SuperLink's Fleet guard bounds every reply of this run by the largest an honest node sends
    publish_reply_layout(context.run_id, ReplyLayout.of(largest_reply(expected, arrays)))
    metrics = server_metrics()
    metrics.strategy.labels(config.strategy, config.dp).set(1)
    for reason in STOP_REASONS:  # from 0, so that an alert's increase() sees the first stop
        metrics.runs_stopped_early.labels(reason)
    if config.dp in CENTRAL_DP:
        metrics.dp_noise_multiplier.set(config.noise_multiplier)
        metrics.dp_max_epsilon.set(config.max_epsilon)
    tracker = start_tracking(tracking_settings(config), out_dir, metrics, history, run_tags(context.run_id, out_dir))
    recorder = Recorder(history, out_dir, metrics, config.training_fingerprint(), tracker)
    if checkpoint:
        recorder.resumed(checkpoint.best_model)
    loop = RoundLoop(
        strategy=strategy,
        grid=PollingGrid(grid, REPLY_POLL_SECONDS),
        ledger=NodeLedger(config.num_partitions, metrics),
        recorder=recorder,
        model=model,
        expected=expected,
        config=config,
        metrics=metrics,
        privacy=privacy,
    )
    try:
        final = loop.run(arrays, checkpoint.round + 1 if checkpoint else 1)
    except BaseException:
        if tracker:
            tracker.finish("FAILED", None)
        raise
    history.status = "completed"
    history.save(out_dir)
    plot_history(asdict(history), out_dir / PLOT_FILE)
    if tracker:
        load_flat_weights(model.net, final[MODEL_KEY].numpy())  # not an aggregate evaluated and dropped
        tracker.finish("FINISHED", final_models(model, recorder, history))
    log.info("Run %s completed; outputs in %s", context.run_id, out_dir)


def tracking_settings(config: RunConfig) -> Settings | None:
    """MLflow tracking as the server's environment asks, without what the run's DP forbids."""
    settings = Settings.from_env()
    if settings and (refusal := per_slot_refusal(settings.per_slot, config.dp)):
        log.warning("MLflow tracking: %s", refusal)
        settings = replace(settings, per_slot=False)
    return settings


def run_tags(run_id: int, out_dir: Path) -> dict[str, str]:
    """The MLflow run's tags: versions, and on Kubernetes the image and release (the chart's environment)
    and the revision (its output folder)."""
    tags = {
        "fedcifar.version": fedcifar.__version__,
        "flwr.version": flwr.__version__,
        "torch.version": torch.__version__,
        "fedcifar.out_dir": str(out_dir),
        "flwr.run_id": str(run_id),
    }
    if revision := re.fullmatch(r"revision-(\d+)", out_dir.name):  # the chart's out-dir: runs/revision-<N>
        tags["fedcifar.revision"] = revision[1]
    chart = {"fedcifar.image": "FEDCIFAR_IMAGE", "fedcifar.release": "FEDCIFAR_RELEASE"}
    return tags | {tag: os.environ[env] for tag, env in chart.items() if os.environ.get(env)}


def final_models(model: ServerModel, recorder: Recorder, history: History) -> FinalModels:
    return FinalModels(
        net=Net(),
        last={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        best={k: v.cpu() for k, v in recorder.best_model.items()},
        history=history,
        example=model.example(),
    )


def expected_replies(config: RunConfig, source: DataSource, arrays: ArrayRecord) -> Expected:
    """What a reply must match: the model's layout, and the most examples each slot may weigh —
    ``max-examples`` when set, else the slot's size in the server's own split of the data."""
    n = config.num_partitions
    if config.max_examples:
        train = evaluate_ = (config.max_examples,) * n
        where = f"max-examples={config.max_examples}"
    else:
        cut = (n, config.partitioner, config.dirichlet_alpha, config.seed)
        train, evaluate_ = partition_sizes(source, "train", *cut), partition_sizes(source, "test", *cut)
        where = f"the slots' sizes in {source.describe()} (set -c max-examples=N when sites train data of their own)"
    log.info("A training reply may weigh at most %s examples per slot: %s", list(train), where)
    return Expected(
        Expected.layout_of(arrays),
        train,
        evaluate_,
        config.local_epochs,
        config.round_timeout,
        Expected.train_metrics_for(config.strategy, config.dp),
    )


def largest_reply(expected: Expected, arrays: ArrayRecord) -> RecordDict:
    """The largest training reply of this run: the model and its metrics (``ReplyLayout.of`` charges a
    record the most any record may take, whatever its values)."""
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({k: t() for k, t in expected.train_metrics.items()})})


def output_dir(config: RunConfig, run_id: int) -> Path:
    """``out-dir`` when set, else ``runs/<run id>`` below the SuperLink's working directory."""
    path = Path(config.out_dir) if config.out_dir else Path("runs") / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
