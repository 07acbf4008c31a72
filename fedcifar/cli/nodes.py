"""``fedcifar superlink`` and ``fedcifar supernode``: Flower's nodes with a metrics endpoint (``node/process.py``)."""

from __future__ import annotations

import argparse
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
