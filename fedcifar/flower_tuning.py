"""Flower's per-message costs, cut: the only changes fedcifar makes to Flower's behaviour.

1. **Idle polling.** flwr 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``)
   sleeps a fixed 3 s whenever it pulled no message, so every message waits up to 3 s before a
   node even sees it, and then checks for the ClientApp's reply every 0.5 s. Here the idle sleep
   is capped at ``$FEDCIFAR_POLL_INTERVAL`` seconds (default 0.25: one pull request per node and
   interval) and the local reply check at 0.02 s. Only that module's view of ``time`` changes.
2. **A ClientApp process per message, forked warm.** The SuperNode's SuperExec starts
   ``flwr-clientapp`` as a new process for every message, which spends ~0.6 s of CPU importing
   Python and Flower's runtime before it handles anything. Here the SuperExec (this module's
   ``superexec``, started by the SuperNode instead of ``flower-superexec``) forks each ClientApp
   from a single-threaded fork server that imported that runtime once (``multiprocessing``'s
   forkserver). Each message still gets its own
   process, running Flower's own ``flwr-clientapp`` entry point with the same arguments; the
   app itself is still imported from the run's FAB, not preloaded.

3. **Object pulls that back off for a second.** A node stores a message before its content
   has arrived, so whoever pulls that content at once (the ClientApp from its SuperNode, the
   ServerApp from the SuperLink) often finds it missing and, by Flower's default, retries
   after 1 s, doubling. Here the first retry comes after 0.02 s (then doubling to the same 10 s
   cap): the default arguments of Flower's two object-pull functions, in the processes that pull.

4. **Reply pulls bounded by the round's deadline.** The SuperLink lists a reply as soon as its
   sender pushed the message, before its content; if the sender dies in between (a pod lost
   mid-upload), the ServerApp's pull of that content retries until Flower's object-push session
   expires (about 3 minutes here; ``PULL_MAX_TIME`` is 2 hours), holding the whole round past its
   ``round-timeout``. ``server.polling.PollingGrid`` pulls within ``pulls_bounded_by(seconds left)``:
   a content still missing at the deadline becomes Flower's own "objects unavailable" error
   reply, counted as that client's failure.

5. **The Fleet guard** (``fleet_guard.py``), in the SuperLink: Flower checks that a Fleet request is
   signed by a registered key of the node it names, not what the request holds; the guard holds every
   push, pull and confirmation to that node's own messages and objects, within budgets.
   ``guard_fleet_api`` wraps Flower's Fleet handlers and checks at start that its HTTP router calls
   them through the wrappers (``python -m fedcifar.flower_tuning superlink ARGS``, what ``fedcifar
   superlink`` runs, stops otherwise).

All of them are applied through one entry point, ``tune(role)``, which first checks that the installed
flwr is the release they were verified on (``VERIFIED_FLWR``) and stops with a message otherwise,
unless ``$FEDCIFAR_ALLOW_UNVERIFIED_FLWR=1``. The first two are module-local stand-ins (``time`` and
``subprocess`` as seen by one Flower module), set up by ``python -m fedcifar.flower_tuning supernode ARGS``
(what ``fedcifar supernode`` runs);
``tests/test_flower_tuning.py`` fails if the pinned Flower stops calling what they replace.
The other waits have knobs of their own: SuperExec's task polling
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, set by ``fedcifar superlink/supernode``) and the
ServerApp's reply polling (``server.polling.PollingGrid``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import multiprocessing
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

VERIFIED_FLWR = "1.42"  # the Flower release these changes were read against and tested on
ALLOW_UNVERIFIED_ENV = "FEDCIFAR_ALLOW_UNVERIFIED_FLWR"
POLL_ENV = "FEDCIFAR_POLL_INTERVAL"
DEFAULT_POLL_SECONDS = 0.25
LOCAL_CHECK_SECONDS = 0.02
PULL_RETRY_SECONDS = 0.02  # Flower's default: 1 s (flwr.supercore.constant.PULL_INITIAL_BACKOFF)
BOUNDED_PULL_RETRY_CAP = 0.5  # Flower's default: 10 s (PULL_BACKOFF_CAP)
SUPEREXEC, CLIENTAPP = "flower-superexec", "flwr-clientapp"
INTERNAL_GRPC_PREFIX = "FLWR_INTERNAL_GRPC_"  # Flower's switches for its legacy gRPC Fleet and Control APIs
# What a ClientApp process imports before it reads its message (not the app: that comes from the FAB)
CLIENTAPP_PRELOAD = [
    "flwr.supernode.cli",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp",
    "flwr.supercore.inflatable.inflatable_utils",
    "numpy",
    "prometheus_client",
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
SUPEREXEC_MAIN = "import sys; from fedcifar.flower_tuning import main; main(sys.argv[1:])"


class UnverifiedFlower(RuntimeError):
    """The installed flwr is not the release ``VERIFIED_FLWR`` these changes were verified on."""


class GuardNotInPlace(RuntimeError):
    """The Fleet guard could not be put in front of every Fleet handler (or something would bypass it)."""


def capped_time(idle: float, local: float = LOCAL_CHECK_SECONDS) -> types.SimpleNamespace:
    """The ``time`` module, but ``sleep`` waits at most ``idle`` s (sleeps of 1 s or more: the
    idle poll of the SuperLink) or ``local`` s (shorter ones: checks of local state)."""
    proxy = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    proxy.sleep = lambda seconds: time.sleep(min(seconds, idle if seconds >= 1 else local))
    return proxy


def rerouted_subprocess(reroute) -> types.SimpleNamespace:
    """The ``subprocess`` module, but ``Popen(args, ...)`` goes to ``reroute(args, **kwargs)``."""
    proxy = types.SimpleNamespace(
        **{name: getattr(subprocess, name) for name in dir(subprocess) if not name.startswith("__")}
    )
    proxy.Popen = reroute
    return proxy


def shorten_supernode_polling(idle: float) -> None:
    import flwr.supernode.start_client_internal as supernode_loop

    supernode_loop.time = capped_time(idle)


def shorten_object_pull_backoff(seconds: float = PULL_RETRY_SECONDS) -> None:
    """The first retry of a missing object after ``seconds`` instead of 1 s, in this process."""
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__["initial_backoff"] = seconds


@contextlib.contextmanager
def pulls_bounded_by(seconds: float, retry_cap: float = BOUNDED_PULL_RETRY_CAP) -> Iterator[None]:
    """Within the block, Flower's ``pull_objects`` gives up after ``seconds`` at most (retrying at least
    every ``retry_cap`` s, so it does not sleep far past them); defaults restored after it."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_objects.__kwdefaults__
    saved = dict(defaults)
    defaults.update(
        max_time=min(max(seconds, 0.0), saved["max_time"]), backoff_cap=min(retry_cap, saved["backoff_cap"])
    )
    try:
        yield
    finally:
        defaults.update(saved)


def report_activation() -> None:
    """Publish ``fedcifar_client_node{site} 1`` once the SuperLink has activated this node.

    Not a change in behaviour: the SuperNode sets its node id when activation succeeded, and
    this also marks the node's metrics (the id itself stays off them) and notes the id in
    ``$FEDCIFAR_NODE_ID_FILE``, so that a restart after a kill can end this activation
    (``security.retire_previous_activation``). ``fedcifar submit`` waits for it, because a node
    that only runs is not yet sampled: after a restart with the same key, activation waits
    until the SuperLink has given up on the previous activation.
    """
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedcifar.metrics import client_metrics
    from fedcifar.security import NODE_ID_FILE_ENV

    set_node_id = InMemoryNodeState.set_node_id

    def set_and_report(self, node_id):
        set_node_id(self, node_id)
        if node_id is not None:
            metrics = client_metrics()
            metrics.node.labels(metrics.site).set(1)
            if noted := os.environ.get(NODE_ID_FILE_ENV):  # for the restart of a killed node
                Path(noted).write_text(str(node_id))

    InMemoryNodeState.set_node_id = set_and_report


def start_warm_superexec() -> None:
    """Make the SuperNode start this module's SuperExec instead of ``flower-superexec``."""
    import flwr.supernode.start_client_internal as supernode_loop

    def popen(args, **kwargs):
        if args and args[0] == SUPEREXEC:
            args = [sys.executable, "-c", SUPEREXEC_MAIN, "superexec", *args[1:]]
        return subprocess.Popen(args, **kwargs)

    supernode_loop.subprocess = rerouted_subprocess(popen)


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

    subprocess_executor.subprocess = rerouted_subprocess(ClientAppForkServer().popen)


def clip_zero_updates() -> None:
    """Flower's DP clipping divides by the update's norm, so an update of zeros (a node that sends
    back the model it got, or a server-side norm that meets one) raised ZeroDivisionError: under
    server-side clipping one such reply cost the round every reply. An update of zeros is within any
    norm and is left as it is; every other update is scaled as Flower scales it."""
    from flwr.serverapp.strategy import dp_adaptive_clipping
    from flwr.supercore import differential_privacy

    def clip(arrays: list, clipping_norm: float) -> bool:
        norm = differential_privacy.get_norm(arrays)
        factor = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        for array in arrays:
            array *= factor
        return factor < 1  # adaptive clipping's norm bit; fixed clipping ignores it

    differential_privacy.clip_inputs_inplace = clip
    differential_privacy.adaptive_clip_inputs_inplace = clip
    dp_adaptive_clipping.adaptive_clip_inputs_inplace = clip  # imported by name there


def guard_fleet_api(settings=None):
    """Put the Fleet guard (``fleet_guard.py``) around Flower's Fleet handlers in this process, the
    SuperLink's, and check that Flower's HTTP router reaches them through it: the router looks each
    handler up on the ``fleet_handlers`` module at every call. Its refusals are Flower API errors of
    codes of its own (403, and 503 with Retry-After for the request budget), logged by the guard once
    per node and reason, not once per request by Flower's error translator."""
    import logging

    from fastapi import status
    from flwr.supercore.error.catalog import API_ERROR_MAP, ApiErrorSpec
    from flwr.superlink import main as superlink_main
    from flwr.superlink.routers.fleet import router
    from flwr.superlink.servicer.fleet import fleet_handlers
    from grpc import StatusCode
    from starlette.middleware import Middleware

    from fedcifar import fleet_guard
    from fedcifar.metrics import superlink_metrics

    if opened := sorted(name for name in os.environ if name.startswith(INTERNAL_GRPC_PREFIX)):
        raise GuardNotInPlace(
            f"{', '.join(opened)} would open Flower's legacy gRPC APIs beside the guarded HTTP one: unset it"
        )
    metrics = superlink_metrics()
    guard = fleet_guard.FleetGuard(
        settings or fleet_guard.GuardSettings.from_env(),
        count=lambda reason, site: metrics.fleet_refused.labels(reason, site).inc(),
        # zero series, so that a site's panel shows 0 until its first refusal (and alerts see it)
        seen=lambda site: [metrics.fleet_refused.labels(reason, site) for reason in fleet_guard.REASONS],
    )
    for name in fleet_guard.GUARDED:
        handler = getattr(fleet_handlers, name, None)
        endpoint = getattr(router, f"fleet_{name}", None)
        if handler is None or endpoint is None or name not in endpoint.__code__.co_names:
            raise GuardNotInPlace(
                f"Flower's Fleet router no longer calls fleet_handlers.{name}: the Fleet guard cannot stand "
                f"in front of it (flwr {VERIFIED_FLWR}.* is the release it was verified on)"
            )
        setattr(fleet_handlers, name, guard.wrap(name, handler))
    if router.fleet_handlers is not fleet_handlers:
        raise GuardNotInPlace("Flower's Fleet router reads another handlers module than the one guarded")
    # the gate in front of Flower's middleware (create_app reads the list when the SuperLink starts)
    if "_get_middleware" not in superlink_main.create_app.__code__.co_names:
        raise GuardNotInPlace("Flower's SuperLink no longer builds its middleware with _get_middleware")
    flower_middleware = superlink_main._get_middleware
    superlink_main._get_middleware = lambda: [Middleware(fleet_guard.BusyGate, guard=guard), *flower_middleware()]
    API_ERROR_MAP[fleet_guard.REFUSED_CODE] = ApiErrorSpec(
        StatusCode.PERMISSION_DENIED, status.HTTP_403_FORBIDDEN, fleet_guard.REFUSED_MESSAGE
    )
    API_ERROR_MAP[fleet_guard.BUSY_CODE] = ApiErrorSpec(
        StatusCode.UNAVAILABLE, status.HTTP_503_SERVICE_UNAVAILABLE, fleet_guard.BUSY_MESSAGE, {"Retry-After": "1"}
    )
    codes = tuple(f"[ApiError:{c}]" for c in (fleet_guard.REFUSED_CODE, fleet_guard.BUSY_CODE))
    logging.getLogger("flwr").addFilter(lambda record: not any(c in str(record.msg) for c in codes))
    return guard


def check_flower_version(installed: str | None = None) -> None:
    """Stop unless the installed flwr is the release these changes were verified on (or the user
    said to go on without): on another release they could silently do nothing, or break Flower."""
    installed = installed or importlib.metadata.version("flwr")
    if installed.split(".")[:2] == VERIFIED_FLWR.split("."):
        return
    if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        print(
            f"fedcifar: flwr {installed} is not {VERIFIED_FLWR}.*, on which flower_tuning.py was verified; "
            f"going on as {ALLOW_UNVERIFIED_ENV}=1 says",
            file=sys.stderr,
            flush=True,
        )
        return
    raise UnverifiedFlower(
        f"fedcifar changes some of Flower's behaviour (fedcifar/flower_tuning.py; the round deadlines depend on "
        f"it), verified on flwr {VERIFIED_FLWR}.*, but flwr {installed} is installed: install flwr=={VERIFIED_FLWR}.* "
        f"(pip install -e .), or set {ALLOW_UNVERIFIED_ENV}=1 to run the changes unverified"
    )


def tune(role: str) -> None:
    """The one entry point: check the flwr release, then change what ``role`` (``superlink``,
    ``supernode``, ``superexec``, ``serverapp`` or ``clientapp``) runs with in this process."""
    check_flower_version()
    if role == "superlink":
        guard_fleet_api()
    elif role == "supernode":
        shorten_supernode_polling(float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS)))
        shorten_object_pull_backoff()
        start_warm_superexec()
        report_activation()
    elif role == "superexec":
        start_forked_clientapps()
    elif role == "serverapp":
        shorten_object_pull_backoff()  # its reply pulls are bounded by pulls_bounded_by, under the same check
        clip_zero_updates()
    elif role == "clientapp":
        clip_zero_updates()
    else:
        raise ValueError(f"no Flower tuning for {role!r}: one of superlink, supernode, superexec, serverapp, clientapp")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("superlink", "supernode", "superexec"):
        sys.exit("usage: python -m fedcifar.flower_tuning superlink|supernode|superexec [Flower's options]")
    try:
        tune(argv[0])
    except (UnverifiedFlower, GuardNotInPlace) as err:
        sys.exit(f"fedcifar: {err}")
    if argv[0] == "superlink":
        from flwr.superlink.cli.flower_superlink import flower_superlink

        sys.argv = ["flower-superlink", *argv[1:]]
        flower_superlink()
    elif argv[0] == "supernode":
        from flwr.supernode.cli import flower_supernode

        sys.argv = ["flower-supernode", *argv[1:]]
        flower_supernode()
    else:
        from flwr.supercore.cli import flower_superexec

        sys.argv = [SUPEREXEC, *argv[1:]]
        flower_superexec()


if __name__ == "__main__":
    main(sys.argv[1:])
