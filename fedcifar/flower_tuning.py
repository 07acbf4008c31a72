"""Flower's idle polling, shortened: the one change fedcifar makes to Flower's behaviour.

flwr 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s
whenever it pulled no message, so every message waits up to 3 s before a node even sees it, and
then checks for the ClientApp's reply every 0.5 s. ``python -m fedcifar.flower_tuning supernode
ARGS`` runs the stock ``flower-supernode`` with the idle sleep capped at ``$FEDCIFAR_POLL_INTERVAL``
seconds (default 0.25: one pull request per node and interval) and the local reply check at
0.02 s. Only that module's view of ``time`` is replaced; nothing else in Flower changes.
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
LOCAL_CHECK_SECONDS = 0.02


def capped_time(idle: float, local: float = LOCAL_CHECK_SECONDS) -> types.SimpleNamespace:
    """The ``time`` module, but ``sleep`` waits at most ``idle`` s (sleeps of 1 s or more: the
    idle poll of the SuperLink) or ``local`` s (shorter ones: checks of local state)."""
    proxy = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    proxy.sleep = lambda seconds: time.sleep(min(seconds, idle if seconds >= 1 else local))
    return proxy


def shorten_supernode_polling(idle: float) -> None:
    import flwr.supernode.start_client_internal as supernode_loop

    supernode_loop.time = capped_time(idle)


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "supernode":
        sys.exit("usage: python -m fedcifar.flower_tuning supernode [flower-supernode options]")
    shorten_supernode_polling(float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS)))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
