"""The experiments: ``centralized``, ``bench``, ``niid-bench``, ``soak``, ``scale``."""

from __future__ import annotations

import argparse
import json
import signal
from dataclasses import asdict
from pathlib import Path

from fedcifar.cli.common import add_shared_network, console, interrupt, own_network
from fedcifar.config import DEVICES, RunConfig
from fedcifar.experiments.niid_bench import CELLS, Protocol


def add_parsers(sub) -> None:
    cen = sub.add_parser("centralized", help="train the CNN centrally (the original cifar.py)")
    cen.add_argument("--epochs", type=int, default=2)
    cen.add_argument("--data", help="CIFAR-10 folder; default $FEDCIFAR_DATA or the hub")
    cen.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    cen.add_argument("--learning-rate", "--lr", type=float, default=RunConfig.learning_rate)
    cen.add_argument("--momentum", type=float, default=RunConfig.momentum)
    cen.add_argument("--seed", type=int, default=RunConfig.seed)
    cen.add_argument("--device", choices=DEVICES, default="auto")
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
    b.add_argument("--device", choices=DEVICES, default="auto")
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
    nb.add_argument("--device", choices=DEVICES, default="auto")
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

    sc = sub.add_parser(
        "scale", help="one SuperLink (TLS, auth, guard, nginx) against N hollow SuperNodes: idle and active costs"
    )
    sc.add_argument("--nodes", default="10,100,250,500,1000", help="hollow SuperNode counts, comma-separated")
    sc.add_argument(
        "--schedules",
        default="fixed,backoff",
        help="poll schedules: fixed (0.25 s), backoff (to 3 s), backoff-10s, busy-1s (see experiments/scale.py)",
    )
    sc.add_argument("--idle-seconds", type=float, default=30.0, help="the idle window measured")
    sc.add_argument("--rounds", type=int, default=2, help="rounds of the run (1: the first after idle; 0: no run)")
    sc.add_argument("--no-proxy", action="store_true", help="no nginx in front (the SuperLink's port directly)")
    sc.add_argument("--plot", type=Path, help="write the log-log plot of every figure against N here (PNG)")
    sc.add_argument("--data", help="CIFAR-10 parquet folder for the ServerApp; default $FEDCIFAR_DATA or the hub")
    sc.add_argument("--out", type=Path, help="work folder (default: a new folder under runs/)")
    add_shared_network(sc)
    sc.set_defaults(handler=cmd_scale)


def cmd_bench(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.experiments.bench import BenchConfig, bench, print_report
    from fedcifar.experiments.harness import timestamped_out

    signal.signal(signal.SIGTERM, interrupt)
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
    from fedcifar.experiments.harness import timestamped_out
    from fedcifar.experiments.niid_bench import niid_bench, print_table

    signal.signal(signal.SIGTERM, interrupt)
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
    from fedcifar.experiments.harness import timestamped_out
    from fedcifar.experiments.soak import SoakConfig, report, soak

    signal.signal(signal.SIGTERM, interrupt)
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


def cmd_centralized(args: argparse.Namespace, _extra: list[str]) -> int:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    RunConfig(batch_size=args.batch_size, learning_rate=args.learning_rate, momentum=args.momentum).check()
    from fedcifar.data import resolve_source  # torch: after the checks above, which need none
    from fedcifar.experiments.centralized import run_centralized
    from fedcifar.task import Recipe

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


def cmd_scale(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.experiments.harness import timestamped_out
    from fedcifar.experiments.scale import SCHEDULES, ScaleConfig, plot, print_report, scale

    nodes = tuple(int(n) for n in args.nodes.split(",") if n.strip())
    schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
    if not nodes or min(nodes) < 1 or args.rounds < 0 or args.idle_seconds <= 0:
        raise ValueError("scale needs positive --nodes counts, --rounds >= 0 and --idle-seconds > 0")
    if not schedules or set(schedules) - set(SCHEDULES):
        raise ValueError(f"--schedules takes some of {', '.join(SCHEDULES)}, got {args.schedules!r}")
    signal.signal(signal.SIGTERM, interrupt)
    own_network(args, args.data)
    config = ScaleConfig(nodes, schedules, args.idle_seconds, args.rounds, not args.no_proxy)
    result = scale(config, args.data, timestamped_out(args.out))
    if args.plot:
        plot(result, args.plot)
    print_report(result)
    return 1 if any("error" in row for row in result["rows"]) else 0
