"""A hostile client, for tests only (never shipped): a catalogue of bad replies, and the ClientApp
process that sends them from a real SuperNode.

``TRAIN_REPLIES`` / ``EVALUATE_REPLIES`` map a name to (what the reply holds, the reason the server
must refuse it with); each builder takes the received global model and the node's slot. The unit
tests (``test_replies.py``) check each against the server's checks; ``test_hostile_clients.py``
sends each for real.

As a process, ``python tests/hostile.py supernode ARGS`` is Flower's SuperNode run by an attacker
who owns the node and tunes it as fedcifar tunes its own: it polls as often, and its SuperExec
(``hostile.py superexec``) forks each ClientApp warm from a server that preloaded
``tests/hostile_runtime.py``, so every ClientApp runs ``HostileApp`` instead of the run's app (a
round costs the attacker no cold process start). Each message is answered with the bad reply that
``$HOSTILE_PLAN`` (a JSON file: ``{"train": [name per round], "evaluate": [...]}``) names for its
round, and the global model it received is kept in ``$HOSTILE_RECORDS/<run>/global-<round>.npy``.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

MODEL_KEY = "model"  # fedcifar.task.MODEL_KEY (the FAB's fedcifar is not imported here)
PLAUSIBLE_EXAMPLES = 100  # below any slot's size in the tests' data


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def declared_as(model: np.ndarray, data: bytes, dtype: str = "float32", stype: str = "numpy.ndarray") -> Array:
    """An Array that declares the model's shape but carries ``data``."""
    return Array(dtype=dtype, shape=tuple(model.shape), stype=stype, data=data)


def train_metrics(slot: int, examples: int = PLAUSIBLE_EXAMPLES, **changes) -> MetricRecord:
    metrics = {
        "train_loss": 1.5,
        "num-examples": examples,
        "examples-trained": examples,
        "train-seconds": 0.5,
        "partition-id": slot,
    }
    metrics.update(changes)
    return MetricRecord({k: v for k, v in metrics.items() if v is not None})


def train_reply(model: np.ndarray, slot: int, arrays: dict[str, Array] | None = None, **metrics) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(arrays if arrays is not None else {MODEL_KEY: Array(model)}),
            "metrics": train_metrics(slot, **metrics),
        }
    )


def header_only(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 100


def with_value(model: np.ndarray, value: float) -> np.ndarray:
    bad = model.copy()
    bad[len(bad) // 2] = value
    return bad


Builder = Callable[[np.ndarray, int], RecordDict]
TRAIN_REPLIES: dict[str, tuple[Builder, str]] = {
    "one value declared as the model": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, npy(np.zeros(1, np.float32)))}),
        "wrong_shape",
    ),
    "a header declaring 2^40 values": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, header_only((2**40,)))}),
        "wrong_shape",
    ),
    "the right length, another header": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, b"\0" * len(npy(m)))}),
        "wrong_shape",
    ),
    "object dtype": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, npy(m), dtype="object")}),
        "wrong_shape",
    ),
    "big-endian values": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, npy(m.astype(">f4")))}),
        "wrong_shape",
    ),
    "a torch serialisation": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: declared_as(m, npy(m), stype="torch.Tensor")}),
        "wrong_shape",
    ),
    "an extra array": (
        lambda m, s: train_reply(m, s, {MODEL_KEY: Array(m), "extra": Array(np.zeros(3, np.float32))}),
        "wrong_shape",
    ),
    "NaN": (lambda m, s: train_reply(with_value(m, np.nan), s), "non_finite"),
    "Inf": (lambda m, s: train_reply(with_value(m, -np.inf), s), "non_finite"),
    "no examples-trained": (lambda m, s: train_reply(m, s, **{"examples-trained": None}), "bad_metrics"),
    "an extra metric": (lambda m, s: train_reply(m, s, accuracy=0.9), "bad_metrics"),
    "a list-valued loss": (lambda m, s: train_reply(m, s, train_loss=[1.0, 2.0]), "bad_metrics"),
    "a negative example count": (lambda m, s: train_reply(m, s, **{"num-examples": -5}), "bad_metrics"),
    "a count of 1e308": (lambda m, s: train_reply(m, s, **{"num-examples": 1e308}), "bad_metrics"),
    "a count of 1e18": (
        lambda m, s: train_reply(m, s, **{"num-examples": 10**18, "examples-trained": 0}),
        "too_many_examples",
    ),
    "a slot out of range": (lambda m, s: train_reply(m, s, **{"partition-id": 999_999}), "bad_metrics"),
    "a NaN train-seconds": (lambda m, s: train_reply(m, s, **{"train-seconds": float("nan")}), "non_finite"),
    "another node's slot": (lambda m, s: train_reply(m, (s + 1) % 2), "wrong_slot"),
    "a second record": (
        lambda m, s: RecordDict({**train_reply(m, s), "config": ConfigRecord({"note": "x"})}),
        "bad_records",
    ),
    "no arrays": (lambda m, s: RecordDict({"metrics": train_metrics(s)}), "bad_records"),
    "metrics as a config record": (
        lambda m, s: RecordDict(
            {"arrays": ArrayRecord({MODEL_KEY: Array(m)}), "metrics": ConfigRecord({"num-examples": "many"})}
        ),
        "bad_records",
    ),
}


def evaluate_reply(slot: int, **changes) -> RecordDict:
    metrics = {"eval_loss": 2.0, "eval_accuracy": 0.3, "num-examples": 20, "partition-id": slot}
    metrics.update(changes)
    return RecordDict({"metrics": MetricRecord(metrics)})


EVALUATE_REPLIES: dict[str, tuple[Builder, str]] = {
    "no examples": (lambda m, s: evaluate_reply(s, **{"num-examples": 0}), "bad_metrics"),
    "an accuracy of 2": (lambda m, s: evaluate_reply(s, eval_accuracy=2.0), "bad_metrics"),
    "a NaN loss": (lambda m, s: evaluate_reply(s, eval_loss=float("nan")), "non_finite"),
    "a count of 1e18": (lambda m, s: evaluate_reply(s, **{"num-examples": 10**18}), "too_many_examples"),
    "another node's slot": (lambda m, s: evaluate_reply((s + 1) % 2), "wrong_slot"),
    "arrays too": (
        lambda m, s: RecordDict({**evaluate_reply(s), "arrays": ArrayRecord({MODEL_KEY: Array(m)})}),
        "bad_records",
    ),
}
# well-formed replies: what no check can catch
ZEROS = "zeros with a plausible count"
WELL_FORMED: dict[str, Builder] = {
    ZEROS: lambda m, s: train_reply(np.zeros_like(m), s),
    "evaluate": lambda m, s: evaluate_reply(s),
}


class HostileApp:
    """Stands in for the FAB's ClientApp (Flower calls ``app(message=..., context=...)``)."""

    def __call__(self, message: Message, context) -> Message:
        plan = json.loads(Path(os.environ["HOSTILE_PLAN"]).read_text())
        kind, server_round = message.metadata.message_type, int(message.content["config"]["server-round"])
        model = message.content["arrays"][MODEL_KEY].numpy()
        if kind == "train":
            records = Path(os.environ["HOSTILE_RECORDS"]) / str(message.metadata.run_id)
            records.mkdir(parents=True, exist_ok=True)
            np.save(records / f"global-{server_round - 1}.npy", model)
        names = plan.get(kind, [])
        name = names[(server_round - 1) % len(names)] if names else "evaluate"
        catalogue = {**(TRAIN_REPLIES if kind == "train" else EVALUATE_REPLIES)}
        build = catalogue[name][0] if name in catalogue else WELL_FORMED[name]
        return Message(build(model, int(context.node_config["partition-id"])), reply_to=message)


def main(argv: list[str]) -> None:
    """``hostile.py supernode ARGS``: Flower's SuperNode, whose SuperExec is ``hostile.py superexec
    ARGS``: Flower's SuperExec, forking its ClientApps from a server that preloaded the hostile app."""
    from fedcifar.flower.patch import replace
    from fedcifar.flower.processes import CLIENTAPP_PRELOAD, SUPEREXEC, ClientAppForkServer, rerouted_subprocess

    if argv[:1] == ["supernode"]:
        import subprocess

        import flwr.supernode.start_client_internal as supernode_loop
        from flwr.supernode.cli import flower_supernode

        from fedcifar.flower.polling import PollSchedule, pace_supernode_polling

        def popen(args, **kwargs):
            if args and args[0] == SUPEREXEC:
                args = [sys.executable, __file__, "superexec", *args[1:]]
            return subprocess.Popen(args, **kwargs)

        pace_supernode_polling(PollSchedule(fast=0.1, idle=0.1))  # polls every 0.1 s, busy or not
        replace(supernode_loop, "subprocess", rerouted_subprocess(popen))
        sys.argv = ["flower-supernode", *argv[1:]]
        flower_supernode()
    elif argv[:1] == ["superexec"]:
        from flwr.supercore.cli import flower_superexec
        from flwr.supercore.superexec.executor import subprocess_executor

        # the fork server imports hostile_runtime from this script's folder (it gets no sys.path of ours)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
        )
        forks = ClientAppForkServer([*CLIENTAPP_PRELOAD, "hostile_runtime"])
        replace(subprocess_executor, "subprocess", rerouted_subprocess(forks.popen))
        sys.argv = [SUPEREXEC, *argv[1:]]
        flower_superexec()
    else:
        sys.exit("usage: python tests/hostile.py supernode|superexec [Flower's options]")


if __name__ == "__main__":
    main(sys.argv[1:])
