"""The ``fedcifar`` command line: one module per command group (``run``, ``experiments``, ``submit``, ``pull``,
``nodes``).

fedcifar run --clients 2 --rounds 3              # local federation: SuperLink + 2 SuperNodes
fedcifar centralized --epochs 2 --json           # the centralized baseline
fedcifar superlink --metrics-port 9400 --insecure --host 0.0.0.0   # a node, e.g. in a pod (Fleet guard inside)
fedcifar supernode --partition-id auto --num-partitions 3 --superlink HOST:8000 --insecure
"""

from __future__ import annotations

import argparse
import sys

from fedcifar.cli import experiments, nodes, pull, run, submit
from fedcifar.cli.common import console
from fedcifar.local.isolation import IsolationError


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

    run.add_parser(sub)
    experiments.add_parsers(sub)
    submit.add_parser(sub)
    pull.add_parser(sub)
    nodes.add_parsers(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
