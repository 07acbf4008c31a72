"""A Grid whose nodes answer from a script, and a round loop over it: the round loop's tests
(``test_round_loop.py``, ``test_strategies.py``) drive real Flower messages through it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common import Error
from prometheus_client import CollectorRegistry

from fedcifar.config import RunConfig
from fedcifar.metrics import ServerMetrics
from fedcifar.server.history import History
from fedcifar.server.ledger import NodeLedger
from fedcifar.server.polling import PollingGrid
from fedcifar.server.privacy import PrivacyAccount
from fedcifar.server.recorder import Recorder, RoundTally
from fedcifar.server.replies import Expected
from fedcifar.server.rounds import RoundLoop
from fedcifar.server.strategies import build_strategy
from fedcifar.task import MODEL_KEY, flat_weights, initial_model
from tests.hostile import EVALUATE_REPLIES, TRAIN_REPLIES, train_reply

SILENT = None  # a node that never answers


class ScriptedGrid:
    """A Grid whose nodes answer from a script: node id -> f(message) -> content, an error reason
    (str), or ``SILENT``; names as ``grid.get_nodes()`` gives them (the key's registered name)."""

    def __init__(self, script: dict, names: dict[int, str] | None = None) -> None:
        self.script, self.names, self.inbox = script, names or {}, {}

    def get_node_ids(self):
        return list(self.script)

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, name=self.names.get(n, "")) for n in self.script]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what the SuperLink does
            answer = self.script[m.metadata.dst_node_id](m)
            if isinstance(answer, RecordDict):
                self.inbox[m.object_id] = Message(answer, reply_to=m)
            elif isinstance(answer, str):
                self.inbox[m.object_id] = Message(Error(code=0, reason=answer), reply_to=m)
                if answer.startswith("Node Unavailable"):  # made up by the SuperLink: not from the node
                    self.inbox[m.object_id].metadata.__dict__["_src_node_id"] = 1
            ids.append(m.object_id)
        return ids

    def pull_messages(self, ids):
        return [self.inbox.pop(i) for i in list(self.inbox) if i in ids]  # in the order they were answered


def trained(slot: int, scale: float = 2.0, examples: int = 100, **bad):
    """A node that trains: the global model times ``scale``."""
    return lambda m: train_reply(m.content["arrays"][MODEL_KEY].numpy() * scale, slot, examples=examples, **bad)


def sends(name: str, slot: int):
    """A node answering with a bad reply of the hostile catalogue."""
    catalogue = TRAIN_REPLIES if name in TRAIN_REPLIES else EVALUATE_REPLIES
    return lambda m: catalogue[name][0](m.content["arrays"][MODEL_KEY].numpy(), slot)


def by_kind(train, evaluate):
    return lambda m: (train if m.metadata.message_type == "train" else evaluate)(m)


class FixedModel:
    """The server-side evaluation, without the test split: each round's model is kept."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        weights = arrays[MODEL_KEY].numpy()
        self.seen.append(weights)
        return (1.0 if np.abs(weights).max() < 1e30 else float("inf")), 0.5  # as the network would overflow

    def state_dict(self) -> dict:
        """What the checkpoint keeps: the last model evaluated (the round's global model)."""
        return {MODEL_KEY: torch.from_numpy(self.seen[-1].copy())} if self.seen else {}


def loop_for(tmp_path, script, names=None, **config) -> RoundLoop:
    config = RunConfig(**{"num_partitions": 3, "min_nodes": 1, "round_timeout": 0.5, "round_retries": 0, **config})
    metrics = ServerMetrics(CollectorRegistry())
    history = History(run_id=1, config=config.to_flower(), data="test", device="cpu")
    arrays = ArrayRecord({MODEL_KEY: Array(flat_weights(initial_model(0)))})
    strategy = build_strategy(config)
    return RoundLoop(
        strategy=strategy,
        grid=PollingGrid(ScriptedGrid(script, names), 0.01),
        ledger=NodeLedger(config.num_partitions, metrics),
        recorder=Recorder(history, tmp_path, metrics, config.training_fingerprint()),
        model=FixedModel(),
        expected=Expected(
            Expected.layout_of(arrays),
            (200,) * config.num_partitions,
            (50,) * config.num_partitions,
            config.local_epochs,
            60.0,
            Expected.train_metrics_for(config.strategy, config.dp),
        ),
        config=config,
        metrics=metrics,
        privacy=PrivacyAccount.of(strategy, config, tmp_path),
    )


def train_round(loop: RoundLoop, model: np.ndarray) -> tuple[np.ndarray, RoundTally]:
    tally = RoundTally()
    pending = loop.train(1, ArrayRecord({MODEL_KEY: Array(model)}), tally)
    return pending.aggregated[MODEL_KEY].numpy(), tally


def counter(loop: RoundLoop, name: str, **labels) -> float:
    """The value of a series that exists (KeyError if it was never created)."""
    for family in getattr(loop.metrics, name).collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels}")
