"""``fedcifar niid-bench``: the NIID-Bench table (Li et al., "Federated Learning on Non-IID Data
Silos", ICDE 2022) as Flower's ``baselines/niid_bench`` runs it, reproduced on local SuperNodes.

The protocol (the baseline's ``conf/`` and ``dataset_preparation.py``): the tutorial CNN on
CIFAR-10, 10 clients all sampled every round, 50 rounds of 10 local epochs, batch 64, SGD with
learning rate 0.01, momentum 0.9 and weight decay 1e-5; training images randomly cropped from a
4-pixel reflect-padded copy and flipped, no normalisation (ToTensor alone); an IID split or the
baseline's Dirichlet(0.5) split by label (self-balancing, at least 10 images per client); the
server's test accuracy on the whole test split after every round, the best over the rounds
reported. Each cell is one strategy on one split, one seed. ``--rounds``, ``--local-epochs`` and
``--train-examples`` scale the protocol down (say so when quoting the figures).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

# the baseline's README: best test accuracy (%), mean +- std over seeds
REFERENCE = {
    ("fedavg", "iid"): (71.32, 0.33),
    ("fedavg", "dirichlet"): (62.47, 0.43),
    ("fedprox", "iid"): (71.26, 1.18),
    ("fedprox", "dirichlet"): (65.63, 0.08),
}
STRATEGY_CONFIG = {
    "fedavg": {},
    "fedprox": {"proximal-mu": 0.01},  # the baseline's mu
    "fedadam": {"eta": 0.01, "beta-1": 0.9, "beta-2": 0.99, "tau": 0.001},  # no reference: ours
}
SPLIT_CONFIG = {
    "iid": {"partitioner": "iid"},
    "dirichlet": {"partitioner": "dirichlet-balanced", "dirichlet-alpha": 0.5},
}
CELLS = tuple(f"{strategy}-{split}" for strategy in STRATEGY_CONFIG for split in SPLIT_CONFIG)


@dataclass(frozen=True)
class Protocol:
    clients: int = 10
    rounds: int = 50
    local_epochs: int = 10
    train_examples: int = 50_000  # the first N training images (the protocol: all)
    test_examples: int = 10_000
    seed: int = 42
    device: str = "auto"

    @property
    def full(self) -> bool:
        return (self.clients, self.rounds, self.local_epochs, self.train_examples) == (10, 50, 10, 50_000)

    def run_config(self, strategy: str, split: str) -> dict[str, Any]:
        return {
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "batch-size": 64,
            "learning-rate": 0.01,
            "momentum": 0.9,
            "weight-decay": 1e-5,
            "augment": True,
            "augment-padding": "reflect",
            "normalize": False,
            "fraction-train": 1.0,
            "min-nodes": self.clients,
            "num-partitions": self.clients,
            "seed": self.seed,
            "device": self.device,
            "strategy": strategy,
            **STRATEGY_CONFIG[strategy],
            **SPLIT_CONFIG[split],
        }


def run_cell(protocol: Protocol, cell: str, data: Path, out: Path) -> dict[str, Any]:
    from fedcifar.experiments.harness import run_federation  # the local federation: imports the data stack

    strategy, split = cell.split("-")
    run_config = protocol.run_config(strategy, split)
    console.print(f"[bold]{cell}[/]: {json.dumps(run_config)}")
    started = time.perf_counter()
    history, _ = run_federation(False, protocol.clients, data, out / cell, run_config)
    accuracies = [r["eval_accuracy"] for r in history["rounds"]]
    best = max(range(len(accuracies)), key=accuracies.__getitem__)
    reference = REFERENCE.get((strategy, split))
    return {
        "cell": cell,
        "best_accuracy": 100 * accuracies[best],
        "best_round": best + 1,
        "final_accuracy": 100 * accuracies[-1],
        "reference": reference,
        # "reproduced": within 1 point of the baseline's mean, one seed, on the full protocol only
        "within_one_point": abs(100 * accuracies[best] - reference[0]) <= 1 if reference and protocol.full else None,
        "wall_seconds": time.perf_counter() - started,
        "hyper_parameters": {k: run_config[k] for k in STRATEGY_CONFIG[strategy]},
    }


def niid_bench(protocol: Protocol, cells: list[str], data: str | None, out: Path) -> dict[str, Any]:
    from fedcifar.experiments.harness import machine, make_subset

    subset = make_subset(data, protocol.train_examples, protocol.test_examples, out / "data")
    rows = [run_cell(protocol, cell, subset, out) for cell in cells]
    return {"machine": machine(), "protocol": protocol.__dict__, "full_protocol": protocol.full, "cells": rows}


def print_table(result: dict[str, Any]) -> None:
    """The table on the console, the same as Markdown rows (for ``benchmarks/RESULTS.md``), then JSON."""
    p = result["protocol"]
    scale = (
        "the full protocol"
        if result["full_protocol"]
        else f"scaled down: {p['rounds']} rounds x {p['local_epochs']} local epochs, {p['train_examples']} train images"
    )
    title = f"NIID-Bench, {p['clients']} clients, seed {p['seed']}, {scale}; {result['machine']}"
    columns = ("cell", "best acc. % (round)", "baseline %", "within 1 pt", "wall", "hyper-parameters")
    rows = [
        (
            row["cell"],
            f"{row['best_accuracy']:.2f} ({row['best_round']})",
            f"{row['reference'][0]:.2f} ± {row['reference'][1]:.2f}" if row["reference"] else "none",
            {True: "yes", False: "no", None: "-"}[row["within_one_point"]],
            f"{row['wall_seconds'] / 60:.1f} min",
            " ".join(f"{k}={v}" for k, v in row["hyper_parameters"].items()),
        )
        for row in result["cells"]
    ]
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    print(f"{title}\n\n| {' | '.join(columns)} |\n|{' --- |' * len(columns)}")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print(json.dumps(result), flush=True)
