"""The ``fedcifar`` command line.

fedcifar run --clients 2 --rounds 3              # local federation: SuperLink + 2 SuperNodes
fedcifar centralized --epochs 2 --json           # the centralized baseline
fedcifar superlink --metrics-port 9400 --insecure --host 0.0.0.0   # a node, e.g. in a pod (Fleet guard inside)
fedcifar supernode --partition-id auto --num-partitions 3 --superlink HOST:8000 --insecure
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcifar.config import SPLITS, RunConfig, app_defaults, check_site, parse_overrides
from fedcifar.fleet_guard import GuardSettings
from fedcifar.flower_tuning import DEFAULT_POLL_SECONDS, POLL_ENV
from fedcifar.isolation import IsolationError
from fedcifar.metrics import DEFAULT_SITE, SITE_ENV
from fedcifar.niid_bench import CELLS, Protocol

console = Console(stderr=True)
APP_DIR = Path(__file__).resolve().parent.parent  # the project holding [tool.flwr.app]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to execute again in a private network
    if extra and args.command not in ("superlink", "supernode"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra)
    except (ValueError, FileNotFoundError, IsolationError) as err:  # ConfigError, DataError: messages say what to do
        console.print(f"[bold red]error:[/] {err}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcifar", description="Federated CIFAR-10 with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a local federation (SuperLink + SuperNodes as processes)")
    run.add_argument("--clients", type=int, default=None, help="number of SuperNodes (default 2)")
    run.add_argument("--rounds", type=int, default=None, help="rounds (default: num-server-rounds)")
    run.add_argument(
        "--data", help="CIFAR-10 folder (parquet or cifar-10-batches-py); default $FEDCIFAR_DATA or the hub"
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="output folder (default: a new folder under runs/)")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run whose outputs are in DIR after its last completed round",
    )
    run.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [tool.flwr.app.config] value, e.g. -c learning-rate=0.05",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="server metrics port; client i uses PORT+1+i (default: free ports)",
    )
    run.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="keep the federation and its metrics endpoints up this many seconds after the run",
    )
    run.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder (default: this project)")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP and no SuperNode authentication (default: TLS with a throwaway CA, signed nodes); "
        "without authentication a node is whoever it claims to be",
    )
    add_shared_network(run)
    run.set_defaults(handler=cmd_run)

    cen = sub.add_parser("centralized", help="train the CNN centrally (the original cifar.py)")
    cen.add_argument("--epochs", type=int, default=2)
    cen.add_argument("--data", help="CIFAR-10 folder; default $FEDCIFAR_DATA or the hub")
    cen.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    cen.add_argument("--learning-rate", "--lr", type=float, default=RunConfig.learning_rate)
    cen.add_argument("--momentum", type=float, default=RunConfig.momentum)
    cen.add_argument("--seed", type=int, default=RunConfig.seed)
    cen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    cen.add_argument("--augment", action="store_true", help="random crop + horizontal flip, batched on the device")
    cen.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    cen.set_defaults(handler=cmd_centralized)

    b = sub.add_parser("bench", help="stock Flower vs fedcifar vs centralized, side by side (JSON last line)")
    b.add_argument("--quick", action="store_true", help="2 clients x 5,000 images, 1 local epoch, 2 rounds")
    b.add_argument("--clients", type=int, default=2)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--examples-per-client", type=int, default=5000)
    b.add_argument("--test-examples", type=int, default=10000, help="server-side test images (default: all)")
    b.add_argument("--local-epochs", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--no-stock", action="store_true", help="skip the stock Flower baseline")
    b.add_argument(
        "--insecure", action="store_true", help="fedcifar's federation without TLS and SuperNode authentication"
    )
    b.add_argument("--augment", action="store_true", help="augmentation for fedcifar and centralized")
    b.add_argument("--scale", default="", help="also time rounds for these SuperNode counts, e.g. 2,4,8,16")
    b.add_argument("--data", help="CIFAR-10 parquet folder; default $FEDCIFAR_DATA or the hub")
    b.add_argument("--out", type=Path, help="work folder (default: a new folder under runs/)")
    add_shared_network(b)
    b.set_defaults(handler=cmd_bench)

    nb = sub.add_parser("niid-bench", help="the NIID-Bench table: FedAvg, FedProx, FedAdam on IID and Dirichlet(0.5)")
    nb.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(CELLS)}")
    nb.add_argument("--clients", type=int, default=Protocol.clients)
    nb.add_argument("--rounds", type=int, default=Protocol.rounds)
    nb.add_argument("--local-epochs", type=int, default=Protocol.local_epochs)
    nb.add_argument("--train-examples", type=int, default=Protocol.train_examples, help="the first N (default: all)")
    nb.add_argument("--seed", type=int, default=Protocol.seed)
    nb.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    nb.add_argument("--data", help="CIFAR-10 parquet folder; default $FEDCIFAR_DATA or the hub")
    nb.add_argument("--out", type=Path, help="work folder (default: a new folder under runs/)")
    add_shared_network(nb)
    nb.set_defaults(handler=cmd_niid_bench)

    so = sub.add_parser("soak", help="many rounds locally: failed rounds and node memory growth (JSON last line)")
    so.add_argument("--clients", type=int, default=2)
    so.add_argument("--rounds", type=int, default=250, help="two messages per node and round")
    so.add_argument("--examples-per-client", type=int, default=2500)
    so.add_argument("--test-examples", type=int, default=2000)
    so.add_argument("--baseline-round", type=int, default=5, help="memory growth is measured against this round")
    so.add_argument("--max-growth", type=float, default=0.10, help="fail above this memory growth (0.10: 10%%)")
    so.add_argument("--data", help="CIFAR-10 parquet folder; default $FEDCIFAR_DATA or the hub")
    so.add_argument("--out", type=Path, help="work folder (default: a new folder under runs/)")
    add_shared_network(so)
    so.set_defaults(handler=cmd_soak)

    sub_ = sub.add_parser("submit", help="wait for a SuperLink and its clients, then flwr run (the chart's run Job)")
    sub_.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT (/health; also Control)")
    sub_.add_argument(
        "--control-pod-selector",
        metavar="LABELS",
        help="reach the Control API through a port-forward to the pod these labels pick (in-cluster)",
    )
    sub_.add_argument("--control-port", type=int, default=9093, help="Flower's port on that pod's loopback")
    sub_.add_argument("--app", default=str(APP_DIR), help="Flower app folder (default: this project)")
    sub_.add_argument("--run-config", default="", help="'key=value ...' run config overrides (TOML values)")
    sub_.add_argument(
        "--client-metrics",
        nargs="*",
        default=[],
        metavar="URL",
        help="metrics URLs of every expected client; waits until each reports --num-partitions",
    )
    sub_.add_argument("--num-partitions", type=int, default=None)
    sub_.add_argument(
        "--min-nodes",
        type=int,
        default=0,
        help="also wait until the SuperLink lists this many SuperNodes online (other sites')",
    )
    sub_.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    sub_.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="seconds to follow the run's logs before giving up (default: until it ends)",
    )
    sub_.add_argument("--no-stream", action="store_true", help="return after submitting instead of streaming logs")
    sub_.set_defaults(handler=cmd_submit)

    for role, flower in (("superlink", "flower-superlink"), ("supernode", "flower-supernode")):
        node = sub.add_parser(role, help=f"run {flower} with a Prometheus endpoint; other options go to {flower}")
        node.add_argument("--metrics-port", type=int, default=9400)
        node.add_argument("--metrics-host", default="0.0.0.0")
        node.add_argument("--metrics-dir", help="multiprocess metrics folder (default: a temporary one)")
        node.add_argument(
            "--metrics-fd",
            type=int,
            help="serve metrics on this inherited listening socket instead (fedcifar run's private network)",
        )
        if role == "superlink":
            guard = GuardSettings()
            node.add_argument(
                "--behind-proxy",
                action="store_true",
                help="a proxy is this SuperLink's public face (the chart's nginx): Flower listens on loopback only",
            )
            node.add_argument(
                "--fleet-max-reply-bytes",
                type=int,
                default=guard.max_reply_bytes,
                help="Fleet guard: the most a reply may hold in a run whose ServerApp set no layout of its own",
            )
            node.add_argument(
                "--fleet-max-reply-objects",
                type=int,
                default=guard.max_reply_objects,
                help="Fleet guard: the most objects a reply may hold in such a run",
            )
            node.add_argument(
                "--fleet-site-held-bytes",
                type=int,
                default=guard.site_held_bytes,
                help="Fleet guard: the most bytes of one site's replies the SuperLink holds at a time",
            )
        if role == "supernode":
            node.add_argument(
                "--partition-id",
                default="auto",
                help="this node's ordinal in its site, or 'auto' for the StatefulSet ordinal",
            )
            node.add_argument(
                "--partition-offset",
                type=int,
                default=0,
                help="the site's first slot: this node holds slot offset + ordinal",
            )
            node.add_argument("--num-partitions", type=int, required=True, help="node slots in the federation")
            node.add_argument(
                "--split",
                choices=SPLITS,
                default="global",
                help="global: train the slot's slice of the data; site: slice <ordinal> of "
                "--site-partitions of this site's own data",
            )
            node.add_argument("--site-partitions", type=int, help="SuperNodes of this site (--split site)")
            node.add_argument("--site", default=DEFAULT_SITE, help="this site's name (metrics label $FEDCIFAR_SITE)")
            node.add_argument("--data", help="CIFAR-10 folder on this node (node config data-path)")
        node.set_defaults(handler=cmd_node, role=role, flower=flower)
    return parser


def add_shared_network(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-network",
        action="store_true",
        help="run the federation on this machine's own loopback, where every local user can reach its "
        "SuperLink (default: a private network namespace; see the README's Security)",
    )


def own_network(args: argparse.Namespace, data: str | None, metrics_ports: list[int] | None = None) -> None:
    """Go on in a private network namespace, where no other user reaches the federation's Flower ports
    (``isolation.py``): this process is executed again there, unless --shared-network."""
    from fedcifar import isolation
    from fedcifar.data import load_split, resolve_source

    if isolation.inside():
        isolation.enter_loopback()
        return
    if args.shared_network:
        return
    source = resolve_source(data)
    if source.kind == "hub":  # the namespace has no route out: fill the cache first
        for split in ("train", "test"):
            load_split(source, split)
    isolation.reexecute(args.argv, metrics_ports)


def cmd_node(args: argparse.Namespace, extra: list[str]) -> int:
    from fedcifar.flwr_cli import flower_binary
    from fedcifar.node import check_superlink_args, node_config, resolve_ordinal, run_node

    command, trainer, guard = [flower_binary(args.flower), *extra], None, None
    if args.role == "superlink":
        check_superlink_args(extra, os.environ, args.behind_proxy)
        guard = GuardSettings(
            poll_interval=float(os.environ.get(POLL_ENV) or DEFAULT_POLL_SECONDS),
            max_reply_bytes=args.fleet_max_reply_bytes,
            max_reply_objects=args.fleet_max_reply_objects,
            site_held_bytes=args.fleet_site_held_bytes,
        )
        # stock flower-superlink, with the Fleet guard around its Fleet handlers (see flower_tuning.py)
        command = [sys.executable, "-m", "fedcifar.flower_tuning", "superlink", *extra]
    if args.role == "supernode":
        if any(a.startswith("--node-config") for a in extra):
            raise ValueError("fedcifar supernode sets --node-config itself: use --partition-id/--num-partitions/--data")
        check_site(args.site)
        ordinal = resolve_ordinal(args.partition_id)
        partition = args.partition_offset + ordinal
        data_partition = None
        if args.split == "site":
            if args.site_partitions is None:
                raise ValueError("--split site needs --site-partitions: the number of this site's SuperNodes")
            data_partition = (ordinal, args.site_partitions)
        config = node_config(partition, args.num_partitions, args.data, data_partition)
        os.environ[SITE_ENV] = args.site  # the site label of every metric this node and its children write
        # stock flower-supernode, with its idle polling shortened (see flower_tuning.py)
        command = [sys.executable, "-m", "fedcifar.flower_tuning", "supernode", *extra, "--node-config", config]
        trains = f", training slice {ordinal} of {args.site_partitions} of its data" if data_partition else ""
        print(f"fedcifar: site {args.site}, slot {partition} of {args.num_partitions}{trains}", flush=True)
        trainer = [
            sys.executable,
            "-m",
            "fedcifar.trainer",
            "--partition-id",
            str(partition),
            "--num-partitions",
            str(args.num_partitions),
        ]
    return run_node(command, args.metrics_port, args.metrics_host, args.metrics_dir, trainer, guard, args.metrics_fd)


def cmd_bench(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.bench import BenchConfig, bench, print_report, timestamped_out

    signal.signal(signal.SIGTERM, _interrupt)
    own_network(args, args.data)
    if args.quick:
        args.clients, args.rounds, args.examples_per_client, args.local_epochs = 2, 2, 5000, 1
    scale = tuple(int(n) for n in args.scale.split(",") if n.strip())
    if args.clients < 1 or args.rounds < 2 or min(scale, default=1) < 1:
        raise ValueError("bench needs --clients >= 1, --rounds >= 2 (round 1 is warm-up) and positive --scale counts")
    config = BenchConfig(
        clients=args.clients,
        rounds=args.rounds,
        examples_per_client=args.examples_per_client,
        test_examples=args.test_examples,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        device=args.device,
        augment=args.augment,
        stock=not args.no_stock,
        signed=not args.insecure,
        scale=scale,
    )
    print_report(bench(config, args.data, timestamped_out(args.out)))
    return 0


def cmd_niid_bench(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.bench import timestamped_out
    from fedcifar.niid_bench import niid_bench, print_table

    signal.signal(signal.SIGTERM, _interrupt)
    own_network(args, args.data)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise ValueError(f"--cells takes some of {', '.join(CELLS)}, got {args.cells!r}")
    if min(args.clients, args.rounds, args.local_epochs, args.train_examples) < 1:
        raise ValueError("niid-bench needs --clients, --rounds, --local-epochs and --train-examples >= 1")
    protocol = Protocol(
        args.clients, args.rounds, args.local_epochs, args.train_examples, seed=args.seed, device=args.device
    )
    print_table(niid_bench(protocol, cells, args.data, timestamped_out(args.out)))
    return 0


def cmd_soak(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.bench import timestamped_out
    from fedcifar.soak import SoakConfig, report, soak

    signal.signal(signal.SIGTERM, _interrupt)
    own_network(args, args.data)
    if args.clients < 1 or args.rounds <= args.baseline_round or args.baseline_round < 1:
        raise ValueError("soak needs --clients >= 1 and --rounds > --baseline-round >= 1")
    config = SoakConfig(
        clients=args.clients,
        rounds=args.rounds,
        examples_per_client=args.examples_per_client,
        test_examples=args.test_examples,
        baseline_round=args.baseline_round,
        max_growth=args.max_growth,
    )
    return report(soak(config, args.data, timestamped_out(args.out)))


def cmd_submit(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.portforward import PortForwardError
    from fedcifar.submit import NotReady, submit

    try:
        return submit(
            app=args.app,
            superlink=args.superlink,
            run_config=args.run_config,
            client_metrics=args.client_metrics,
            num_partitions=args.num_partitions,
            timeout=args.timeout,
            stream=not args.no_stream,
            control_pod_selector=args.control_pod_selector,
            control_port=args.control_port,
            min_nodes=args.min_nodes,
            run_timeout=args.run_timeout,
        )
    except (NotReady, PortForwardError) as err:
        console.print(f"[bold red]error:[/] {err}")
        return 1


def cmd_centralized(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.centralized import run_centralized
    from fedcifar.data import resolve_source
    from fedcifar.task import Recipe

    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    RunConfig(batch_size=args.batch_size, learning_rate=args.learning_rate, momentum=args.momentum).check()
    source = resolve_source(args.data)
    console.print(f"centralized: {args.epochs} epochs on {source.describe()}")
    result = run_centralized(
        source,
        Recipe(args.epochs, args.batch_size, args.learning_rate, args.momentum, augmented=args.augment),
        seed=args.seed,
        device=args.device,
        on_epoch=lambda e, loss: console.print(f"  epoch {e}: train loss {loss:.4f}"),
    )
    console.print(
        f"test accuracy {100 * result.test_accuracy:.2f}%  test loss {result.test_loss:.4f}  "
        f"{result.seconds:.1f}s ({result.train_seconds:.1f}s training on {result.device})"
    )
    if args.json:
        print(json.dumps(asdict(result)))
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar import isolation
    from fedcifar.data import load_split, resolve_source
    from fedcifar.local import FederationError, LocalFederation

    signal.signal(signal.SIGTERM, _interrupt)  # a stop request cleans up like Ctrl-C

    said = isolation.inside()  # what the checks below say was said once, before the private network
    app_dir = args.app.resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} holds no pyproject.toml: pass --app with the fedcifar project folder")
    defaults = app_defaults(app_dir)
    overrides = parse_overrides(args.run_config)  # checked with the defaults below, before anything starts
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    data_arg = args.data
    if args.resume:
        out_dir = args.resume.resolve()
        history = resumed_history(out_dir)
        overrides = {**history["config"], "resume": True, **overrides}
        clients = args.clients if args.clients is not None else overrides.get("num-partitions") or 2
        if not data_arg and (data_arg := recorded_data(history)) and not said:
            console.print(f"data: {data_arg}, as recorded in {out_dir / 'history.json'} (--data PATH overrides it)")
    else:
        out_dir = (args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
        if (out_dir / "model.pt").exists():
            raise ValueError(
                f"{out_dir} holds a run already: continue it with --resume {out_dir}, or pick another --out"
            )
        clients = args.clients if args.clients is not None else 2
        overrides = {**federation_defaults(clients), **overrides}
    if clients < 1:
        raise ValueError(f"--clients must be >= 1, got {clients}")
    overrides["out-dir"] = str(out_dir)
    config = RunConfig.from_flower({**defaults, **overrides})
    if args.resume:
        done = check_resumable(out_dir, config)
        if not said:
            console.print(f"resuming {out_dir} after round {done} of {config.num_server_rounds}")
    source = resolve_source(data_arg)  # refuse a bad path before starting anything
    load_split(source, "test")  # ... and data that is not CIFAR-10, or a Hub out of reach
    data = source.location if source.kind != "hub" else None
    own_network(args, data_arg, metrics_ports(args.metrics_port, clients) or [0] * (clients + 1))
    metrics_sockets = isolation.inherited_metrics_sockets()
    network = "a private network" if isolation.inside() else "this machine's loopback, open to every local user"
    console.print(
        f"fedcifar: {clients} SuperNodes on {network}, {config.num_server_rounds} rounds, "
        f"{config.partitioner} partitions, data {source.describe()}, outputs in {out_dir}"
    )
    fed = LocalFederation(
        clients=clients,
        app_dir=app_dir,
        work_dir=out_dir,
        data=data,
        metrics_ports=None if metrics_sockets else metrics_ports(args.metrics_port, clients),
        metrics_sockets=metrics_sockets,
        signed=not args.insecure,
    )
    if args.insecure:
        console.print(
            "[yellow]--insecure:[/] plain HTTP and no SuperNode authentication: any local process can act as any "
            "node, and the SuperLink's Fleet guard cannot tell them apart"
        )
    try:
        with fed:
            console.print(
                f"metrics: server http://127.0.0.1:{fed.metrics_ports[0]}/metrics, clients "
                + ", ".join(str(p) for p in fed.metrics_ports[1:])
            )
            run_id = fed.submit(overrides)
            history = follow_with_progress(fed, run_id, out_dir, config.num_server_rounds)
            fed.sample_memory()
            if args.linger > 0:
                console.print(f"keeping the federation up {args.linger:.0f}s (--linger)")
                time.sleep(args.linger)
    except FederationError as err:
        console.print(f"[bold red]federation failed:[/] {err}\nlogs: {out_dir / 'logs'}")
        if (out_dir / "model.pt").exists():
            console.print(f"completed rounds are checkpointed: continue with fedcifar run --resume {out_dir}")
        return 1
    print_summary(history, fed.peak_rss, out_dir)
    return 0


def resumed_history(out_dir: Path) -> dict:
    """The history of the run in ``out_dir``, to resume it (its run config, its data source)."""
    from fedcifar.history import load_history

    history = load_history(out_dir) if out_dir.is_dir() else None
    if history is None:
        raise FileNotFoundError(f"{out_dir} holds no history.json: nothing to resume; start a run with --out {out_dir}")
    return history


def recorded_data(history: dict) -> str | None:
    """The data folder a run was started with (``history.json``'s ``data``: ``parquet:PATH``,
    ``cifar-python:PATH`` or ``hub:...``); None for the Hub."""
    kind, _, location = str(history.get("data", "")).partition(":")
    return location if kind in ("parquet", "cifar-python") and location else None


def check_resumable(out_dir: Path, config: RunConfig) -> int:
    """Refuse, before anything starts, what the ServerApp would refuse: a bad checkpoint, nothing left to do;
    return the last completed round."""
    from fedcifar.checkpoint import check_same_training, load_checkpoint
    from fedcifar.task import Net

    checkpoint = load_checkpoint(out_dir, Net().state_dict())  # a corrupt one is refused here, untouched
    if checkpoint:
        check_same_training(checkpoint, config.training_fingerprint(), out_dir)
    done, rounds = (checkpoint.round if checkpoint else 0), config.num_server_rounds
    if done >= rounds:
        raise ValueError(
            f"the run in {out_dir} completed {done} of {rounds} rounds: pass --rounds N (> {done}) to train further"
        )
    return done


def federation_defaults(clients: int) -> dict:
    """Wait for all local SuperNodes, and check they split the data the same way (-c overrides)."""
    return {"min-nodes": clients, "num-partitions": clients}


def metrics_ports(base: int | None, clients: int) -> list[int] | None:
    return None if base is None else [base + i for i in range(clients + 1)]


def round_table(rows: list[dict]) -> Table:
    table = Table(title="rounds", title_justify="left")
    for name in ("round", "train loss", "eval loss", "eval accuracy", "round s", "clients"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["round"]),
            f"{r['train_loss']:.4f}",
            f"{r['eval_loss']:.4f}",
            f"{100 * r['eval_accuracy']:.2f}%",
            f"{r['round_seconds']:.1f}",
            str(r["participating_clients"]),
        )
    return table


def follow_with_progress(fed, run_id: int, out_dir: Path, rounds: int) -> dict:
    """Follow the run: a progress bar and the round table, live on a terminal, line by line otherwise."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[dict] = []
    progress = Progress(
        TextColumn(f"run {run_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("rounds", total=rounds)
    live = Live(
        Group(progress, round_table(rows)),
        console=console,
        refresh_per_second=4,
        transient=False,
        auto_refresh=console.is_terminal,
    )

    def on_round(record: dict) -> None:
        rows.append(record)
        progress.update(task, completed=len(rows))
        if console.is_terminal:
            live.update(Group(progress, round_table(rows)))
        else:
            console.print(
                f"round {record['round']}/{rounds}: train loss {record['train_loss']:.4f}, "
                f"eval loss {record['eval_loss']:.4f}, eval accuracy {100 * record['eval_accuracy']:.2f}%, "
                f"{record['round_seconds']:.1f}s, {record['participating_clients']} clients"
            )

    def notice(text: str) -> None:
        console.print(f"[yellow]{text}[/]")

    if not console.is_terminal:
        return fed.follow(run_id, out_dir, on_round, on_notice=notice)
    with live:
        return fed.follow(run_id, out_dir, on_round, on_notice=notice)


def print_summary(history: dict, peak_rss: dict[str, int], out_dir: Path) -> None:
    rounds = history["rounds"]
    if not console.is_terminal:  # on a terminal the live table is still on screen
        console.print(round_table(rounds))
    if rounds:
        last = rounds[-1]
        console.print(f"final eval accuracy {100 * last['eval_accuracy']:.2f}%, eval loss {last['eval_loss']:.4f}")
    if peak_rss:
        console.print("peak RSS: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(peak_rss.items())))
    console.print(f"outputs: {out_dir / 'history.json'}, {out_dir / 'model.pt'}, {out_dir / 'history.png'}")


if __name__ == "__main__":
    sys.exit(main())
