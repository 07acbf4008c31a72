"""``fedcifar scale``: how far one SuperLink goes, with hollow SuperNodes by the hundred.

For each node count N and each poll schedule, on this machine: the SuperLink the chart runs
(``fedcifar superlink`` with TLS, SuperNode authentication and the Fleet guard, the chart's nginx
proxy in front, both pinned to CPU 0) and N hollow SuperNodes (``fedcifar hollow``, a process per
``GENERATOR_NODES``, pinned to CPU 1, through the proxy). Measured:

- **idle** (``--idle-seconds``, once every node is active): the SuperLink's CPU (its whole process
  tree) and the proxy's, in cores; their memory; the Fleet requests a second the SuperLink counted
  (``fedcifar_fleet_requests_total``); the hollow nodes' poll latency (p50, p99); and the load
  generator's own CPU, with the polls it made against those its schedule asks for: a generator at one
  core that makes fewer is saturated, and the figures at that N are a lower bound;
- **active** (unless ``--rounds 0``): a run of ``--rounds`` rounds in which all N nodes train
  (round 1 is the first after the idle spell): each round's wall time, the server's time per
  reply, the SuperLink tree's peak memory (the ServerApp runs in the SuperLink's container).

The schedules: ``fixed`` (every 0.25 s, idle or not: fedcifar before the backoff), ``backoff``
(0.25 s while a run is active for the node, up to 3 s after ``hold`` s without one:
``flower.polling.PollSchedule``, the defaults), ``backoff-10s`` (idle up to 10 s) and ``busy-1s``
(every 1 s while busy). The growth
exponent of each figure is the slope of log(figure) against log(N). The last line printed is one
JSON object with every figure.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from fedcifar.common import procfs
from fedcifar.deploy import flwr_cli
from fedcifar.deploy.control import superlink_healthy
from fedcifar.deploy.pki import write_pki
from fedcifar.deploy.proxy import NGINX, proxy_config
from fedcifar.deploy.submit import wait_until
from fedcifar.experiments.harness import machine, make_subset
from fedcifar.flower.polling import (
    DEFAULT_IDLE_POLL_SECONDS,
    DEFAULT_POLL_HOLD_SECONDS,
    DEFAULT_POLL_SECONDS,
    IDLE_POLL_ENV,
    POLL_ENV,
    POLL_HOLD_ENV,
)
from fedcifar.local.federation import free_port
from fedcifar.server.history import load_history

console = Console(stderr=True)
SCHEDULES = {
    "fixed": {POLL_ENV: str(DEFAULT_POLL_SECONDS), IDLE_POLL_ENV: str(DEFAULT_POLL_SECONDS)},
    "backoff": {
        POLL_ENV: str(DEFAULT_POLL_SECONDS),
        IDLE_POLL_ENV: str(DEFAULT_IDLE_POLL_SECONDS),
        POLL_HOLD_ENV: str(DEFAULT_POLL_HOLD_SECONDS),
    },
    # for federations of hundreds of nodes per SuperLink core (README: Sizing)
    "backoff-10s": {
        POLL_ENV: str(DEFAULT_POLL_SECONDS),
        IDLE_POLL_ENV: "10",
        POLL_HOLD_ENV: str(DEFAULT_POLL_HOLD_SECONDS),
    },
    "busy-1s": {
        POLL_ENV: "1",
        IDLE_POLL_ENV: str(DEFAULT_IDLE_POLL_SECONDS),
        POLL_HOLD_ENV: str(DEFAULT_POLL_HOLD_SECONDS),
    },
}
SERVER_CPU, GENERATOR_CPU = {0}, {1}
# hollow nodes per generator process: 1,000 threads of one (and their heartbeat threads) thrash its
# GIL (they made 24 of the 333 polls a second asked; 500 made theirs at a quarter of a core)
GENERATOR_NODES = 500
FIGURES = {  # what the table, the plot and the exponents show: key -> (label, column)
    "superlink_cores": ("SuperLink CPU, idle (cores)", "SL cores"),
    "proxy_cores": ("proxy CPU, idle (cores)", "proxy cores"),
    "requests_per_second": ("Fleet requests/s, idle", "req/s"),
    "superlink_rss_mib": ("SuperLink RSS, idle (MiB)", "SL MiB"),
    "poll_p99_seconds": ("poll latency p99, idle (s)", "poll p99 s"),
    "first_round_seconds": ("first round after idle (s)", "round 1 s"),
    "round_seconds": ("round, warm (s)", "round s"),
    "server_ms_per_reply": ("server time per reply, warm (ms)", "ms/reply"),
    "active_rss_mib": ("SuperLink tree's peak RSS in the run (MiB)", "run MiB"),
}


@dataclass(frozen=True)
class ScaleConfig:
    nodes: tuple[int, ...] = (10, 100, 250, 500, 1000)
    schedules: tuple[str, ...] = ("fixed", "backoff")
    idle_seconds: float = 30.0
    rounds: int = 2
    proxy: bool = True
    server_test_examples: int = 1000  # the ServerApp's own evaluation: the same at every N


def pinned(cpus: set[int]) -> Callable[[], None] | None:
    """A ``preexec_fn`` keeping a process (and its children) on ``cpus``, where this machine has them."""
    if not hasattr(os, "sched_setaffinity") or not cpus <= os.sched_getaffinity(0):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class JsonLines:
    """The JSON lines a ``fedcifar hollow --json`` process prints, read as they come."""

    def __init__(self, stream: IO[str]):
        self.lines: list[dict] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith("{"):
                with self.changed:
                    self.lines.append(json.loads(line))
                    self.changed.notify_all()

    def next(self, event: str, after: int, timeout: float) -> dict:
        with self.changed:
            found = self.changed.wait_for(
                lambda: next((line for line in self.lines[after:] if line["event"] == event), None), timeout
            )
        if not found:
            raise TimeoutError(f"the hollow nodes said no {event!r} within {timeout:.0f} s")
        return found


def fleet_requests(metrics_port: int) -> float:
    """The Fleet requests the SuperLink has counted so far (every handler, every site)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fedcifar_fleet_requests_total"
    )


def cell(n: int, schedule: str, config: ScaleConfig, data: Path, out: Path) -> dict[str, Any]:
    """One row: N hollow nodes on ``schedule`` against a fresh SuperLink (and proxy)."""
    work = out / f"{schedule}-{n}"
    pki = write_pki(work / "pki", supernodes=0)
    control, metrics_port = free_port(), free_port()
    env = {**os.environ, **SCHEDULES[schedule], "FLWR_HOME": str(work / "flwr"), "FEDCIFAR_DATA": str(data)}
    for key in set(SCHEDULES["backoff"]) - set(SCHEDULES[schedule]):
        env.pop(key, None)
    procs: list[subprocess.Popen] = []

    def spawn(name: str, command: list[str], cpus: set[int], **kwargs) -> subprocess.Popen:
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - the process's log, closed with it
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(command, cwd=work, env=env, stderr=log, preexec_fn=pinned(cpus), **kwargs)
        procs.append(proc)
        return proc

    files = {"ca-cert": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
    tls = [f"--ssl-{name}file={pki / file}" for name, file in files.items()]
    superlink = spawn(
        "superlink",
        [
            *(sys.executable, "-m", "fedcifar", "superlink", "--host", "127.0.0.1", "--port", str(control)),
            *("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", *tls),
            *("--enable-supernode-auth", "--disable-runtime-dependency-installation"),
        ],
        SERVER_CPU,
    )
    public, proxy = control, None
    try:
        if config.proxy:
            public = free_port()
            (work / "nginx.conf").write_text(proxy_config(public, control, pki, work, free_port()))
            (work / "state").mkdir()
            nginx = [NGINX, "-e", "stderr", "-c", str(work / "nginx.conf"), "-g", "daemon off;"]
            proxy = spawn("nginx", nginx, SERVER_CPU)
        address = f"127.0.0.1:{control}"
        wait_until("the SuperLink", lambda: superlink_healthy(address, str(pki / "ca.crt")), 120, interval=0.5)
        flwr_cli.write_connection(work / "flwr", flwr_cli.CONNECTION, address, str(pki / "ca.crt"))
        generators = [
            spawn(
                f"hollow-{first}",
                [
                    *(sys.executable, "-m", "fedcifar", "hollow", "--superlink", f"127.0.0.1:{public}"),
                    *("--control", address, "--root-certificates", str(pki / "ca.crt"), "--json"),
                    *("--nodes", str(min(GENERATOR_NODES, n - first)), "--first-slot", str(first), "--slots", str(n)),
                    *(
                        "--train-size",
                        str(config.server_test_examples),
                        "--test-size",
                        str(config.server_test_examples),
                    ),
                ],
                GENERATOR_CPU,
                stdout=subprocess.PIPE,
                text=True,
            )
            for first in range(0, n, GENERATOR_NODES)
        ]
        said = [JsonLines(generator.stdout) for generator in generators]
        activation = max(lines.next("active", 0, 60 + n / 5)["seconds"] for lines in said)
        row = {"nodes": n, "schedule": schedule, "activation_seconds": activation, "generators": len(generators)}
        row |= idle_figures(n, schedule, config, superlink, proxy, generators, said, metrics_port)
        if config.rounds:
            row |= active_figures(n, config, superlink, work, env)
        return row
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def idle_figures(n, schedule, config, superlink, proxy, generators, said, metrics_port: int) -> dict[str, Any]:
    """CPU, memory and requests of the SuperLink and the proxy while N nodes poll and no run is active."""
    # the activations' last requests, and the hold of nodes just started (they start busy)
    time.sleep(5 + float(SCHEDULES[schedule].get(POLL_HOLD_ENV, 0)))

    def windows() -> list[dict]:  # what each generator's nodes did since the last one (SIGUSR1)
        seen = [len(lines.lines) for lines in said]
        for generator in generators:
            os.kill(generator.pid, signal.SIGUSR1)
        return [lines.next("window", after, 30) for lines, after in zip(said, seen, strict=True)]

    server = procfs.tree_pids(superlink.pid)
    proxies = procfs.tree_pids(proxy.pid) if proxy else []
    pids = (server, proxies, [generator.pid for generator in generators])
    windows()  # the polls' figures start here
    before = [procfs.cpu_seconds(group) for group in pids]
    requests, started = fleet_requests(metrics_port), time.monotonic()
    time.sleep(config.idle_seconds)
    now = [procfs.cpu_seconds(group) for group in pids]
    requests, seconds = fleet_requests(metrics_port) - requests, time.monotonic() - started
    window = windows()
    cores = [(b - a) / seconds for a, b in zip(before, now, strict=True)]
    interval = float(SCHEDULES[schedule][IDLE_POLL_ENV])
    return {
        "superlink_cores": round(cores[0], 4),
        "proxy_cores": round(cores[1], 4),
        "generator_cores": round(cores[2], 3),
        "requests_per_second": round(requests / seconds, 1),
        "polls_asked_per_second": round(n / interval, 1),
        "polls_made_per_second": round(sum(w["polls"] for w in window) / seconds, 1),
        # per generator's quantiles: the p50 of the median one, the highest p99
        "poll_p50_seconds": sorted(w["poll_p50_seconds"] or 0 for w in window)[len(window) // 2],
        "poll_p99_seconds": max(w["poll_p99_seconds"] or 0 for w in window),
        "superlink_rss_mib": round(sum(procfs.process_memory(pid) for pid in server) / 2**20, 1),
        "proxy_rss_mib": round(sum(procfs.process_memory(pid) for pid in proxies) / 2**20, 1),
    }


def active_figures(n: int, config: ScaleConfig, superlink, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """A run in which every one of the N nodes trains each round: round times, the tree's peak memory."""
    out = work / "run"
    pairs = {"num-partitions": n, "min-nodes": n, "num-server-rounds": config.rounds, "out-dir": str(out)}
    reply = flwr_cli.flwr_json(
        "run",
        str(Path(__file__).resolve().parents[2]),
        flwr_cli.CONNECTION,
        "--run-config",
        " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items()),
        env=env,
        flwr_home=work / "flwr",
    )
    if not reply.get("success"):
        raise RuntimeError(f"flwr run failed: {reply}")
    run_id, peak, status = str(reply["run-id"]), 0, ""

    def finished() -> bool:
        nonlocal peak, status
        peak = max(peak, procfs.tree_rss(superlink.pid))
        runs = flwr_cli.flwr_json("ls", flwr_cli.CONNECTION, "--run-id", run_id, env=env, flwr_home=work / "flwr")
        status = str((runs.get("runs") or [{}])[0].get("status", ""))
        return status.startswith("finished")

    wait_until(f"run {run_id}", finished, 600 + 2 * n, interval=1)
    if status != "finished:completed":
        (work / "run.log").write_text(
            flwr_cli.flwr("log", run_id, flwr_cli.CONNECTION, "--show", env=env, flwr_home=work / "flwr").stdout
        )
        raise RuntimeError(f"run {run_id} ended {status}: see {work}/run.log")
    rounds = [r["round_seconds"] for r in load_history(out)["rounds"]]
    warm = rounds[1:] or rounds
    return {
        "first_round_seconds": round(rounds[0], 2),
        "round_seconds": round(sum(warm) / len(warm), 2),
        "server_ms_per_reply": round(1000 * sum(warm) / len(warm) / n, 2),
        "active_rss_mib": round(peak / 2**20, 1),
    }


def exponent(rows: list[dict], key: str) -> float | None:
    """The slope of log(figure) against log(N), least squares (None: fewer than two positive figures)."""
    points = [(math.log(r["nodes"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    mx, my = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return round(sum((x - mx) * (y - my) for x, y in points) / sxx, 2) if sxx else None


def scale(config: ScaleConfig, data: str | None, out: Path) -> dict[str, Any]:
    if config.proxy and NGINX is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx); or run with --no-proxy")
    out.mkdir(parents=True, exist_ok=True)
    subset = make_subset(data, config.server_test_examples, config.server_test_examples, out / "data")
    rows: list[dict] = []
    for n in config.nodes:
        for schedule in config.schedules:
            console.print(f"[bold]scale: {n} hollow SuperNodes, {schedule} polling[/]")
            try:
                rows.append(cell(n, schedule, config, subset, out))
            except (TimeoutError, RuntimeError) as err:  # the row says where this machine stopped, and why
                rows.append({"nodes": n, "schedule": schedule, "error": str(err)})
            console.print(rows[-1])
    exponents = {
        schedule: {key: exponent([r for r in rows if r["schedule"] == schedule], key) for key in FIGURES}
        for schedule in config.schedules
    }
    return {"machine": machine(), "config": asdict(config), "rows": rows, "exponents": exponents}


def plot(result: dict[str, Any], path: Path) -> None:
    """Each figure against N, log-log, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(FIGURES)
    colors = {schedule: f"C{i}" for i, schedule in enumerate(result["exponents"])}  # the same in every panel
    fig, axes = plt.subplots(3, 3, figsize=(13, 11))
    for ax, key in zip(axes.flat, keys, strict=True):
        for schedule, exps in result["exponents"].items():
            rows = [r for r in result["rows"] if r["schedule"] == schedule and r.get(key)]
            if rows:
                label = f"{schedule} (exponent {exps[key]})" if exps[key] is not None else schedule
                nodes, values = [r["nodes"] for r in rows], [r[key] for r in rows]
                ax.plot(nodes, values, marker="o", label=label, color=colors[schedule])
        ax.set(xscale="log", yscale="log", title=FIGURES[key][0], xlabel="hollow SuperNodes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"One SuperLink (TLS, auth, Fleet guard, nginx) against N hollow SuperNodes\n{result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_report(result: dict[str, Any]) -> None:
    table = Table(title="fedcifar scale")
    for column in ("N", "polling", *(column for _, column in FIGURES.values()), "gen. cores", "polls/s made/asked"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        if "error" in r:
            table.add_row(str(r["nodes"]), r["schedule"], f"[red]{r['error']}[/]")
            continue
        made = f"{r['polls_made_per_second']}/{r['polls_asked_per_second']}"
        table.add_row(
            str(r["nodes"]), r["schedule"], *(str(r.get(k, "—")) for k in FIGURES), str(r["generator_cores"]), made
        )
    Console(stderr=True, width=max(console.width, 170)).print(table)  # a row per cell: wider than a terminal
    console.print(f"growth exponents: {result['exponents']}")
    print(json.dumps(result), flush=True)
