"""``fedcifar soak``: many rounds on a local federation, watching for failed rounds and for what
grows with the messages: memory, and each node's metrics folder and scrape time.

    fedcifar soak --clients 2 --rounds 250 --data ../shared/data/cifar10

Every round trains and evaluates on every node (two messages per node and round). After every
round it reads the resident memory (VmRSS) of each SuperNode's long-lived processes (the
``fedcifar supernode`` wrapper, Flower's SuperNode and SuperExec, the trainer) and of the SuperLink's
(the ``fedcifar superlink`` wrapper, Flower's SuperLink and SuperExec, the run's ServerApp), and
reports the round time, the clients that took part and any failure. A round fails when it did not
aggregate every client at the first attempt, or a reply was refused. ``memory_growth`` is the largest
increase of any node over its memory after round ``--baseline-round`` (a leak would grow it round
after round), ``superlink_memory_growth`` the SuperLink's; both are held to ``--max-growth``.
At that round and at the last, it counts the files in each node's metrics folder
and times a scrape of its endpoint (the fastest of ``SCRAPES``): a folder that gains more than
``MAX_NEW_METRICS_FILES`` files, or a scrape ``MAX_SCRAPE_SLOWDOWN`` times slower, fails the
soak (one file per ClientApp process once made scrapes slower with every message). The last
line printed is one JSON object; the exit code is 1 if anything failed.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcifar.common.procfs import tree_rss
from fedcifar.experiments.harness import PROJECT, machine, make_subset
from fedcifar.local.federation import LocalFederation

console = Console(stderr=True)
SCRAPES = 10
MAX_NEW_METRICS_FILES = 4
MAX_SCRAPE_SLOWDOWN = 1.5


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 2
    rounds: int = 250
    examples_per_client: int = 2500
    test_examples: int = 2000
    baseline_round: int = 5
    max_growth: float = 0.10


def soak(config: SoakConfig, data: str | None, out: Path) -> dict[str, Any]:
    subset = make_subset(data, config.examples_per_client * config.clients, config.test_examples, out / "data")
    run_dir = out / "run"
    rows: list[dict[str, Any]] = []
    with LocalFederation(clients=config.clients, app_dir=PROJECT, work_dir=out, data=str(subset)) as fed:
        folders: dict[str, list[dict[str, float]]] = {}

        def on_round(record: dict) -> None:
            if record["round"] in (config.baseline_round, config.rounds):
                folders["start" if record["round"] == config.baseline_round else "end"] = metrics_folders(fed)
            rss = [tree_rss(node.popen.pid) for node in fed.nodes[1:]]
            superlink_rss = tree_rss(fed.nodes[0].popen.pid)
            failed = (
                record["participating_clients"] < config.clients
                or record["failures"] > 0
                or record.get("rejected_updates", 0) > 0
                or record.get("attempts", 1) > 1
            )
            rows.append(
                {
                    "round": record["round"],
                    "seconds": record["round_seconds"],
                    "failed": failed,
                    "clients": record["participating_clients"],
                    "node_rss_bytes": rss,
                    "superlink_rss_bytes": superlink_rss,
                }
            )
            console.print(
                f"round {record['round']:>3}: {record['round_seconds']:5.2f}s, {record['participating_clients']} "
                f"clients{' FAILED' if failed else ''}, node RSS "
                + ", ".join(f"{b / 2**20:.0f}" for b in rss)
                + " MiB, "
                f"SuperLink RSS {superlink_rss / 2**20:.0f} MiB"
            )

        run_id = fed.submit(
            {
                "num-server-rounds": config.rounds,
                "min-nodes": config.clients,
                "num-partitions": config.clients,
                "fraction-evaluate": 1.0,
                "out-dir": str(run_dir),
            }
        )
        fed.follow(run_id, run_dir, on_round, on_notice=lambda text: console.print(f"[yellow]{text}[/]"))
        restarts = sum(node.restarts for node in fed.nodes[1:])
    baseline = next(r for r in rows if r["round"] == min(config.baseline_round, len(rows)))
    later = [r for r in rows if r["round"] > baseline["round"]] or [baseline]
    growth = max(
        max(r["node_rss_bytes"][i] for r in later) / baseline["node_rss_bytes"][i] - 1 for i in range(config.clients)
    )
    return {
        "machine": machine(),
        "clients": config.clients,
        "rounds": len(rows),
        "failed_rounds": sum(r["failed"] for r in rows),
        "node_restarts": restarts,
        "round_seconds_mean": statistics.mean(r["seconds"] for r in rows[1:] or rows),
        "round_seconds_max": max(r["seconds"] for r in rows),
        "baseline_round": baseline["round"],
        "baseline_node_rss_bytes": baseline["node_rss_bytes"],
        "final_node_rss_bytes": rows[-1]["node_rss_bytes"],
        "memory_growth": growth,
        "baseline_superlink_rss_bytes": baseline["superlink_rss_bytes"],
        "final_superlink_rss_bytes": rows[-1]["superlink_rss_bytes"],
        "superlink_memory_growth": max(r["superlink_rss_bytes"] for r in later) / baseline["superlink_rss_bytes"] - 1,
        "max_growth": config.max_growth,
        "messages_per_node": 2 * len(rows),
        "metrics_folders": folders,
        "metrics_folder_problems": folder_problems(folders),
    }


def metrics_folders(fed: LocalFederation) -> list[dict[str, float]]:
    """Each client's metrics-folder file count and scrape time (the fastest of ``SCRAPES``)."""
    found = []
    for i in range(fed.clients):
        url, fastest = f"http://127.0.0.1:{fed.metrics_ports[i + 1]}/metrics", float("inf")
        for _ in range(SCRAPES):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as reply:
                reply.read()
            fastest = min(fastest, time.perf_counter() - started)
        found.append({"files": sum(1 for _ in fed.metrics_dir(i).iterdir()), "scrape_seconds": fastest})
    return found


def folder_problems(folders: dict[str, list[dict[str, float]]]) -> list[str]:
    if set(folders) != {"start", "end"}:
        return ["the metrics folders were not measured at both rounds"]
    problems = []
    for i, (start, end) in enumerate(zip(folders["start"], folders["end"], strict=True)):
        if end["files"] > start["files"] + MAX_NEW_METRICS_FILES:
            problems.append(f"client {i}: metrics folder grew from {start['files']} to {end['files']} files")
        if end["scrape_seconds"] > MAX_SCRAPE_SLOWDOWN * start["scrape_seconds"]:
            problems.append(
                f"client {i}: a scrape took {1e3 * end['scrape_seconds']:.1f} ms, "
                f"{1e3 * start['scrape_seconds']:.1f} ms at the start"
            )
    return problems


def report(result: dict[str, Any]) -> int:
    """Print the verdict and the JSON line; 0 if the soak passed."""
    ok = (
        result["failed_rounds"] == 0
        and result["memory_growth"] <= result["max_growth"]
        and result["superlink_memory_growth"] <= result["max_growth"]
        and not result["metrics_folder_problems"]
    )
    for side in ("start", "end"):
        console.print(
            f"metrics folders ({side}): "
            + ", ".join(
                f"{f['files']} files, scrape {1e3 * f['scrape_seconds']:.1f} ms"
                for f in result["metrics_folders"].get(side, [])
            )
        )
    for problem in result["metrics_folder_problems"]:
        console.print(f"[bold red]{problem}[/]")
    console.print(
        f"{result['rounds']} rounds x {result['clients']} clients ({result['messages_per_node']} messages per node): "
        f"{result['failed_rounds']} failed, "
        f"mean round {result['round_seconds_mean']:.2f}s, node memory growth after round "
        f"{result['baseline_round']}: {100 * result['memory_growth']:+.1f}%, SuperLink's "
        f"{100 * result['superlink_memory_growth']:+.1f}% (limit {100 * result['max_growth']:.0f}%)"
        f" -> {'[green]pass[/]' if ok else '[bold red]FAIL[/]'}"
    )
    print(json.dumps(result), flush=True)
    return 0 if ok else 1
