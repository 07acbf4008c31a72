"""``fedcifar bench``: stock Flower, fedcifar and the centralized loop, side by side in one run.

(a) **stock**: ``benchmarks/stock_app``, the same CNN written the way Flower's PyTorch quickstart
    writes it, on plain ``flower-superlink``/``flower-supernode`` processes (Flower's and torch's
    defaults: every ClientApp process uses all cores);
(b) **fedcifar**: this app on ``fedcifar superlink``/``supernode`` (warm trainer, short polling,
    the machine's cores split between the local SuperNodes);
(c) **centralized**: ``fedcifar.experiments.centralized`` on the union of the clients' data, same epochs.

All three use the same subset of the data (``--examples-per-client`` x ``--clients`` train
images, ``--test-examples`` test images), the same model initialisation and hyper-parameters,
on this machine. Round 1 pays one-off costs (imports, decoding the partition) and is reported
apart; the steady-state figures are means over rounds 2 and later (the centralized loop's
throughput: epochs 2 and later). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedcifar.data import resolve_source
from fedcifar.experiments.harness import machine, make_subset, run_federation

console = Console(stderr=True)
NODE_KINDS = (
    "fedcifar supernode",
    "fedcifar trainer",
    "flower-supernode",
    "flower-superexec",
    "clientapp forkserver",
    "flwr-clientapp",
)


@dataclass(frozen=True)
class BenchConfig:
    clients: int = 2
    rounds: int = 3
    examples_per_client: int = 5000
    test_examples: int = 10000
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    device: str = "auto"
    augment: bool = False  # fedcifar and centralized only (the stock app has no augmentation)
    stock: bool = True
    signed: bool = True  # fedcifar's federation with TLS and SuperNode authentication, as `fedcifar run`'s
    scale: tuple[int, ...] = ()
    scale_examples: int = 500


def steady(rounds: list[dict]) -> list[dict]:
    return rounds[1:] or rounds


def summarize(rounds: list[dict]) -> dict[str, float]:
    rest = steady(rounds)
    slowest = [max(r["client_train_seconds"]) for r in rest]
    return {
        "round1_seconds": rounds[0]["round_seconds"],
        "round_seconds": statistics.mean(r["round_seconds"] for r in rest),
        "slowest_client_train_seconds": statistics.mean(slowest),
        "fixed_overhead_seconds": statistics.mean(r["round_seconds"] - s for r, s in zip(rest, slowest, strict=True)),
        "accuracy": rounds[-1]["eval_accuracy"],
    }


def overhead_breakdown(rounds: list[dict]) -> dict[str, float]:
    """Where fedcifar's fixed overhead per round goes, steady rounds (``phase_seconds`` in history.json):
    the time between the server's sending and its having the last reply that the slowest node did not
    spend training (polling, each message's ClientApp process, the transfers), and the rest of the
    round (checks and aggregation, waiting for the previous round's evaluation if it outlasted this
    round's messages, bookkeeping). The two add up to ``summarize``'s fixed overhead. The server's
    evaluation runs beside the next round: its own time is reported, outside the overhead."""

    def mean(figure) -> float:
        return statistics.mean(figure(r["phase_seconds"], r) for r in steady(rounds))

    return {
        "overhead_transport_seconds": mean(lambda p, r: p["exchange"] - max(r["client_train_seconds"])),
        "overhead_other_seconds": mean(lambda p, r: r["round_seconds"] - p["exchange"]),
        "server_evaluate_seconds": mean(lambda p, r: p["evaluate"]),
    }


def client_images_per_second(rounds: list[dict], config: BenchConfig) -> float:
    """Training images per second of one client's training loop, steady rounds, mean over clients."""
    train_seconds = statistics.mean(s for r in steady(rounds) for s in r["client_train_seconds"])
    return config.examples_per_client * config.local_epochs / train_seconds


def bench(config: BenchConfig, data: str | None, out: Path) -> dict[str, Any]:
    from fedcifar.experiments.centralized import run_centralized
    from fedcifar.task import Recipe

    subset = make_subset(data, config.examples_per_client * config.clients, config.test_examples, out / "data")
    run_config = {
        "num-server-rounds": config.rounds,
        "local-epochs": config.local_epochs,
        "batch-size": config.batch_size,
        "learning-rate": config.learning_rate,
        "momentum": config.momentum,
        "min-nodes": config.clients,
    }
    result: dict[str, Any] = {
        "machine": machine(),
        "clients": config.clients,
        "rounds": config.rounds,
        "examples_per_client": config.examples_per_client,
    }

    if config.stock:
        console.print("[bold](a) stock Flower[/] (quickstart-style app, Flower defaults)")
        stock_history, _ = run_federation(
            True, config.clients, subset, out / "stock", {**run_config, "data-path": str(subset)}
        )
        stock = summarize(stock_history["rounds"])
        result.update({f"stock_{k}": v for k, v in stock.items()})
        result["stock_client_images_per_second"] = client_images_per_second(stock_history["rounds"], config)

    console.print("[bold](b) fedcifar[/]")
    fed_config = {**run_config, "num-partitions": config.clients, "device": config.device, "augment": config.augment}
    history, peaks = run_federation(False, config.clients, subset, out / "fedcifar", fed_config, config.signed)
    fed = summarize(history["rounds"])
    result.update({f"fedcifar_{k}": v for k, v in fed.items()})
    rest = steady(history["rounds"])
    result["client_images_per_second"] = client_images_per_second(history["rounds"], config)
    result["client_peak_rss_bytes"] = sum(peaks.get(kind, 0) for kind in NODE_KINDS)
    result["client_peak_rss_by_process"] = {k: v for k, v in peaks.items() if k in NODE_KINDS}
    result["bytes_per_round"] = statistics.mean(r["sent_bytes"] + r["received_bytes"] for r in rest)
    result["fixed_overhead_seconds"] = fed["fixed_overhead_seconds"]
    result.update(overhead_breakdown(history["rounds"]))
    if config.stock:
        result["round_speedup"] = stock["round_seconds"] / fed["round_seconds"]
        result["stock_round_seconds"], result["fedcifar_round_seconds"] = stock["round_seconds"], fed["round_seconds"]
        # the stock client's loop includes its data path (PIL images, per-image transforms, DataLoader)
        result["data_path_speedup"] = result["client_images_per_second"] / result["stock_client_images_per_second"]

    console.print("[bold](c) centralized[/]")
    epochs = config.rounds * config.local_epochs
    central = run_centralized(
        resolve_source(str(subset)),
        Recipe(epochs, config.batch_size, config.learning_rate, config.momentum, augmented=config.augment),
        seed=42,
        device=config.device,
    )
    result["centralized_images_per_second"] = central.steady_images_per_second
    result["centralized_accuracy"] = central.test_accuracy
    result["throughput_ratio"] = result["client_images_per_second"] / result["centralized_images_per_second"]
    result["device"] = central.device
    result["accuracy_ratio"] = fed["accuracy"] / central.test_accuracy
    result["augment"] = config.augment
    result["signed"] = config.signed

    if config.scale:
        result["scale_round_seconds"] = scale_table(config, data, out / "scale")
    return result


def scale_table(config: BenchConfig, data: str | None, out: Path) -> dict[int, float]:
    """Steady-state round time of fedcifar for growing numbers of local SuperNodes."""
    table = {}
    for n in config.scale:
        subset = make_subset(data, config.scale_examples * n, config.test_examples, out / f"data-{n}")
        console.print(f"[bold]scale: {n} SuperNodes[/] x {config.scale_examples} images")
        run_config = {
            "num-server-rounds": 3,
            "local-epochs": config.local_epochs,
            "batch-size": config.batch_size,
            "learning-rate": config.learning_rate,
            "min-nodes": n,
            "num-partitions": n,
        }
        history, _ = run_federation(False, n, subset, out / f"nodes-{n}", run_config, config.signed)
        table[n] = statistics.mean(r["round_seconds"] for r in steady(history["rounds"]))
    return table


def print_report(result: dict[str, Any]) -> None:
    table = Table(title=f"fedcifar bench ({result['machine']}, device {result['device']})", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:,.3f}")
        elif isinstance(value, int):
            table.add_row(key, f"{value:,}")
    console.print(table)
    for n, seconds in result.get("scale_round_seconds", {}).items():
        console.print(f"  {n:>2} SuperNodes: {seconds:.2f} s per round")
    print(json.dumps(result), flush=True)
