"""What crosses the local socket between a ClientApp (a shim) and its node's trainer.

Plain data only (numpy arrays, numbers, dicts), so the ClientApp side never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TRAINER_ENV = "FEDCIFAR_TRAINER"  # the socket path of the node's trainer
TRAINER_KEY_ENV = "FEDCIFAR_TRAINER_KEY"  # its authentication key, hex


@dataclass
class Task:
    """One ClientApp message in plain data (numpy arrays, dicts): what crosses the socket."""

    kind: str  # "train" | "evaluate"
    arrays: dict[str, np.ndarray]
    server_round: int
    lr: float | None
    partition_id: int  # the node's slot: seeds, metric labels, what the reply reports
    num_partitions: int
    run_config: dict[str, Any]
    data_path: str | None = None
    data_partition: tuple[int, int] | None = None  # (id, count) of the data it trains; None: the slot's
    proximal_mu: float = 0.0  # FedProx's weight, sent by the strategy in the message's config


@dataclass
class Reply:
    metrics: dict[str, float | int]
    arrays: dict[str, np.ndarray] | None = None
    error: str | None = None  # set when the trainer refused or failed; the shim raises it
