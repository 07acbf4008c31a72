"""Hollow SuperNodes: many SuperNodes in one process, for load on a real SuperLink (as Kubernetes'
kubemark runs hollow kubelets against a real control plane).

Each hollow node has its own key, registered in-process through the SuperLink's Control API under
``<site>/slot-<k>`` (what ``fedcifar superlink``'s registrar does for a pod's key), or read from a folder
of keys the SuperLink's registrar holds already (``<site>.slot-<k>.key``, whose public halves went into
the sites' Secret: how pods of hollow nodes join a release, whose Control API only its pod reaches),
and talks to the
SuperLink through Flower's own Fleet connection (``http_request_response``: the signed requests,
activation, heartbeats and deactivation of ``flower-supernode``), on the poll schedule of ``fedcifar
supernode`` (``flower.polling.PollSchedule``). It takes each message as Flower's SuperNode loop does
(the run and its FAB the first time, every object of the message, the confirmation) and answers at
once, without training: a reply of the exact layout it received, the global model plus a step of its
own (``hollow_step``: distinct bytes per node and round, as Flower's object store is content-addressed),
with the metrics fedcifar's trainer sends and a count of examples its slot plausibly holds. The
SuperLink and the ServerApp do all their real work: pulls, checks, aggregation, evaluation,
checkpoints, metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_fab
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    pull_objects,
    push_object_contents_from_iterable,
)
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.run import RunNotRunningException
from flwr.supernode.fleet_http_connection import http_request_response

from fedcifar.deploy.control import control_client, register_node_key
from fedcifar.deploy.key_formats import load_private_key
from fedcifar.flower.polling import PollSchedule, shorten_object_pull_backoff

log = logging.getLogger(__name__)

CIFAR10_SIZES = {"train": 50_000, "test": 10_000}
STEP = 1e-3  # hollow_step's unit


def hollow_step(slot: int) -> float:
    """What hollow node ``slot`` adds to every weight of the model it received."""
    return STEP * (slot + 1)


def plausible_examples(run_config: dict, split: str, slots: int, sizes: dict[str, int]) -> int:
    """The examples a slot claims: ``max-examples`` where the run sets it, else an even split's floor
    (no slot of an IID split holds fewer; a Dirichlet split's smallest may: set max-examples there)."""
    if run_config.get("max-examples"):
        return int(run_config["max-examples"])
    return max(1, sizes[split] // slots)


def hollow_reply(message: Message, run_config: dict, slot: int, slots: int, sizes: dict[str, int]) -> Message:
    """The answer of hollow node ``slot`` to a train or evaluate instruction, as fedcifar's trainer
    shapes it (``node.trainer``), computed at once."""
    kind = message.metadata.message_type
    if kind == "train":
        examples = plausible_examples(run_config, "train", slots, sizes)
        received = message.content["arrays"]
        step = np.float32(hollow_step(slot))
        arrays = ArrayRecord({name: Array(a.numpy() + step) for name, a in received.items()})
        metrics = {
            "train_loss": 1.5,
            "num-examples": examples,
            "examples-trained": examples * int(run_config.get("local-epochs", 1)),
            "train-seconds": 0.0,
            "partition-id": slot,
        }
        if run_config.get("strategy") == "qfedavg":
            from fedcifar.strategies import LOSS_BEFORE_TRAINING

            metrics[LOSS_BEFORE_TRAINING] = 2.0
        if run_config.get("dp") == "client-adaptive":
            metrics["norm_bit"] = 1
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    else:
        examples = plausible_examples(run_config, "test", slots, sizes)
        metrics = {"eval_loss": 2.3, "eval_accuracy": 0.1, "num-examples": examples, "partition-id": slot}
        content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


@dataclass
class FleetLog:
    """What the hollow nodes of a process did: messages answered, failures, each poll's seconds."""

    answered: Counter = field(default_factory=Counter)  # message type -> count
    failures: Counter = field(default_factory=Counter)  # reason -> count
    poll_seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self, seconds: float) -> None:
        with self.lock:
            self.poll_seconds.append(seconds)

    def note(self, counter: Counter, key: str) -> None:
        with self.lock:
            counter[key] += 1


@dataclass
class HollowNode:
    """One hollow SuperNode: its key, its slot, and the loop that answers its messages."""

    slot: int
    slots: int
    superlink: str
    root_certificates: bytes | None
    schedule: PollSchedule
    fleet_log: FleetLog
    key: ec.EllipticCurvePrivateKey
    sizes: dict[str, int] = field(default_factory=lambda: dict(CIFAR10_SIZES))
    node_id: int | None = None

    @property
    def public_key(self) -> bytes:
        return public_key_to_bytes(self.key.public_key())

    def run(self, stop: threading.Event) -> None:
        keys = (self.key, self.key.public_key())
        insecure = self.root_certificates is None
        with http_request_response(self.superlink, insecure, self.root_certificates, keys) as connection:
            self.node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = connection
            run_configs: dict[int, dict] = {}
            while not stop.is_set():
                started = time.perf_counter()
                pulled = receive()
                self.fleet_log.poll(time.perf_counter() - started)
                if pulled is None:
                    stop.wait(self.schedule.next_wait())
                    continue
                self.schedule.active()
                message, tree = pulled
                try:
                    run_id = message.metadata.run_id
                    if run_id not in run_configs:  # as Flower's SuperNode: the run and its FAB, once
                        run = get_run(run_id)
                        run_configs[run_id] = get_fused_config_from_fab(get_fab(run.fab_hash, run_id).content, run)
                    whole = self.take(message, tree, partial(pull_object, run_id), confirm)
                    reply = hollow_reply(whole, run_configs[run_id], self.slot, self.slots, self.sizes)
                    self.answer(reply, send, partial(push_object, run_id))
                    self.fleet_log.note(self.fleet_log.answered, message.metadata.message_type)
                except RunNotRunningException:
                    self.fleet_log.note(self.fleet_log.failures, "run_not_running")
                except Exception as err:  # noqa: BLE001 - one node's failure is counted, the others go on
                    self.fleet_log.note(self.fleet_log.failures, type(err).__name__)
                    log.warning("hollow node %d (slot %d): %s", self.node_id, self.slot, err)
                self.schedule.active()

    @staticmethod
    def take(message: Message, tree: ObjectTree, pull_object: Callable, confirm: Callable) -> Message:
        """Every object of ``message`` pulled, its receipt confirmed, the message whole."""
        ids = [node.object_id for node in iterate_object_tree(tree)]
        contents = pull_objects(ids, pull_object_fn=pull_object)
        confirm(message.metadata.run_id, message.metadata.message_id)
        whole = inflate_object_from_contents(tree.object_id, contents, keep_object_contents=False)
        whole.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's SuperNode sets it
        return whole

    @staticmethod
    def answer(reply: Message, send: Callable, push_object: Callable) -> None:
        """Push the reply, then the objects the SuperLink asks for (Flower's SuperNode's order)."""
        reply.metadata.__dict__["_message_id"] = reply.object_id  # as Flower's ClientApp I/O sets it
        objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(reply).items()}
        tree = get_object_tree(reply)
        wanted, session = send(reply, tree, 0.0)
        push_object_contents_from_iterable(
            ((object_id, objects[object_id]) for object_id in wanted), push_object_fn=partial(push_object, session)
        )


def read_slot_key(folder: Path, site: str, slot: int) -> ec.EllipticCurvePrivateKey:
    """Slot ``slot``'s private key, ``<folder>/<site>.slot-<k>.key`` (PEM or OpenSSH), named as its
    public half is in the sites' Secret (``<site>.slot-<k>.pub``)."""
    path = folder / f"{site}.slot-{slot}.key"
    try:
        return load_private_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no private key for slot {slot} of site {site}: {path}: {err} (one key per node, named "
            "<site>.slot-<k>.key, its public half registered as <site>.slot-<k>.pub in the sites' Secret)"
        ) from None


@dataclass
class HollowFleet:
    """``count`` hollow nodes holding slots ``first_slot`` ... of ``slots``, each on a thread of its own;
    their keys new, registered through ``control``, or read from ``keys`` (registered already)."""

    superlink: str
    control: str | None
    root_certificates: bytes | None
    count: int
    slots: int
    first_slot: int = 0
    site: str = "hollow"
    sizes: dict[str, int] = field(default_factory=lambda: dict(CIFAR10_SIZES))
    schedule: Callable[[], PollSchedule] = PollSchedule.from_env
    keys: Path | None = None
    fleet_log: FleetLog = field(default_factory=FleetLog)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.first_slot < 0 or self.first_slot + self.count > self.slots:
            raise ValueError(
                f"slots {self.first_slot}..{self.first_slot + self.count - 1} are not all among the "
                f"{self.slots} slots: set --slots or --first-slot"
            )
        if (self.control is None) == (self.keys is None):
            raise ValueError("give either a Control API to register new keys, or a folder of registered keys")
        if self.keys is None:
            key_of = lambda _slot: ec.generate_private_key(ec.SECP256R1())  # noqa: E731
        else:
            key_of = partial(read_slot_key, self.keys, self.site)
        self.nodes = [
            HollowNode(
                slot,
                self.slots,
                self.superlink,
                self.root_certificates,
                self.schedule(),
                self.fleet_log,
                key_of(slot),
                self.sizes,
            )
            for slot in range(self.first_slot, self.first_slot + self.count)
        ]
        self.threads: list[threading.Thread] = []

    def register(self) -> None:
        """Register the nodes' new keys (nothing to do for keys read from a folder)."""
        if self.control is None:
            return
        control = control_client(self.control, self.root_certificates)
        try:
            for node in self.nodes:
                register_node_key(control, node.public_key, f"{self.site}/slot-{node.slot}")
        finally:
            control.close()

    def start(self, per_second: float = 50.0) -> None:
        """Start the nodes, ``per_second`` of them a second: a thousand activating at once outlast
        Flower's connection timeout on a one-core SuperLink (a StatefulSet's pods start spread out too)."""
        shorten_object_pull_backoff()  # as in fedcifar supernode (flower/tuning.py)
        for node in self.nodes:
            thread = threading.Thread(target=node.run, args=(self.stop,), name=f"hollow-{node.slot}", daemon=True)
            thread.start()
            self.threads.append(thread)
            if self.stop.wait(1 / per_second):
                return

    def activated(self) -> int:
        return sum(node.node_id is not None for node in self.nodes)

    def summary(self, reset_polls: bool = False) -> dict:
        """Nodes activated, messages answered and failed, and the polls' count and seconds (p50, p99)
        since the start or the last summary that reset them."""
        with self.fleet_log.lock:
            polls = sorted(self.fleet_log.poll_seconds)
            answered, failures = dict(self.fleet_log.answered), dict(self.fleet_log.failures)
            if reset_polls:
                self.fleet_log.poll_seconds = []
        quantile = lambda q: round(polls[min(len(polls) - 1, int(q * len(polls)))], 4) if polls else None  # noqa: E731
        return {
            "nodes": len(self.nodes),
            "activated": self.activated(),
            "answered": answered,
            "failures": failures,
            "polls": len(polls),
            "poll_p50_seconds": quantile(0.5),
            "poll_p99_seconds": quantile(0.99),
        }

    def close(self, timeout: float = 30) -> None:
        """Stop every node; each deactivates on the way out, as Flower's SuperNode does."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
