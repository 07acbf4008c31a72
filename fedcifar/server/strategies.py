"""The aggregation: one of Flower's strategies, picked by the run config's ``strategy``.

The round loop (``rounds.py``) hands a strategy only replies that passed every check, so a
robust rule (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) sees well-formed updates and
guards against what checks cannot catch: a well-formed poisoned update. Whether the run's
replies per round can carry the rule out is checked with the run config
(``config.check_strategy_fits``), before any round.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcifar.config import RunConfig


def aggregate_client_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted means, without the per-client bookkeeping keys."""
    merged = aggregate_metricrecords(contents, weighted_by_key)
    for key in ("partition-id", "train-seconds", "examples-trained"):
        merged.pop(key, None)
    return merged


def build_strategy(config: RunConfig) -> FedAvg:
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": max(1, round(config.min_nodes * config.fraction_train)),
        "min_evaluate_nodes": max(1, round(config.min_nodes * config.fraction_evaluate)),
        "min_available_nodes": config.min_nodes,
        "train_metrics_aggr_fn": aggregate_client_metrics,
        "evaluate_metrics_aggr_fn": aggregate_client_metrics,
    }
    f = config.num_malicious_nodes
    return {
        "fedavg": lambda: FedAvg(**common),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=config.trim_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=config.num_nodes_to_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
    }[config.strategy]()
