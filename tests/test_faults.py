"""The ServerApp's defences, with real Flower messages: bad updates, missing replies, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Error
from flwr.supercore.task_identity import TaskIdentity
from prometheus_client import CollectorRegistry

from fedcifar.checkpoint import Checkpoint, CheckpointError, check_same_training, load_checkpoint
from fedcifar.config import RunConfig
from fedcifar.history import History, RoundRecord
from fedcifar.metrics import ServerMetrics
from fedcifar.security import site_of_node, slot_of_node
from fedcifar.server_app import ResilientFedAvg, update_problem
from fedcifar.task import MODEL_KEY, Net, flat_weights, initial_model


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages take their run id from the process's task identity, as inside a ServerApp."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture
def global_arrays() -> ArrayRecord:
    return ArrayRecord({MODEL_KEY: Array(flat_weights(initial_model(0)))})  # the model as messages carry it


def update(arrays: ArrayRecord, partition: int, examples: int = 100, scale: float = 1.0, **changes) -> RecordDict:
    """A training reply's content: ``arrays`` times ``scale``, with some arrays replaced (by a
    value, or by a function of the trained weights)."""
    trained = {name: a.numpy() * scale for name, a in arrays.items()}
    trained.update({name: change(trained[MODEL_KEY]) if callable(change) else change for name, change in changes.items()})
    return RecordDict({
        "arrays": ArrayRecord({name: Array(np.asarray(a, dtype=np.float32)) for name, a in trained.items()}),
        "metrics": MetricRecord({
            "train_loss": 1.0, "num-examples": examples, "partition-id": partition,
            "examples-trained": examples, "train-seconds": 0.5,
        }),
    })  # fmt: skip


def round_trip(strategy: ResilientFedAvg, arrays: ArrayRecord, answers: dict[int, RecordDict | str | None]):
    """Send a training round to nodes 11, 12, ... and let each answer (content, an error reason, or None)."""
    strategy.begin_round(1)
    sent = list(strategy._sending(arrays, [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=node, message_type="train")
        for node in answers
    ]))  # fmt: skip
    for message in sent:  # what the Grid does when it pushes them
        message.metadata.__dict__["_message_id"] = message.object_id
    strategy._reference = {name: (tuple(a.shape), a.dtype) for name, a in arrays.items()}
    replies = []
    for message, answer in zip(sent, answers.values()):
        if isinstance(answer, RecordDict):
            replies.append(Message(answer, reply_to=message))
        elif isinstance(answer, str):
            replies.append(Message(Error(code=0, reason=answer), reply_to=message))
            if answer.startswith("Node Unavailable"):  # made up by the SuperLink: not from the node
                replies[-1].metadata.__dict__["_src_node_id"] = 1
    return strategy.aggregate_train(1, replies)


@pytest.fixture
def strategy(tmp_path):
    metrics = ServerMetrics(CollectorRegistry())
    config = RunConfig(num_partitions=3, min_nodes=1)
    history = History(run_id=1, config=config.to_flower(), data="test", device="cpu")
    return ResilientFedAvg(history, tmp_path, metrics, config)


def counter(strategy, name: str, **labels) -> float:
    """The value of a series that exists (KeyError if it was never created)."""
    for family in getattr(strategy.metrics, name).collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels}")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({MODEL_KEY: lambda w: np.where(np.arange(w.size) == 7, np.nan, w)}, "non_finite"),
        ({MODEL_KEY: lambda w: np.where(np.arange(w.size) == w.size - 1, np.inf, w)}, "non_finite"),
        ({MODEL_KEY: lambda w: np.append(w, 0.0)}, "wrong_shape"),
        ({MODEL_KEY: lambda w: w.reshape(2, -1)}, "wrong_shape"),
        ({"extra.weight": np.zeros(3)}, "wrong_shape"),
    ],
)
def test_a_poisoned_or_misshapen_update_is_refused(change, reason, global_arrays):
    reference = {name: (tuple(a.shape), a.dtype) for name, a in global_arrays.items()}
    assert update_problem(update(global_arrays, 0), reference, 2) is None
    assert update_problem(update(global_arrays, 0, **change), reference, 2) == reason


@pytest.mark.parametrize("examples, partition", [(0, 0), (math.nan, 0), (-5, 0), (10, 7), (10, -1)])
def test_an_update_with_impossible_metrics_is_refused(examples, partition, global_arrays):
    reference = {name: (tuple(a.shape), a.dtype) for name, a in global_arrays.items()}
    assert update_problem(update(global_arrays, partition, examples=examples), reference, 3) == "bad_metrics"


def test_bad_updates_never_reach_the_average(strategy, global_arrays):
    nan = {MODEL_KEY: lambda w: np.full_like(w, np.nan)}
    arrays, metrics = round_trip(strategy, global_arrays, {
        11: update(global_arrays, 0, scale=2.0),
        12: update(global_arrays, 1, **nan),          # poisoned
        13: update(global_arrays, 0, scale=100.0),    # partition 0 a second time
    })  # fmt: skip
    expected = {name: a.numpy() * 2.0 for name, a in global_arrays.items()}
    for name, a in arrays.items():
        np.testing.assert_allclose(a.numpy(), expected[name], rtol=1e-6)
    assert counter(strategy, "rejected_updates", partition="1", site="unknown", reason="non_finite") == 1
    assert counter(strategy, "rejected_updates", partition="0", site="unknown", reason="duplicate_partition") == 1
    assert strategy._round["partitions"] == [0] and strategy._round["rejected"] == 2


def test_missing_and_failed_replies_are_counted_by_partition(strategy, global_arrays):
    round_trip(strategy, global_arrays, {11: update(global_arrays, 0), 12: update(global_arrays, 1)})
    arrays, _ = round_trip(strategy, global_arrays, {
        11: update(global_arrays, 0), 12: None, 13: "ClientApp crashed", 14: "Node Unavailable",
    })  # fmt: skip
    assert arrays is not None and strategy._round["partitions"] == [0]
    assert counter(strategy, "failures", partition="1", site="unknown", reason="timeout") == 1  # node 12 was partition 1
    assert counter(strategy, "failures", partition="unknown", site="unknown", reason="error") == 2  # 13 and 14 never answered before
    assert strategy._round["failures"] == 3  # each missing reply once


def test_a_dead_node_replaced_by_a_newer_one_gets_no_more_messages(strategy, global_arrays):
    """Node 12 (partition 1) dies; it restarts as node 13. Flower lists 12 for a minute more."""
    round_trip(strategy, global_arrays, {11: update(global_arrays, 0), 12: update(global_arrays, 1)})
    round_trip(strategy, global_arrays, {11: update(global_arrays, 0), 12: None, 13: update(global_arrays, 1)})
    assert counter(strategy, "failures", partition="1", site="unknown", reason="timeout") == 1

    def to(*nodes):
        return [Message(RecordDict({"arrays": global_arrays}), dst_node_id=n, message_type="train") for n in nodes]

    assert [m.metadata.dst_node_id for m in strategy._skip_superseded(to(11, 12, 13))] == [11, 13]
    # a node that failed without a successor for its partition is still tried
    round_trip(strategy, global_arrays, {11: None, 13: update(global_arrays, 1)})
    assert [m.metadata.dst_node_id for m in strategy._skip_superseded(to(11, 13))] == [11, 13]


def test_a_round_without_any_sound_update_aggregates_nothing(strategy, global_arrays):
    arrays, _ = round_trip(strategy, global_arrays, {11: None, 12: update(global_arrays, 1, **{MODEL_KEY: np.zeros(3)})})
    assert arrays is None


def test_a_node_cannot_answer_for_a_slot_its_key_is_not_bound_to(strategy, global_arrays):
    """Keys registered as <site>/slot-<k>: node 13 (site-b's slot 2) claims slot 0 and answers first."""
    strategy.site_of.update({11: "site-a", 13: "site-b"})
    strategy.slot_of.update({11: slot_of_node("site-a/slot-0"), 13: slot_of_node("site-b/slot-2")})
    arrays, _ = round_trip(strategy, global_arrays, {
        13: update(global_arrays, 0, scale=100.0),  # the impostor, first
        11: update(global_arrays, 0, scale=2.0),    # the honest holder of slot 0
    })  # fmt: skip
    for a in arrays.values():
        np.testing.assert_allclose(a.numpy(), global_arrays[MODEL_KEY].numpy() * 2.0, rtol=1e-6)  # the honest one
    assert counter(strategy, "rejected_updates", partition="2", site="site-b", reason="wrong_slot") == 1
    assert strategy._round["partitions"] == [0] and strategy._round["sites"] == ["site-a"]
    assert strategy.partition_of[13] == 2  # the impostor's claim never becomes its slot: 11 is not superseded
    assert slot_of_node("site-a/supernode-0") is None and slot_of_node("site-a/slot-x") is None


def test_zero_series_exist_for_every_slot_once_it_answered(strategy, global_arrays):
    strategy.site_of.update({11: "site-a", 12: "site-b"})
    with pytest.raises(KeyError):
        counter(strategy, "failures", partition="1", site="site-b", reason="timeout")
    round_trip(strategy, global_arrays, {11: update(global_arrays, 0), 12: update(global_arrays, 1)})
    assert counter(strategy, "failures", partition="1", site="site-b", reason="timeout") == 0
    assert counter(strategy, "rejected_updates", partition="0", site="site-a", reason="non_finite") == 0


def test_sites_come_from_the_registered_node_names_not_from_replies(strategy, global_arrays):
    """The site is the one the operator registered the node's key under (grid.get_nodes() names)."""
    strategy.site_of.update({11: site_of_node("site-a/supernode-0"), 12: site_of_node("site-b/supernode-0"),
                             13: site_of_node("")})  # fmt: skip
    round_trip(strategy, global_arrays, {12: update(global_arrays, 2), 11: update(global_arrays, 0), 13: None})
    assert strategy._round["partitions"] == [0, 2] and strategy._round["sites"] == ["site-a", "site-b"]
    round_trip(strategy, global_arrays, {11: update(global_arrays, 0), 12: "ClientApp crashed", 13: None})
    assert counter(strategy, "failures", partition="2", site="site-b", reason="error") == 1
    assert counter(strategy, "failures", partition="unknown", site="unknown", reason="timeout") == 2


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_of(round_: int, config: RunConfig) -> Checkpoint:
    history = History(run_id=7, config=config.to_flower(), data="test", device="cpu")
    history.rounds.append(RoundRecord(round=1, train_loss=1.0, eval_loss=1.0, eval_accuracy=0.3, round_seconds=2.0,
                                      participating_clients=2, partitions=[0, 1], examples_trained=10,
                                      sent_bytes=1, received_bytes=1))  # fmt: skip
    from dataclasses import asdict
    import random

    return Checkpoint(model=initial_model(1).state_dict(), round=round_, history=asdict(history),
                      fingerprint=config.training_fingerprint(), rng_state=random.getstate())  # fmt: skip


def test_checkpoint_round_trip(tmp_path):
    config = RunConfig()
    checkpoint_of(1, config).save(tmp_path)
    loaded = load_checkpoint(tmp_path, Net().state_dict())
    assert loaded.round == 1 and loaded.fingerprint == config.training_fingerprint()
    assert torch.equal(loaded.model["fc3.bias"], initial_model(1).state_dict()["fc3.bias"])
    restored = History.from_dict(loaded.history)
    assert restored.rounds[0].partitions == [0, 1]
    loaded.restore_rng()
    assert load_checkpoint(tmp_path / "empty", Net().state_dict()) is None


def test_a_corrupt_checkpoint_is_refused_and_left_untouched(tmp_path):
    path = checkpoint_of(1, RunConfig()).save(tmp_path)
    truncated = path.read_bytes()[:2000]
    path.write_bytes(truncated)
    with pytest.raises(CheckpointError, match="unreadable.*left as it is"):
        load_checkpoint(tmp_path, Net().state_dict())
    assert path.read_bytes() == truncated


def test_an_incompatible_checkpoint_is_refused(tmp_path):
    checkpoint = checkpoint_of(1, RunConfig())
    checkpoint.model["fc3.weight"] = torch.zeros(5, 84)
    checkpoint.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"incompatible model \(fc3.weight"):
        load_checkpoint(tmp_path, Net().state_dict())
    torch.save({"weights": 1}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a fedcifar checkpoint"):
        load_checkpoint(tmp_path, Net().state_dict())


def test_resuming_with_other_hyper_parameters_is_refused(tmp_path):
    checkpoint = checkpoint_of(1, RunConfig(learning_rate=0.01))
    check_same_training(checkpoint, RunConfig(learning_rate=0.01, num_server_rounds=9).training_fingerprint(), tmp_path)
    with pytest.raises(CheckpointError, match=r"learning-rate: 0.01 -> 0.1"):
        check_same_training(checkpoint, RunConfig(learning_rate=0.1).training_fingerprint(), tmp_path)
