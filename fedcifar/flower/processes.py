"""A ClientApp process per message, forked warm (``tuning.py``, item 2): the SuperNode starts this
package's SuperExec, which forks each ClientApp from a server that imported Flower's runtime once."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

from fedcifar.flower.patch import module_view, replace
from fedcifar.flower.polling import PULL_RETRY_SECONDS

SUPEREXEC, CLIENTAPP = "flower-superexec", "flwr-clientapp"
# What a ClientApp process imports before it reads its message (not the app: that comes from the FAB)
CLIENTAPP_PRELOAD = [
    "flwr.supernode.cli",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp",
    "flwr.supercore.inflatable.inflatable_utils",
    "numpy",
    "prometheus_client",
    "httpcore",  # httpx imports it only when the ClientApp opens its client: 0.04-0.06 s per message
]
# Run in the forked child: Flower's flwr-clientapp entry point, named like it in /proc/<pid>/comm.
# (exec of a string keeps fedcifar itself out of the child, so the FAB's fedcifar is the one imported.)
CLIENTAPP_MAIN = """
import ctypes, os, sys
from flwr.supercore.inflatable import inflatable_utils
for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
    pull.__kwdefaults__["initial_backoff"] = {backoff}  # as shorten_object_pull_backoff()
try:
    ctypes.CDLL(None).prctl(15, b"flwr-clientapp", 0, 0, 0)  # PR_SET_NAME (Linux)
except AttributeError:
    pass
if {quiet}:  # Flower's suppress_output
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2)
sys.argv = {argv!r}
from flwr.supernode.cli import flwr_clientapp
flwr_clientapp()
"""
# Started with -c, not -m: multiprocessing would import a -m main module (and with it the
# installed fedcifar package) into every forked child.
SUPEREXEC_MAIN = "import sys; from fedcifar.flower.tuning import main; main(sys.argv[1:])"


def rerouted_subprocess(reroute):
    """The ``subprocess`` module, but ``Popen(args, ...)`` goes to ``reroute(args, **kwargs)``."""
    return module_view(subprocess, Popen=reroute)


def start_warm_superexec() -> None:
    """Make the SuperNode start this module's SuperExec instead of ``flower-superexec``."""
    import flwr.supernode.start_client_internal as supernode_loop

    def popen(args, **kwargs):
        if args and args[0] == SUPEREXEC:
            args = [sys.executable, "-c", SUPEREXEC_MAIN, "superexec", *args[1:]]
        return subprocess.Popen(args, **kwargs)

    replace(supernode_loop, "subprocess", rerouted_subprocess(popen))


class ClientAppForkServer:
    """Starts ``flwr-clientapp ARGS`` as a process forked from a server that preloaded its imports."""

    def __init__(self, preload: list[str] = CLIENTAPP_PRELOAD) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)

    def popen(self, args, **kwargs):
        if not args or args[0] != CLIENTAPP:
            return subprocess.Popen(args, **kwargs)
        # daemon: stopped with the SuperExec, as Flower's parent-pid monitor would stop it anyway
        quiet = kwargs.get("stdout") is subprocess.DEVNULL
        code = CLIENTAPP_MAIN.format(argv=list(args), quiet=quiet, backoff=PULL_RETRY_SECONDS)
        process = self.context.Process(target=exec, args=(code,), daemon=True)
        process.start()  # also reaps the ones that finished
        return process


def start_forked_clientapps() -> None:
    """Make this SuperExec fork its ClientApp processes warm instead of starting them cold."""
    from flwr.supercore.superexec.executor import subprocess_executor

    replace(subprocess_executor, "subprocess", rerouted_subprocess(ClientAppForkServer().popen))
