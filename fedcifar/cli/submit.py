"""``fedcifar submit``: the chart's run Job."""

from __future__ import annotations

import argparse

from fedcifar.cli.common import APP_DIR, console


def add_parser(sub) -> None:
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


def cmd_submit(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.deploy.portforward import PortForwardError
    from fedcifar.deploy.submit import NotReady, submit

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
