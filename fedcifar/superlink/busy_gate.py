"""The Fleet guard's request budget, enforced before Flower reads a request (``BusyGate``)."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

from fastapi import status
from flwr.supercore.error import FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP, ApiErrorSpec
from grpc import StatusCode

from fedcifar.superlink.asgi import flower_error_response

if TYPE_CHECKING:
    from fedcifar.superlink.fleet_guard import FleetGuard

# Flower's API error codes (flwr.supercore.error.ApiErrorCode) stay far below these
BUSY_CODE = 9102
BUSY_MESSAGE = "This SuperNode exceeded its request budget at the SuperLink; retry later."
# in Flower's catalog, so that its error translator (and ``asgi.flower_error_response``) answer it: 503
API_ERROR_MAP[BUSY_CODE] = ApiErrorSpec(
    StatusCode.UNAVAILABLE, status.HTTP_503_SERVICE_UNAVAILABLE, BUSY_MESSAGE, {"Retry-After": "1"}
)


class BusyGate:
    """Refuses, before Flower reads them, the Fleet requests of a node the guard found over its request
    budget, until its next token: a flood from one node then costs the SuperLink little more than
    reading the request (Flower's way: verifying the signature, parsing, its middleware and handler,
    about 4 ms of CPU a request here). The refusal is sent when that token comes (at most a second
    later; an asyncio sleep, no thread): a client that waits for its answers, as Flower's does, is
    slowed to its budget instead of sending as fast as the SuperLink can answer. Keyed by the request's
    public-key header, but only a node's own signed requests put its key here, so a forged header
    cannot make another node busy (a replayed one can, within the signature's five minutes: the
    README's limits). A pure ASGI middleware, outermost (``flower.fleet.guard_fleet_api`` puts it
    there)."""

    def __init__(self, app, guard: FleetGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/fleet/") and self.guard.busy:
            header = dict(scope["headers"]).get(b"flwr-public-key")
            try:
                key = base64.b64decode(header, validate=True) if header else b""
            except ValueError:
                key = b""
            if key and (wait := self.guard.over_budget(key)) is not None:
                while (await receive()).get("more_body"):  # the body, read and dropped
                    pass
                await asyncio.sleep(min(wait, 1.0))
                busy = FlowerError(
                    BUSY_CODE,
                    "Fleet guard: over its request budget",
                    public_details=f"fedcifar Fleet guard: rate_limited: {self.guard.rate_limit}",
                )
                await flower_error_response(busy)(scope, receive, send)
                return
        await self.app(scope, receive, send)
