"""``fedcifar pull``: a release's run outputs, fetched through the operator's port-forward right."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcifar.cli.common import console


def add_parser(sub) -> None:
    pull = sub.add_parser(
        "pull",
        help="fetch a release's run outputs (history.json, history.png, model.pt, best-model.pt) through a "
        "port-forward (RBAC pods/portforward in its namespace)",
    )
    pull.add_argument("release", help="the Helm release that runs the SuperLink")
    pull.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    pull.add_argument("--revision", type=int, default=None, help="the release revision whose run (default: the latest)")
    pull.add_argument("-n", "--namespace", default=None, help="the release's namespace (default: the kubeconfig's)")
    pull.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    pull.add_argument("--port", type=int, default=9095, help="the chart's superlink.outputsPort")
    pull.set_defaults(handler=cmd_pull)


def cmd_pull(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.deploy.portforward import PortForwardError
    from fedcifar.deploy.pull import PullError, pull

    try:
        files = pull(args.release, args.out, args.namespace, args.revision, args.port, args.context)
    except (PullError, PortForwardError) as err:
        console.print(f"[bold red]error:[/] {err}")
        return 1
    for path in files:
        console.print(f"{path} ({path.stat().st_size} bytes)")
    return 0
