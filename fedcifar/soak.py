"""``fedcifar soak``: many rounds on a local federation, watching for failed rounds and memory growth.

    fedcifar soak --clients 2 --rounds 50 --data ../shared/data/cifar10

After every round it reads the resident memory (VmRSS) of each SuperNode's long-lived processes
(the ``fedcifar supernode`` wrapper, Flower's SuperNode and SuperExec, the trainer), and
reports the round time, the clients that took part and any failure. A round fails when it did
not aggregate every client at the first attempt. ``memory_growth`` is the largest increase of
any node over its memory after round ``--baseline-round`` (a leak would grow it round after
round). The last line printed is one JSON object; the exit code is 1 if a round failed or
memory grew more than ``--max-growth``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcifar.bench import PROJECT, machine, make_subset
from fedcifar.local import LocalFederation, tree_rss

console = Console(stderr=True)


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 2
    rounds: int = 50
    examples_per_client: int = 2500
    test_examples: int = 2000
    baseline_round: int = 5
    max_growth: float = 0.10


def soak(config: SoakConfig, data: str | None, out: Path) -> dict[str, Any]:
    subset = make_subset(data, config.examples_per_client * config.clients, config.test_examples, out / "data")
    run_dir = out / "run"
    rows: list[dict[str, Any]] = []
    with LocalFederation(clients=config.clients, app_dir=PROJECT, work_dir=out, data=str(subset)) as fed:

        def on_round(record: dict) -> None:
            rss = [tree_rss(node.popen.pid) for node in fed.nodes[1:]]
            failed = (
                record["participating_clients"] < config.clients or record["failures"] > 0
                or record.get("rejected_updates", 0) > 0 or record.get("attempts", 1) > 1
            )  # fmt: skip
            rows.append({"round": record["round"], "seconds": record["round_seconds"], "failed": failed,
                         "clients": record["participating_clients"], "node_rss_bytes": rss})  # fmt: skip
            console.print(
                f"round {record['round']:>3}: {record['round_seconds']:5.2f}s, {record['participating_clients']} "
                f"clients{' FAILED' if failed else ''}, node RSS "
                + ", ".join(f"{b / 2**20:.0f}" for b in rss) + " MiB"
            )

        run_id = fed.submit({"num-server-rounds": config.rounds, "min-nodes": config.clients,
                             "num-partitions": config.clients, "out-dir": str(run_dir)})  # fmt: skip
        fed.follow(run_id, run_dir, on_round, on_notice=lambda text: console.print(f"[yellow]{text}[/]"))
        restarts = sum(node.restarts for node in fed.nodes[1:])
    baseline = next(r for r in rows if r["round"] == min(config.baseline_round, len(rows)))
    later = [r for r in rows if r["round"] > baseline["round"]] or [baseline]
    growth = max(
        max(r["node_rss_bytes"][i] for r in later) / baseline["node_rss_bytes"][i] - 1
        for i in range(config.clients)
    )  # fmt: skip
    return {
        "machine": machine(), "clients": config.clients, "rounds": len(rows),
        "failed_rounds": sum(r["failed"] for r in rows), "node_restarts": restarts,
        "round_seconds_mean": statistics.mean(r["seconds"] for r in rows[1:] or rows),
        "round_seconds_max": max(r["seconds"] for r in rows),
        "baseline_round": baseline["round"], "baseline_node_rss_bytes": baseline["node_rss_bytes"],
        "final_node_rss_bytes": rows[-1]["node_rss_bytes"], "memory_growth": growth,
        "max_growth": config.max_growth,
    }  # fmt: skip


def report(result: dict[str, Any]) -> int:
    """Print the verdict and the JSON line; 0 if the soak passed."""
    ok = result["failed_rounds"] == 0 and result["memory_growth"] <= result["max_growth"]
    console.print(
        f"{result['rounds']} rounds x {result['clients']} clients: {result['failed_rounds']} failed, "
        f"mean round {result['round_seconds_mean']:.2f}s, node memory growth after round "
        f"{result['baseline_round']}: {100 * result['memory_growth']:+.1f}% (limit {100 * result['max_growth']:.0f}%)"
        f" -> {'[green]pass[/]' if ok else '[bold red]FAIL[/]'}"
    )
    print(json.dumps(result), flush=True)
    return 0 if ok else 1
