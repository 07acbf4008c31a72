"""The Fleet guard (``superlink/fleet_guard.py``), put in front of Flower's Fleet handlers (``tuning.py``, item 5),
and a quiet node's poll answered before Flower's request path (``superlink/idle_polls.py``, item 7)."""

from __future__ import annotations

import functools
import os

from fedcifar.flower.patch import VERIFIED_FLWR, replace

INTERNAL_GRPC_PREFIX = "FLWR_INTERNAL_GRPC_"  # Flower's switches for its legacy gRPC Fleet and Control APIs


class GuardNotInPlace(RuntimeError):
    """The Fleet guard could not be put in front of every Fleet handler (or something would bypass it)."""


def guard_fleet_api(settings=None):
    """Put the Fleet guard (``fleet_guard.py``) around Flower's Fleet handlers in this process, the
    SuperLink's, and check that Flower's HTTP router reaches them through it: the router looks each
    handler up on the ``fleet_handlers`` module at every call. Its refusals are Flower API errors of
    codes of its own (403, and 503 with Retry-After for the request budget), logged by the guard once
    per node and reason, not once per request by Flower's error translator."""
    import logging

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.dependencies.version import VersionDependency
    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main
    from flwr.superlink.routers.fleet import router
    from flwr.superlink.servicer.fleet import fleet_handlers
    from starlette.middleware import Middleware

    from fedcifar.flower.middleware import scoped
    from fedcifar.metrics import superlink_metrics
    from fedcifar.superlink import busy_gate, fleet_budgets, fleet_guard, idle_polls

    if opened := sorted(name for name in os.environ if name.startswith(INTERNAL_GRPC_PREFIX)):
        raise GuardNotInPlace(
            f"{', '.join(opened)} would open Flower's legacy gRPC APIs beside the guarded HTTP one: unset it"
        )
    metrics = superlink_metrics()
    # one series per handler and site, looked up once (labels() per request: 4% of the SuperLink's
    # event-loop samples at 1,000 idle nodes, py-spy; 1.25 -> 0.43 us per request unloaded)
    requests_series = functools.cache(metrics.fleet_requests.labels)
    guard = fleet_guard.FleetGuard(
        settings or fleet_budgets.GuardSettings.from_env(),
        count=lambda reason, site: metrics.fleet_refused.labels(reason, site).inc(),
        # zero series, so that a site's panel shows 0 until its first refusal (and alerts see it)
        seen=lambda site: [metrics.fleet_refused.labels(reason, site) for reason in fleet_guard.REASONS],
        served=lambda handler, site: requests_series(handler, site).inc(),
    )
    # the instructions stored for each node and Flower's lookups of them, where Flower's states do both
    quiet = idle_polls.QuietNodes()
    for state_class in (InMemoryLinkState, SqlLinkState):
        for store in ("store_message_ins", "store_message_and_object_tree"):
            replace(state_class, store, quiet.watch_store(getattr(state_class, store)))
        replace(state_class, "get_message_ins", quiet.watch_lookup(state_class.get_message_ins))
    for name in fleet_guard.GUARDED:
        handler = getattr(fleet_handlers, name, None)
        endpoint = getattr(router, f"fleet_{name}", None)
        if handler is None or endpoint is None or name not in endpoint.__code__.co_names:
            raise GuardNotInPlace(
                f"Flower's Fleet router no longer calls fleet_handlers.{name}: the Fleet guard cannot stand "
                f"in front of it (flwr {VERIFIED_FLWR}.* is the release it was verified on)"
            )
        replace(fleet_handlers, name, guard.wrap(name, handler))
    if router.fleet_handlers is not fleet_handlers:
        raise GuardNotInPlace("Flower's Fleet router reads another handlers module than the one guarded")
    # a quiet node's poll skips the router's dependencies: they must refuse nothing (Flower 1.42's
    # version check only logs a mismatch on the Fleet API)
    versions = [d.dependency for d in router.router.dependencies if isinstance(d.dependency, VersionDependency)]
    if [v._reject_incompatible for v in versions] != [False]:
        raise GuardNotInPlace("Flower's Fleet router now refuses requests in a dependency: quiet polls would skip it")
    # the gate in front of Flower's middleware, whose layers each see only their API's paths
    # (middleware.py); quiet nodes' polls answered after Flower's extension layers (none in open-source
    # Flower), before the rest; create_app reads the list when the SuperLink starts
    if "_get_middleware" not in superlink_main.create_app.__code__.co_names:
        raise GuardNotInPlace("Flower's SuperLink no longer builds its middleware with _get_middleware")
    gate = Middleware(busy_gate.BusyGate, guard=guard)
    quiet_series = functools.cache(metrics.fleet_quiet_polls.labels)
    idle = Middleware(idle_polls.IdlePolls, quiet=quiet, guard=guard, answered=lambda site: quiet_series(site).inc())

    def middleware() -> list[Middleware]:
        layers = flower_middleware()
        first = len(extensions.get_middleware())
        return [gate, *layers[:first], idle, *scoped(layers[first:])]

    flower_middleware = replace(superlink_main, "_get_middleware", middleware)
    codes = tuple(f"[ApiError:{c}]" for c in (fleet_guard.REFUSED_CODE, busy_gate.BUSY_CODE))
    logging.getLogger("flwr").addFilter(lambda record: not any(c in str(record.msg) for c in codes))
    return guard
