"""Prometheus metrics, and how they outlive Flower's short-lived app processes.

Flower runs the ServerApp in a new process per run and the ClientApp in a new process per
message, so an HTTP exporter inside them would come and go. Instead the long-lived node
process (``fedcifar superlink`` / ``fedcifar supernode``, see ``node/process.py``) owns the HTTP
endpoint and serves prometheus_client's multiprocess collector over a directory that every
process it spawns writes into (``PROMETHEUS_MULTIPROC_DIR``, inherited by the node's trainer and,
through Flower's SuperExec, by the ServerApp and ClientApp processes). Counters and histograms
add up across processes; gauges keep the most recent value, so the last round's loss stays
visible between rounds and between runs.

Names follow Prometheus conventions: one ``fedcifar_`` prefix, base units, ``_total`` on
counters. Node-side series are ``fedcifar_client_*`` and carry ``site`` and ``partition`` labels;
server-side series have no role infix, but for ``fedcifar_client_failures_total``, the server's count
of the clients' failed replies (a name dashboards and alerts already use). A node's site is
``$FEDCIFAR_SITE`` (set by ``fedcifar supernode --site``, inherited by its trainer and ClientApps); the
server's per-node series name the site the SuperNode's key was registered under (``server/ledger.py``).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from functools import lru_cache
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
    start_http_server,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GPU_REQUESTED_ENV = "FEDCIFAR_GPU_REQUESTED"  # "true" where the chart gave the SuperNode a GPU
SITE_ENV = "FEDCIFAR_SITE"
DEFAULT_SITE = "local"
UNKNOWN_SITE = "unknown"  # a SuperNode registered without a site name (or not registered: no auth)
FAILURE_REASONS = ("error", "timeout")  # an error reply; no reply before the round's deadline
# why a reply was refused (server/replies.py): its records, its arrays' layout or bytes, NaN/Inf, its
# metrics, a weight above its slot's size, a slot answered twice or not its key's, an update above the
# clipping norm the server sent (client-side DP), an error checking it
REJECT_REASONS = (
    "bad_records",
    "wrong_shape",
    "non_finite",
    "bad_metrics",
    "too_many_examples",
    "duplicate_partition",
    "wrong_slot",
    "unclipped",
    "unreadable",
)
# why the SuperLink's key registrar did not register a key file (deploy/registrar.py): no usable key in it, a
# file name that says no site, a slot name spelt otherwise than slot-<k>, a public key in two files, two
# keys for one slot, two keys for one (other) node name, a key the SuperLink holds under another name
KEY_REFUSAL_REASONS = (
    "not_a_key",
    "bad_name",
    "non_canonical_slot",
    "same_key",
    "same_slot",
    "same_name",
    "registered_as_other",
)
ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# a phase lasts from milliseconds (aggregating two replies) to a whole round (the exchange)
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    """Series written by the ServerApp (scraped from the SuperLink side)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        # a gauge keeps the value the last process wrote (counters and histograms add up)
        gauge = functools.partial(Gauge, multiprocess_mode="mostrecent", **kw)
        self.round = gauge(
            "fedcifar_round",
            "Current (or last) federated round number.",
        )
        self.num_rounds = gauge(
            "fedcifar_run_rounds",
            "Rounds configured for the current run.",
        )
        self.rounds_completed = Counter("fedcifar_rounds_completed", "Federated rounds completed.", **kw)
        self.progress_time = gauge(
            "fedcifar_run_progress_timestamp_seconds",
            "When the ServerApp last made progress (Unix time): began its rounds, a training attempt or a "
            "round's federated evaluation, or completed a round. A running run whose progress stops for longer "
            "than one such step (twice round-timeout: the wait for nodes, then the replies) has stalled.",
        )
        self.slot_rounds_since_accepted = gauge(
            "fedcifar_slot_rounds_since_accepted",
            "Rounds since each slot's last aggregated training reply (0: it took part in the last round); "
            "labels: the slot and the site of its last accepted reply (unknown before one).",
            ["partition", "site"],
        )
        self.round_duration = Histogram(
            "fedcifar_round_duration_seconds",
            "Wall time of a round, from its start to the next round's: train, aggregate (the server's "
            "evaluation of the aggregate runs beside the next round).",
            buckets=ROUND_BUCKETS,
            **kw,
        )
        self.round_phase = Histogram(
            "fedcifar_round_phase_seconds",
            "Server wall time of each phase of a round, retried attempts summed: exchange (sending the training "
            "messages and collecting the replies, the nodes' training included), aggregate, evaluate (the "
            "server's test split), federated_evaluate.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            **kw,
        )
        self.train_loss = gauge(
            "fedcifar_train_loss",
            "Training loss of the last round, averaged over clients by examples.",
        )
        self.eval_loss = gauge(
            "fedcifar_eval_loss",
            "Server-side test loss of the global model after the last round.",
        )
        self.eval_accuracy = gauge(
            "fedcifar_eval_accuracy",
            "Server-side test accuracy (0-1) of the global model after the last round.",
        )
        self.connected_clients = gauge(
            "fedcifar_connected_clients",
            "SuperNodes connected to the SuperLink when the last round started.",
        )
        self.participating_clients = gauge(
            "fedcifar_participating_clients",
            "Clients whose training reply was aggregated in the last round.",
        )
        self.examples_trained = Counter(
            "fedcifar_examples_trained", "Training examples processed by all clients (epochs included).", **kw
        )
        self.sent_bytes = Counter("fedcifar_sent_bytes", "Model bytes sent by the server to clients.", **kw)
        self.received_bytes = Counter(
            "fedcifar_received_bytes", "Model bytes received by the server from clients.", **kw
        )
        self.failures = Counter(
            "fedcifar_client_failures",
            "Expected client replies that carried an error or missed the round's deadline.",
            ["partition", "site", "reason"],
            **kw,
        )
        self.rejected_updates = Counter(
            "fedcifar_rejected_updates",
            "Client replies (train and evaluate) refused before use (REJECT_REASONS).",
            ["partition", "site", "reason"],
            **kw,
        )
        self.failed_round_attempts = Counter(
            "fedcifar_failed_round_attempts", "Round attempts that aggregated no client update (then retried).", **kw
        )
        self.strategy = gauge(
            "fedcifar_strategy_info",
            "The run's aggregation strategy and differential privacy (1 for the one in force).",
            ["strategy", "dp"],
        )
        self.dp_clipping_norm = gauge(
            "fedcifar_dp_clipping_norm",
            "Differential privacy: the clipping norm of the last round (adaptive clipping moves it).",
        )
        self.dp_noise_multiplier = gauge(
            "fedcifar_dp_noise_multiplier",
            "Central differential privacy: noise standard deviation over the clipping norm.",
        )
        self.dp_epsilon = gauge(
            "fedcifar_dp_epsilon",
            "Central differential privacy: the epsilon spent so far (RDP accountant) at the run's dp-delta.",
        )
        self.dp_max_epsilon = gauge(
            "fedcifar_dp_max_epsilon",
            "Central differential privacy: the run's privacy budget (max-epsilon) at its dp-delta; 0: none.",
        )
        self.runs_stopped_early = Counter(
            "fedcifar_runs_stopped_early",
            "Runs that ended before num-server-rounds: target_accuracy, patience (early stopping on the "
            "server's own evaluation) or privacy_budget (the next release would spend past max-epsilon).",
            ["reason"],
            **kw,
        )
        self.tracking_errors = Counter(
            "fedcifar_tracking_errors",
            "Experiment tracking (MLflow): attempts that failed and were retried (failed), operations given "
            "up (lost: the buffer was full, or the run's end could not wait longer).",
            ["reason"],
            **kw,
        )


class SuperLinkMetrics:
    """Series written by the SuperLink's own process (the Fleet guard, ``fleet_guard.py``) and by the key
    registrar of ``fedcifar superlink`` (``deploy/registrar.py``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.fleet_refused = Counter(
            "fedcifar_fleet_refused",
            "Fleet API requests the SuperLink's Fleet guard refused (fleet_guard.REASONS), by the site of "
            "the key that signed them.",
            ["reason", "site"],
            **kw,
        )
        self.fleet_requests = Counter(
            "fedcifar_fleet_requests",
            "Fleet API requests of registered SuperNodes (every one but the activation of a key the SuperLink "
            "does not know), refused or not, by Flower's handler and the site of the key that signed them.",
            ["handler", "site"],
            **kw,
        )
        self.fleet_quiet_polls = Counter(
            "fedcifar_fleet_quiet_polls",
            "Polls of registered SuperNodes that hold no instruction, answered before Flower's request path "
            '(superlink/idle_polls.py): a part of fedcifar_fleet_requests_total{handler="pull_messages"}, by site.',
            ["site"],
            **kw,
        )
        self.keys_refused = Counter(
            "fedcifar_supernode_keys_refused",
            "SuperNode public key files the key registrar refused to register (KEY_REFUSAL_REASONS); a refusal "
            "is counted once, when it is logged.",
            ["reason"],
            **kw,
        )


class ClientMetrics:
    """Series written on each SuperNode, labelled by its site (``self.site``) and partition (slot)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        # a gauge keeps the value the last process wrote (counters and histograms add up)
        gauge = functools.partial(Gauge, multiprocess_mode="mostrecent", **kw)
        self.site = node_site()
        part = ["site", "partition"]
        self.info = gauge(
            "fedcifar_client_info",
            "Always 1; labels: this node's site, partition (slot), the slot count, the device it trains on, "
            "and whether its deployment asked for a GPU ($FEDCIFAR_GPU_REQUESTED).",
            ["site", "partition", "num_partitions", "device", "gpu_requested"],
        )
        # Not the node id Flower gave it: a Fleet request names its node by that id, so a federation-wide
        # Prometheus would hand every site the ids of the others (the Fleet guard does not rely on them
        # being secret, but they need not be published either)
        self.node = gauge(
            "fedcifar_client_node",
            "1 once the SuperLink has activated this SuperNode; label: its site.",
            ["site"],
        )
        self.train_loss = gauge(
            "fedcifar_client_train_loss",
            "Training loss of this node's last training round.",
            part,
        )
        self.eval_loss = gauge(
            "fedcifar_client_eval_loss",
            "Loss of the global model on this node's test partition.",
            part,
        )
        self.eval_accuracy = gauge(
            "fedcifar_client_eval_accuracy",
            "Accuracy (0-1) of the global model on this node's test partition.",
            part,
        )
        self.last_round = gauge(
            "fedcifar_client_round",
            "Server round of this node's last training message.",
            part,
        )
        self.examples_trained = Counter(
            "fedcifar_client_examples_trained", "Training examples processed on this node.", part, **kw
        )
        self.train_duration = Histogram(
            "fedcifar_client_train_duration_seconds",
            "Time spent in the training loop per message.",
            part,
            buckets=TRAIN_BUCKETS,
            **kw,
        )
        self.messages = Counter(
            "fedcifar_client_messages",
            "Messages handled by this node (train, evaluate).",
            ["site", "partition", "kind"],
            **kw,
        )
        self.received_bytes = Counter(
            "fedcifar_client_received_bytes", "Model bytes received from the server.", part, **kw
        )
        self.sent_bytes = Counter("fedcifar_client_sent_bytes", "Model bytes sent to the server.", part, **kw)
        self.peak_rss = Gauge(
            "fedcifar_client_app_peak_rss_bytes",
            "Peak resident memory of a ClientApp process.",
            part,
            multiprocess_mode="max",
            **kw,
        )


def message_bytes(arrays: dict) -> int:
    """What ``record_bytes`` counts for these numpy arrays once the ClientApp sends them as Flower Arrays."""
    from flwr.app import Array

    return sum(len(Array(a).data) for a in arrays.values())


def node_site() -> str:
    return os.environ.get(SITE_ENV) or DEFAULT_SITE


def record_bytes(record) -> int:
    """Payload size of a Flower ``ArrayRecord`` (what is sent over the wire, before framing)."""
    return sum(len(array.data) for array in record.values())


@lru_cache(maxsize=1)
def server_metrics() -> ServerMetrics:
    return ServerMetrics()


@lru_cache(maxsize=1)
def superlink_metrics() -> SuperLinkMetrics:
    return SuperLinkMetrics()


@lru_cache(maxsize=1)
def client_metrics() -> ClientMetrics:
    return ClientMetrics()


def write_multiprocess_values() -> None:
    """Metrics this process creates from now on are written into ``$PROMETHEUS_MULTIPROC_DIR`` too.

    prometheus_client picks the storage of its values once, when it is imported; the node process
    (``node.run_node``) imported it before it set the folder, and its key registrar counts refusals."""
    from prometheus_client import values

    if not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before writing multiprocess metrics")
    values.ValueClass = values.get_value_class()


def serve_multiprocess(
    port: int, host: str = "0.0.0.0", listening_fd: int | None = None, collectors: tuple[Collector, ...] = ()
):
    """Serve the metrics that the node's child processes write into ``$PROMETHEUS_MULTIPROC_DIR`` (and
    those of ``collectors``, asked at each scrape), on ``host:port`` or on the listening socket
    ``listening_fd`` this process inherited (``fedcifar run`` binds it outside the federation's private
    network: ``isolation.py``)."""
    if not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before serving multiprocess metrics")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    if listening_fd is None:
        server, _thread = start_http_server(port, addr=host, registry=registry)
        return server
    # prometheus_client's own server (start_wsgi_server), given a socket instead of an address to bind
    listening = socket.socket(fileno=listening_fd)
    server = ThreadingWSGIServer(listening.getsockname()[:2], _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = listening
    server.server_name, server.server_port = "localhost", listening.getsockname()[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # a scrape is not worth a log line
        pass
