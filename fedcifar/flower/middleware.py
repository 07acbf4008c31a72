"""Flower's SuperLink middleware, each layer on the API it acts on (``tuning.py``, item 6).

flwr 1.42 sends every request through eight ``BaseHTTPMiddleware`` layers (``superlink.main.
_get_middleware``). Four act on Control API paths only and two on Fleet API paths only (their
``dispatch`` returns ``call_next(request)`` at once for any other path: read in its source); yet
each pass-through costs about 0.2 ms of CPU per request (a task group and memory streams: measured
on this project's machine, more under load), which a Fleet poll pays for the four Control layers, and
the ServerApp's runtime requests for all six. The two event-log layers pass every request through
where the SuperLink has no event-log plugin (the open-source one's default). ``scoped`` wraps those
six in a pure ASGI switch, so a request meets a layer only where the layer acts; the order of the
layers, and what each does where it acts, is Flower's.
"""

from __future__ import annotations

from flwr.superlink.routers.control.middlewares import (
    ControlAuthenticationMiddleware,
    ControlEventLogMiddleware,
    ControlLicenseMiddleware,
    ControlSensitiveResponseMiddleware,
)
from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
from starlette.middleware import Middleware

CONTROL, FLEET = "/v1/control/", "/v1/fleet/"
# Flower's layers that act on one API's paths only: that API's path prefix, and the app state
# attribute naming the plugin without which the layer acts on none
SCOPES = {
    ControlSensitiveResponseMiddleware: (CONTROL, None),  # its CONTROL_SENSITIVE_ROUTE_KEYS: Control paths
    ControlAuthenticationMiddleware: (CONTROL, None),
    ControlLicenseMiddleware: (CONTROL, None),
    ControlEventLogMiddleware: (CONTROL, "control_event_log_plugin"),
    NodeAuthMiddleware: (FLEET, None),
    FleetEventLogMiddleware: (FLEET, "fleet_event_log_plugin"),
}


class PathScoped:
    """Pure ASGI: HTTP requests under ``prefix`` go through ``layer`` (a Starlette ``Middleware``), where
    ``plugin`` is None or the app's state holds that plugin; every other request (and the lifespan)
    straight on to ``app``."""

    def __init__(self, app, prefix: str, plugin: str | None, layer: Middleware) -> None:
        self.app, self.prefix, self.plugin = app, prefix, plugin
        self.layer = layer.cls(app, *layer.args, **layer.kwargs)

    def acts_on(self, scope) -> bool:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return False
        return self.plugin is None or getattr(scope["app"].state, self.plugin, None) is not None

    async def __call__(self, scope, receive, send) -> None:
        await (self.layer if self.acts_on(scope) else self.app)(scope, receive, send)


def scoped(middleware: list[Middleware]) -> list[Middleware]:
    """``middleware`` in its order, the layers of ``SCOPES`` each behind a ``PathScoped`` switch."""
    return [
        Middleware(PathScoped, *SCOPES[layer.cls], layer=layer) if layer.cls in SCOPES else layer
        for layer in middleware
    ]
