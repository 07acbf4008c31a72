"""A SuperNode's poll that finds nothing, answered before Flower's request path (``IdlePolls``).

An idle federation is polls: at Flower's 3 s, 1,000 SuperNodes send 333 a second, and each costs the
SuperLink 2-3.5 ms of CPU on Flower's path (three ``BaseHTTPMiddleware`` layers, FastAPI's routing
and dependencies, two hops to the thread pool, a scan of every stored instruction), so one process
came near saturation at 1,000 idle nodes (``benchmarks/RESULTS.md``). Almost every one of those polls
finds nothing. ``QuietNodes`` knows, for each node, whether Flower's own lookup for its last poll
found nothing and no instruction for it has been stored since; ``IdlePolls`` answers such a node's
poll itself, after the same checks Flower and the Fleet guard make (Flower's ``authenticate_node``,
for every poll: the signed timestamp, the key's node, its 401 sent as Flower sends it; the guard's
request budget, counted as Flower's path counts it), with the response Flower would send: an empty
``PullMessagesResponse``. Every other request, and every poll of a node that may have an
instruction, goes on to Flower's path as before.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from fastapi.exception_handlers import http_exception_handler
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
from flwr.supercore.error import FlowerError
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.superlink.dependencies.linkstate import get_linkstate
from flwr.superlink.routers.fleet.node_auth import authenticate_node
from google.protobuf.message import DecodeError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from fedcifar.superlink.asgi import flower_error_response, read_body

PULL_PATH = "/v1/fleet/pull-messages"
MAX_POLL_BYTES = 4096  # a poll is a node id and a run id; a larger body goes to Flower's path
EMPTY_RESPONSE = PullMessagesResponse().SerializeToString()


class QuietNodes:
    """Which nodes hold no undelivered instruction, as far as Flower's own last lookup for them says:
    a count of the instructions stored for each node (counted once stored, and again once the store
    that wrote it with its object tree has committed), and the count when Flower's lookup
    (``get_message_ins``, what its ``pull_messages`` asks) last found nothing for the node: read before
    the lookup, so that an instruction stored while it looks leaves the node not quiet. A lookup that
    found one says nothing of what is left (Flower may even drop it, its objects gone): the node's
    next poll looks again. A new process knows no node as quiet: its first poll goes Flower's way."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored: Counter[int] = Counter()
        self._quiet_at: dict[int, int] = {}  # node id -> the count when Flower last found nothing for it

    def stored(self, node_id: int) -> None:
        with self._lock:
            self._stored[node_id] += 1

    def quiet(self, node_id: int) -> bool:
        with self._lock:
            return self._quiet_at.get(node_id, -1) == self._stored[node_id]

    def watch_lookup(self, get_message_ins: Callable) -> Callable:
        """A LinkState's ``get_message_ins``, noting the nodes it found nothing for."""

        def looked_up(state, node_id: int, limit: int | None, *, run_id: int | None = None):
            with self._lock:
                count = self._stored[node_id]
            found = get_message_ins(state, node_id, limit, run_id=run_id)
            if not found and run_id is None:  # nothing for the node in any run
                with self._lock:
                    self._quiet_at[node_id] = count
            return found

        looked_up.__wrapped__ = get_message_ins  # type: ignore[attr-defined]
        return looked_up

    def watch_store(self, store: Callable) -> Callable:
        """A LinkState's ``store_message_ins`` or ``store_message_and_object_tree``, counting each
        instruction it stored, for its node, once it returns (so, for the latter, once committed)."""

        def counted(state, message, *args, **kwargs):
            result = store(state, message, *args, **kwargs)
            stored = result[0] if isinstance(result, tuple) else bool(result)
            if stored and not message.metadata.reply_to_message_id:
                self.stored(message.metadata.dst_node_id)
            return result

        counted.__wrapped__ = store  # type: ignore[attr-defined]
        return counted


class IdlePolls:
    """Pure ASGI, right after the busy gate: a quiet node's poll answered here (see the module)."""

    def __init__(self, app, quiet: QuietNodes, guard, answered: Callable[[str], None] = lambda site: None) -> None:
        """``answered(site)`` for every poll answered here."""
        self.app, self.quiet, self.guard, self.answered = app, quiet, guard, answered

    async def __call__(self, scope, receive, send) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PULL_PATH):
            await self.app(scope, receive, send)
            return
        # a Fleet event-log plugin (not in open-source Flower) must see every request: Flower's path
        if getattr(scope["app"].state, "fleet_event_log_plugin", None) is not None:
            await self.app(scope, receive, send)
            return
        body, receive = await read_body(receive, MAX_POLL_BYTES)
        request = Request(scope)
        poll = parsed(request, body)
        if poll is None:
            await self.app(scope, receive, send)
            return
        request.state.protobuf_request = poll  # what Flower's authenticate_node reads
        try:
            # one hop to the thread pool (Flower's path takes two): the signature, the state's lookups
            answer = await run_in_threadpool(self.answer, request, poll.node.node_id)
        except HTTPException as refused:  # Flower's node authentication refused it: its 401, as Flower sends it
            answer = await http_exception_handler(request, refused)
        if answer is None:
            await self.app(scope, receive, send)
            return
        await answer(scope, receive, send)

    def answer(self, request: Request, node_id: int) -> Response | None:
        """The empty response, the guard's refusal, or None: Flower's path answers. Every poll is
        authenticated first, quiet node or not (no timing tells whether a node has an instruction)."""
        try:
            authenticate_node(request)
        except HTTPException:
            raise
        except Exception:  # anything but its 401: Flower's path answers as it does
            return None
        if not self.quiet.quiet(node_id):
            return None
        try:
            book = self.guard.admit("pull_messages", node_id, get_linkstate(request))
        except FlowerError as refused:
            return flower_error_response(refused)
        self.answered(book.site)
        return Response(EMPTY_RESPONSE, media_type=PROTOBUF_MEDIA_TYPE)


def parsed(request: Request, body: bytes | None) -> PullMessagesRequest | None:
    """The poll, if ``body`` is a small one of Flower's media type; else None: Flower's path answers."""
    if body is None:
        return None
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != PROTOBUF_MEDIA_TYPE:
        return None
    poll = PullMessagesRequest()
    try:
        poll.ParseFromString(body)
    except DecodeError:
        return None
    return poll
