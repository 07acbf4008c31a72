"""Flower's per-message costs, cut: the only changes fedcifar makes to Flower's behaviour.

1. **Idle polling.** flwr 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``)
   sleeps a fixed 3 s whenever it pulled no message, so every message waits up to 3 s before a
   node even sees it, and then checks for the ClientApp's reply every 0.5 s. Here the idle sleep
   follows a ``polling.PollSchedule``: ``$FEDCIFAR_POLL_INTERVAL`` seconds (default 0.25) for
   ``$FEDCIFAR_POLL_HOLD`` s (10) after the node started, last pulled a message or pushed a reply, then
   doubling up to ``$FEDCIFAR_IDLE_POLL_INTERVAL`` (3, Flower's own), so that an idle federation
   costs its SuperLink what stock Flower's does; the local reply check is capped at 0.02 s. Only
   that module's view of ``time`` and its pull and push steps (wrapped, to note the activity) change.
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
   them through the wrappers (``python -m fedcifar.flower.tuning superlink ARGS``, what ``fedcifar
   superlink`` runs, stops otherwise).

6. **Middleware on the API it acts on** (``middleware.py``), in the SuperLink: Flower sends every
   request through eight ``BaseHTTPMiddleware`` layers, six of which act on one API's paths only
   and pass the others through at about 0.2 ms of CPU each; those six see only their API's requests
   (a Fleet poll skips the four Control layers).

7. **A quiet node's poll answered early** (``superlink/idle_polls.py``), in the SuperLink: a poll
   of a node for which Flower last found nothing, and for which no instruction has been stored since,
   is answered (empty, as Flower would) right after Flower's own node authentication and the guard's
   budget, before the rest of Flower's request path: an idle federation's polls cost a third.

All of them are applied through one entry point, ``tune(role)``, which first checks that the installed
flwr is the release they were verified on (``VERIFIED_FLWR``) and stops with a message otherwise,
unless ``$FEDCIFAR_ALLOW_UNVERIFIED_FLWR=1``. The first two are module-local stand-ins (``time`` and
``subprocess`` as seen by one Flower module), set up by ``python -m fedcifar.flower.tuning supernode ARGS``
(what ``fedcifar supernode`` runs);
``tests/test_flower_tuning.py`` fails if the pinned Flower stops calling what they replace.
The other waits have knobs of their own: SuperExec's task polling
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, set by ``fedcifar superlink/supernode``) and the
ServerApp's reply polling (``server.polling.PollingGrid``).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from fedcifar.flower.activation import report_activation
from fedcifar.flower.clipping import clip_zero_updates
from fedcifar.flower.fleet import GuardNotInPlace, guard_fleet_api
from fedcifar.flower.patch import VERIFIED_FLWR, FlowerChanged
from fedcifar.flower.polling import (
    PollSchedule,
    pace_supernode_polling,
    shorten_object_pull_backoff,
)
from fedcifar.flower.processes import SUPEREXEC, start_forked_clientapps, start_warm_superexec

ALLOW_UNVERIFIED_ENV = "FEDCIFAR_ALLOW_UNVERIFIED_FLWR"


class UnverifiedFlower(RuntimeError):
    """The installed flwr is not the release ``VERIFIED_FLWR`` these changes were verified on."""


def check_flower_version(installed: str | None = None) -> None:
    """Stop unless the installed flwr is the release these changes were verified on (or the user
    said to go on without): on another release they could silently do nothing, or break Flower."""
    installed = installed or importlib.metadata.version("flwr")
    if installed.split(".")[:2] == VERIFIED_FLWR.split("."):
        return
    if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        print(
            f"fedcifar: flwr {installed} is not {VERIFIED_FLWR}.*, on which fedcifar/flower/ was verified; "
            f"going on as {ALLOW_UNVERIFIED_ENV}=1 says",
            file=sys.stderr,
            flush=True,
        )
        return
    raise UnverifiedFlower(
        f"fedcifar changes some of Flower's behaviour (fedcifar/flower/tuning.py; the round deadlines depend on "
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
        pace_supernode_polling(PollSchedule.from_env())
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
        sys.exit("usage: python -m fedcifar.flower.tuning superlink|supernode|superexec [Flower's options]")
    try:
        tune(argv[0])
    except (UnverifiedFlower, GuardNotInPlace, FlowerChanged) as err:
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
