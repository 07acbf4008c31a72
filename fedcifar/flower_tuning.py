"""Flower's idle polling, shortened: the one change fedcifar makes to Flower's behaviour.

flwr 1.42's SuperNode sleeps a fixed 3 s whenever it pulled no message
(``flwr/supernode/start_client_internal.py``: ``time.sleep(3)``), so every message waits up to
3 s before a node even sees it. ``python -m fedcifar.flower_tuning supernode ARGS`` runs the
stock ``flower-supernode`` with that sleep capped at ``$FEDCIFAR_POLL_INTERVAL`` seconds (default
0.25): only that module's view of ``time`` is replaced, nothing else in Flower changes.
The other two waits have knobs of their own: SuperExec's task polling
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, set by ``fedcifar superlink/supernode``) and the
ServerApp's reply polling (``server_app.PollingGrid``).
"""

from __future__ import annotations

import os
import sys
import time
import types

POLL_ENV = "FEDCIFAR_POLL_INTERVAL"
DEFAULT_POLL_SECONDS = 0.25


def capped_time(limit: float) -> types.SimpleNamespace:
    """The ``time`` module, except that ``sleep`` never waits longer than ``limit`` seconds."""
    proxy = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    proxy.sleep = lambda seconds: time.sleep(min(seconds, limit))
    return proxy


def shorten_supernode_polling(limit: float) -> None:
    import flwr.supernode.start_client_internal as supernode_loop

    supernode_loop.time = capped_time(limit)


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "supernode":
        sys.exit("usage: python -m fedcifar.flower_tuning supernode [flower-supernode options]")
    shorten_supernode_polling(float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS)))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
