"""What a SuperNode's reply may hold, checked before anything is built from it.

A reply comes from someone else's machine. The checks compare it with what the server knows
itself — the model's layout (keys, shapes, dtypes, the exact length of each serialised array),
the run's slots and how many examples each holds, the metric keys the trainer sends — and
read only the reply's raw bytes: no array is decoded, and nothing is allocated, from a size
the reply declares. A defect raises ``Refused`` with one of ``metrics.REJECT_REASONS``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedcifar.strategies import LOSS_BEFORE_TRAINING, STRATEGIES

NUMPY_STYPE = "numpy.ndarray"  # how flwr serialises a numpy array (``np.save``, no pickle)
TRAIN_METRICS = {
    "train_loss": float,
    "num-examples": int,
    "examples-trained": int,
    "train-seconds": float,
    "partition-id": int,
}
# what a training reply adds for some runs: q-FedAvg's loss before training, adaptive clipping's bit
# saying whether the client clipped (Flower's adaptiveclipping_mod)
NORM_BIT = "norm_bit"
# q-FedAvg weighs a reply by its loss^q and divides by a sum with loss^(q-1): a claimed 1e300 would
# make one node's model the global one, a claimed 1e-10 would freeze the model. A cross-entropy over
# 10 classes outside these bounds is not a model's loss on real data.
LOSS_BEFORE_TRAINING_RANGE = (1e-3, 100.0)
EXTRA_DP_TRAIN_METRICS = {"client-adaptive": {NORM_BIT: int}}  # a strategy's are in strategies.py
EVALUATE_METRICS = {"eval_loss": float, "eval_accuracy": float, "num-examples": int, "partition-id": int}


class Refused(ValueError):
    """A reply that must not be used; ``reason`` is a ``metrics.REJECT_REASONS`` label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ArrayLayout:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Expected:
    """What the server knows that a reply must match."""

    layout: dict[str, ArrayLayout]  # the model as the server sends it
    train_examples: tuple[int, ...]  # per slot: the most examples a training reply may weigh
    evaluate_examples: tuple[int, ...]  # per slot: the most examples an evaluate reply may weigh
    local_epochs: int
    round_timeout: float
    train_metrics: dict[str, type] = field(default_factory=lambda: dict(TRAIN_METRICS))  # a train reply's metrics

    @staticmethod
    def train_metrics_for(strategy: str, dp: str) -> dict[str, type]:
        """The metric keys a training reply carries in a run of ``strategy`` with ``dp``."""
        return {**TRAIN_METRICS, **STRATEGIES[strategy].extra_train_metrics, **EXTRA_DP_TRAIN_METRICS.get(dp, {})}

    @property
    def num_partitions(self) -> int:
        return len(self.train_examples)

    @staticmethod
    def layout_of(arrays: ArrayRecord) -> dict[str, ArrayLayout]:
        return {name: ArrayLayout(tuple(a.shape), np.dtype(a.dtype)) for name, a in arrays.items()}


@dataclass(frozen=True)
class TrainReply:
    slot: int
    num_examples: int
    examples_trained: int
    train_seconds: float
    train_loss: float


@dataclass(frozen=True)
class EvaluateReply:
    slot: int
    num_examples: int
    loss: float
    accuracy: float


def check_train_reply(
    content: RecordDict, expected: Expected, bound_slot: int | None, held: frozenset[int] = frozenset()
) -> TrainReply:
    """The training reply's figures, once its records, arrays and metrics are sound and its weight
    is within its slot's; ``bound_slot``: the slot the sender's key holds (None: no key binding),
    ``held``: the slots other nodes' keys hold (no unbound node may answer for them)."""
    _check_records(content, {"arrays": ArrayRecord, "metrics": MetricRecord})
    metrics = _check_metrics(content["metrics"], expected.train_metrics)
    slot = _slot(metrics, expected, bound_slot, held)
    examples = _examples(metrics, expected.train_examples[slot], slot)
    trained, seconds = metrics["examples-trained"], metrics["train-seconds"]
    if not 0 <= trained <= examples * expected.local_epochs:
        raise Refused(
            "bad_metrics",
            f"examples-trained={trained} is not within num-examples x local-epochs "
            f"({examples} x {expected.local_epochs})",
        )
    if not 0 <= seconds <= expected.round_timeout:
        raise Refused("bad_metrics", f"train-seconds={seconds} is not within the round's {expected.round_timeout}s")
    if metrics["train_loss"] < 0:
        raise Refused("bad_metrics", f"train_loss={metrics['train_loss']} is negative")
    low, high = LOSS_BEFORE_TRAINING_RANGE
    if LOSS_BEFORE_TRAINING in metrics and not low <= metrics[LOSS_BEFORE_TRAINING] <= high:
        raise Refused(
            "bad_metrics", f"{LOSS_BEFORE_TRAINING}={metrics[LOSS_BEFORE_TRAINING]} is not in [{low}, {high}]"
        )
    if metrics.get(NORM_BIT, 0) not in (0, 1):
        raise Refused("bad_metrics", f"{NORM_BIT}={metrics[NORM_BIT]} is neither 0 nor 1")
    check_arrays(content["arrays"], expected.layout)
    return TrainReply(slot, examples, trained, float(seconds), float(metrics["train_loss"]))


def check_evaluate_reply(
    content: RecordDict, expected: Expected, bound_slot: int | None, held: frozenset[int] = frozenset()
) -> EvaluateReply:
    """The evaluate reply's figures, once its metrics are sound (it carries no arrays)."""
    _check_records(content, {"metrics": MetricRecord})
    metrics = _check_metrics(content["metrics"], EVALUATE_METRICS)
    slot = _slot(metrics, expected, bound_slot, held)
    examples = _examples(metrics, expected.evaluate_examples[slot], slot)
    loss, accuracy = metrics["eval_loss"], metrics["eval_accuracy"]
    if loss < 0 or not 0 <= accuracy <= 1:
        raise Refused(
            "bad_metrics", f"eval_loss={loss}, eval_accuracy={accuracy}: a loss >= 0 and an accuracy in [0, 1]"
        )
    return EvaluateReply(slot, examples, float(loss), float(accuracy))


def claimed_slot(content: RecordDict) -> object:
    """The ``partition-id`` a reply claims, whatever it is: for a log line, never trusted."""
    metrics = content.get("metrics")
    return metrics.get("partition-id") if isinstance(metrics, MetricRecord) else None


def check_arrays(arrays: ArrayRecord, layout: dict[str, ArrayLayout]) -> None:
    """The model's exact keys, each array serialised as numpy writes it with the model's shape and
    dtype and exactly its bytes, and finite values (read in place from the bytes received)."""
    if set(arrays) != set(layout):
        raise Refused("wrong_shape", f"arrays {sorted(arrays)[:5]}, not the model's {sorted(layout)}")
    for name, want in layout.items():
        _finite(name, _payload(name, arrays[name], want))


def _payload(name: str, array: Array, want: ArrayLayout) -> np.ndarray:
    declared = (array.stype, tuple(array.shape), array.dtype)
    if declared != (NUMPY_STYPE, want.shape, str(want.dtype)):
        raise Refused("wrong_shape", f"{name!r} is declared {declared}, not a {want.dtype} array of {want.shape}")
    data = array.data
    if not isinstance(data, bytes) or len(data) < want.nbytes:
        raise Refused("wrong_shape", f"{name!r} carries {len(data)} bytes, fewer than its {want.nbytes} values need")
    header = io.BytesIO(data[: len(data) - want.nbytes])  # the .npy header: whatever precedes the values
    try:
        version = np.lib.format.read_magic(header)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read_header[version](header)  # a size-capped literal_eval, no pickle
    except Exception as err:  # noqa: BLE001 -- numpy's parser raises ValueError, SyntaxError, TokenError, ...
        raise Refused("wrong_shape", f"{name!r} is not a .npy array of {want.shape}: {err!r:.200}") from None
    if header.tell() != len(data) - want.nbytes or (tuple(shape), fortran, dtype) != (want.shape, False, want.dtype):
        raise Refused(
            "wrong_shape",
            f"{name!r} holds a {dtype} array of {shape} (fortran order: {fortran}), "
            f"not a {want.dtype} array of {want.shape} in {want.nbytes} bytes",
        )
    return np.frombuffer(data, dtype=want.dtype, offset=header.tell())


def _finite(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise Refused("non_finite", f"{name!r} holds NaN or Inf")


def _check_records(content: RecordDict, kinds: dict[str, type]) -> None:
    got = {key: type(record).__name__ for key, record in content.items()}
    if set(got) != set(kinds) or any(not isinstance(content[key], kind) for key, kind in kinds.items()):
        want = {key: kind.__name__ for key, kind in kinds.items()}
        raise Refused("bad_records", f"the reply holds {got}, not {want}")


def _check_metrics(metrics: MetricRecord, schema: dict[str, type]) -> MetricRecord:
    if set(metrics) != set(schema):
        raise Refused("bad_metrics", f"metric keys {sorted(metrics)[:8]}, not {sorted(schema)}")
    for key, kind in schema.items():
        value = metrics[key]
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise Refused("bad_metrics", f"{key}={value!r:.40} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):  # e.g. a diverged client's loss
            raise Refused("non_finite", f"{key}={value}")
    return metrics


def _slot(metrics: MetricRecord, expected: Expected, bound_slot: int | None, held: frozenset[int]) -> int:
    claimed = metrics["partition-id"]
    if not 0 <= claimed < expected.num_partitions:
        raise Refused("bad_metrics", f"partition-id={claimed} is not one of the run's {expected.num_partitions} slots")
    if bound_slot is not None and claimed != bound_slot:
        raise Refused("wrong_slot", f"it claims slot {claimed}; its key holds slot {bound_slot}")
    if bound_slot is None and claimed in held:
        raise Refused("wrong_slot", f"it claims slot {claimed}, which another node's key holds")
    return claimed


def _examples(metrics: MetricRecord, bound: int, slot: int) -> int:
    examples = metrics["num-examples"]
    if examples < 1:
        raise Refused("bad_metrics", f"num-examples={examples} is below 1")
    if examples > bound:
        raise Refused("too_many_examples", f"num-examples={examples} is above slot {slot}'s {bound}")
    return examples
