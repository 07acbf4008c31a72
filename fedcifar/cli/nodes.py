"""``fedcifar superlink`` and ``fedcifar supernode``: Flower's nodes with a metrics endpoint (``node/process.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fedcifar.config import NODE_DATA_SPLITS, check_site
from fedcifar.flower.polling import DEFAULT_POLL_SECONDS, POLL_ENV
from fedcifar.metrics import DEFAULT_SITE, SITE_ENV
from fedcifar.superlink.fleet_budgets import GuardSettings


def add_parsers(sub) -> None:
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
                choices=NODE_DATA_SPLITS,
                default="global",
                help="global: train the slot's slice of the data; site: slice <ordinal> of "
                "--site-partitions of this site's own data",
            )
            node.add_argument("--site-partitions", type=int, help="SuperNodes of this site (--split site)")
            node.add_argument("--site", default=DEFAULT_SITE, help="this site's name (metrics label $FEDCIFAR_SITE)")
            node.add_argument("--data", help="CIFAR-10 folder on this node (node config data-path)")
        node.set_defaults(handler=cmd_node, role=role, flower=flower)

    hollow = sub.add_parser(
        "hollow",
        help="run N hollow SuperNodes in this process against a real SuperLink: they answer at once, "
        "without training (load and scale tests)",
    )
    hollow.add_argument("--superlink", required=True, help="the SuperLink's Fleet API (host:port; its public face)")
    keys = hollow.add_mutually_exclusive_group(required=True)
    keys.add_argument("--control", help="its Control API (host:port), to register new keys for the nodes")
    keys.add_argument(
        "--keys",
        help="a folder of the nodes' private keys, <site>.slot-<k>.key, registered already (their public halves "
        "<site>.slot-<k>.pub in the SuperLink's sites' Secret)",
    )
    hollow.add_argument("--root-certificates", help="the SuperLink's CA (PEM); without it: --insecure")
    hollow.add_argument("--insecure", action="store_true", help="plain HTTP (a SuperLink started with --insecure)")
    hollow.add_argument("--nodes", type=int, required=True, help="how many hollow nodes")
    hollow.add_argument("--slots", type=int, help="node slots in the federation (default: --first-slot + --nodes)")
    hollow.add_argument("--first-slot", type=int, default=0, help="the first node's slot; the others follow")
    hollow.add_argument("--site", default="hollow", help="the site their keys are registered under")
    hollow.add_argument("--train-size", type=int, default=50_000, help="images of the train split the run cuts")
    hollow.add_argument("--test-size", type=int, default=10_000, help="images of the test split the run cuts")
    hollow.add_argument("--start-rate", type=float, default=50.0, help="nodes started a second (default 50)")
    hollow.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C or SIGTERM)")
    hollow.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines: once all are active, on SIGUSR1 (what they did since the last), when stopped (last)",
    )
    hollow.set_defaults(handler=cmd_hollow)


def cmd_hollow(args: argparse.Namespace, extra: list[str]) -> int:
    import signal
    import threading
    import time
    from pathlib import Path

    from fedcifar.cli.common import console
    from fedcifar.node.hollow import HollowFleet

    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.start_rate <= 0:
        raise ValueError(f"--start-rate must be > 0, got {args.start_rate}")
    if bool(args.root_certificates) == args.insecure:
        raise ValueError("give either --root-certificates (the SuperLink's CA) or --insecure")
    check_site(args.site)
    ca = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    fleet = HollowFleet(
        args.superlink,
        args.control,
        ca,
        args.nodes,
        args.slots or args.first_slot + args.nodes,
        args.first_slot,
        args.site,
        {"train": args.train_size, "test": args.test_size},
        keys=Path(args.keys) if args.keys else None,
    )

    def say(event: str, **fields) -> None:  # JSON lines on stdout for whoever drives the fleet (fedcifar scale)
        if args.json:
            print(json.dumps({"event": event, **fields}), flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    # SIGUSR1 (as dd's): what the nodes did since the last one, the polls' figures reset
    signal.signal(signal.SIGUSR1, lambda *_: say("window", **fleet.summary(reset_polls=True)))
    fleet.register()
    fleet.start(args.start_rate)
    console.print(
        f"fedcifar: {args.nodes} hollow SuperNodes of site {args.site} started (slots "
        f"{fleet.first_slot}..{fleet.first_slot + args.nodes - 1} of {fleet.slots})"
    )
    started = time.monotonic()
    while fleet.activated() < args.nodes and not done.wait(0.2):
        pass
    say("active", nodes=fleet.activated(), seconds=round(time.monotonic() - started, 2))
    try:
        done.wait(args.duration)
    except KeyboardInterrupt:
        pass
    started = time.monotonic()
    fleet.close()
    summary = fleet.summary() | {"close_seconds": round(time.monotonic() - started, 2)}
    console.print(f"fedcifar: hollow nodes stopped: {summary}")
    say("stopped", **summary)
    return 1 if summary["failures"] else 0


def cmd_node(args: argparse.Namespace, extra: list[str]) -> int:
    from fedcifar.deploy.flwr_cli import flower_binary
    from fedcifar.node.process import check_superlink_args, node_config, resolve_ordinal, run_node

    command, trainer, guard = [flower_binary(args.flower), *extra], None, None
    if args.role == "superlink":
        check_superlink_args(extra, os.environ, args.behind_proxy)
        guard = GuardSettings(
            poll_interval=float(os.environ.get(POLL_ENV) or DEFAULT_POLL_SECONDS),
            max_reply_bytes=args.fleet_max_reply_bytes,
            max_reply_objects=args.fleet_max_reply_objects,
            site_held_bytes=args.fleet_site_held_bytes,
        )
        # stock flower-superlink, with the Fleet guard around its Fleet handlers (see flower/)
        command = [sys.executable, "-m", "fedcifar.flower.tuning", "superlink", *extra]
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
        # stock flower-supernode, with its idle polling shortened (see flower/)
        command = [sys.executable, "-m", "fedcifar.flower.tuning", "supernode", *extra, "--node-config", config]
        trains = f", training slice {ordinal} of {args.site_partitions} of its data" if data_partition else ""
        print(f"fedcifar: site {args.site}, slot {partition} of {args.num_partitions}{trains}", flush=True)
        trainer = [
            sys.executable,
            "-m",
            "fedcifar.node.trainer",
            "--partition-id",
            str(partition),
            "--num-partitions",
            str(args.num_partitions),
        ]
    return run_node(command, args.metrics_port, args.metrics_host, args.metrics_dir, trainer, guard, args.metrics_fd)
