"""The aggregation: one of Flower's strategies, picked by the run config's ``strategy``, wrapped in
one of Flower's differential-privacy strategies when ``dp`` asks for central DP.

The round loop (``rounds.py``) hands a strategy only replies that passed every check, so a
robust rule (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) sees well-formed updates and
guards against what checks cannot catch: a well-formed poisoned update. Whether the run's
replies per round can carry the rule out, and whether a DP setting stays private, is checked
with the run config (``config.py``) before any round.

What a strategy carries from round to round (FedAdam's and FedYogi's moments, FedAvgM's
momentum, the adaptive clipping norm) is its ``state``: kept in the checkpoint, restored on
resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcifar.config import RunConfig
from fedcifar.protocol import LOSS_BEFORE_TRAINING

CENTRAL_DP_WRAPPERS = (
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyClientSideAdaptiveClipping,
)
# what a strategy carries from one round to the next; the others are set again every round
STATE = ("m_t", "v_t", "momentum_vector", "current_arrays", "clipping_norm")
BOOKKEEPING_METRICS = ("partition-id", "train-seconds", "examples-trained", LOSS_BEFORE_TRAINING, "norm_bit")


def aggregate_client_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted means, without the per-client bookkeeping keys."""
    merged = aggregate_metricrecords(contents, weighted_by_key)
    for key in BOOKKEEPING_METRICS:
        merged.pop(key, None)
    return merged


def build_strategy(config: RunConfig) -> Strategy:
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": max(1, round(config.min_nodes * config.fraction_train)),
        "min_evaluate_nodes": max(1, round(config.min_nodes * config.fraction_evaluate)),
        "min_available_nodes": config.min_nodes,
        "train_metrics_aggr_fn": aggregate_client_metrics,
        "evaluate_metrics_aggr_fn": aggregate_client_metrics,
    }
    f, lr = config.num_malicious_nodes, config.learning_rate
    fedopt = {"eta": config.eta, "eta_l": lr, "tau": config.tau}
    moments = {"beta_1": config.beta_1, "beta_2": config.beta_2}
    aggregation = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=config.proximal_mu),
        "fedavgm": lambda: FedAvgM(
            **common, server_learning_rate=config.server_learning_rate, server_momentum=config.server_momentum
        ),
        "fedadam": lambda: FedAdam(**common, **fedopt, **moments),
        "fedyogi": lambda: FedYogi(**common, **fedopt, **moments),
        "fedadagrad": lambda: FedAdagrad(**common, **fedopt),
        "qfedavg": lambda: QFedAvg(lr, q=config.q, train_loss_key=LOSS_BEFORE_TRAINING, **common),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=config.trim_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=config.num_nodes_to_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
    }[config.strategy]()
    return with_privacy(aggregation, config)


def with_privacy(strategy: Strategy, config: RunConfig) -> Strategy:
    """Flower's central-DP wrapper the run config asks for (``dp``), or the strategy as it is."""
    z, norm, n = config.noise_multiplier, config.clipping_norm, config.replies_per_round
    adaptive = {
        "initial_clipping_norm": norm,
        "target_clipped_quantile": config.target_clipped_quantile,
        "clip_norm_lr": config.clip_norm_lr,
    }
    wrap = {
        "server-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(strategy, z, norm, n),
        "client-fixed": lambda: DifferentialPrivacyClientSideFixedClipping(strategy, z, norm, n),
        "server-adaptive": lambda: DifferentialPrivacyServerSideAdaptiveClipping(strategy, z, n, **adaptive),
        "client-adaptive": lambda: DifferentialPrivacyClientSideAdaptiveClipping(strategy, z, n, **adaptive),
    }.get(config.dp)
    return wrap() if wrap else strategy


def prepare_private_aggregation(strategy: Strategy, replies: list[Message]) -> None:
    """Under central DP, make the aggregate the one the noise is scaled for: a plain mean of the
    replies that are aggregated. The wrappers scale the noise for ``num_sampled_clients`` clipped
    updates averaged with equal weights; fewer replies, or weights by example count, would let one
    client move the mean by more than the noise covers."""
    if not isinstance(strategy, CENTRAL_DP_WRAPPERS):
        return
    strategy.num_sampled_clients = len(replies)
    weighted_by = strategy.strategy.weighted_by_key
    for reply in replies:
        reply.content["metrics"][weighted_by] = 1


def clipping_norm(strategy: Strategy) -> float | None:
    """The clipping norm in force (central DP), None without one."""
    return float(strategy.clipping_norm) if isinstance(strategy, CENTRAL_DP_WRAPPERS) else None


def _layers(strategy: Strategy) -> Iterator[tuple[str, Strategy]]:
    """The strategy and, for a wrapper, the strategy it wraps."""
    yield type(strategy).__name__, strategy
    if isinstance(strategy, CENTRAL_DP_WRAPPERS):
        yield from _layers(strategy.strategy)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy carries between rounds, as tensors and numbers (``torch.load(weights_only)``)."""
    return {
        f"{name}.{attr}": _saveable(value)
        for name, layer in _layers(strategy)
        for attr in STATE
        if (value := getattr(layer, attr, None)) is not None
    }


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """The inverse of ``strategy_state`` on a strategy built from the same run config."""
    for name, layer in _layers(strategy):
        for attr in STATE:
            if f"{name}.{attr}" in state:
                setattr(layer, attr, _restored(state[f"{name}.{attr}"]))


def _saveable(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {"ArrayRecord": {k: torch.from_numpy(a.numpy().copy()) for k, a in value.items()}}
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: _saveable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_saveable(v) for v in value]
    return float(value)


def _restored(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"ArrayRecord"}:
        return ArrayRecord({k: Array(t.numpy()) for k, t in value["ArrayRecord"].items()})
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _restored(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restored(v) for v in value]
    return value
