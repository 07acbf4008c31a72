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
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower_strategies
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcifar.config import RunConfig
from fedcifar.server.privacy import CENTRAL_DP_WRAPPERS, with_privacy
from fedcifar.server.replies import NORM_BIT
from fedcifar.strategies import LOSS_BEFORE_TRAINING, STRATEGIES

# what a strategy (``strategies.py``) or a DP wrapper carries from one round to the next
STATE = (*dict.fromkeys(a for spec in STRATEGIES.values() for a in spec.state), "clipping_norm")
BOOKKEEPING_METRICS = ("partition-id", "train-seconds", "examples-trained", LOSS_BEFORE_TRAINING, NORM_BIT)


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
    spec = STRATEGIES[config.strategy]
    aggregation = getattr(flower_strategies, spec.flower_class)(**common, **spec.parameters(config))
    return with_privacy(aggregation, config)


def _layers(strategy: Strategy) -> Iterator[tuple[str, Strategy]]:
    """The strategy and, for a wrapper, the strategy it wraps."""
    yield type(strategy).__name__, strategy
    if isinstance(strategy, CENTRAL_DP_WRAPPERS):
        yield from _layers(strategy.strategy)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy carries between rounds, as tensors and numbers (``torch.load(weights_only)``)."""
    return {
        f"{name}.{attr}": _saveable(getattr(layer, attr))
        for name, layer in _layers(strategy)
        for attr in STATE
        if hasattr(layer, attr)  # None too: a restore must unset what a failed attempt set
    }


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """The inverse of ``strategy_state`` on a strategy built from the same run config."""
    for name, layer in _layers(strategy):
        for attr in STATE:
            if f"{name}.{attr}" in state:
                setattr(layer, attr, _restored(state[f"{name}.{attr}"]))


def _saveable(value: Any) -> Any:
    if value is None:
        return None
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
