"""What the command modules share: the console, the project folder, Ctrl-C and SIGTERM, the private network."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
APP_DIR = Path(__file__).resolve().parents[2]  # the project holding [tool.flwr.app]


def interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM handler: a stop request cleans up like Ctrl-C."""
    raise KeyboardInterrupt


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
    from fedcifar.data import load_split, resolve_source
    from fedcifar.local import isolation

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
