"""A SuperNode's poll that finds nothing, answered before Flower's request path (``IdlePolls``).

An idle federation is polls: at Flower's 3 s, 1,000 SuperNodes send 333 a second, and each costs the
SuperLink 2-3.5 ms of CPU on Flower's path (three ``BaseHTTPMiddleware`` layers, FastAPI's routing
and dependencies, two hops to the thread pool, a scan of every stored instruction), so one process
came near saturation at 1,000 idle nodes (``benchmarks/RESULTS.md``). Almost every one of those polls
finds nothing. ``QuietNodes`` knows, for each node, whether Flower's own answer to its last poll was
"nothing" and no instruction for it has been stored since; ``IdlePolls`` answers such a node's poll
itself, after the same checks Flower and the Fleet guard make (Flower's ``authenticate_node``: the
signed timestamp, the key's node; the guard's request budget, counted as Flower's path counts it),
with the response Flower would send: an empty ``PullMessagesResponse``. Every other request, every
poll of a node that may have an instruction, and every request that fails a check go on to Flower,
which answers them (its 401, its errors) as before.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
from flwr.supercore.error import FlowerError
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.superlink.dependencies.linkstate import get_linkstate
from flwr.superlink.routers.fleet.node_auth import authenticate_node
from google.protobuf.message import DecodeError
from starlette.requests import Request
from starlette.responses import Response

from fedcifar.superlink.asgi import flower_error_response, read_body

PULL_PATH = "/v1/fleet/pull-messages"
MAX_POLL_BYTES = 4096  # a poll is a node id and a run id; a larger body goes to Flower's path
EMPTY_RESPONSE = PullMessagesResponse().SerializeToString()


class QuietNodes:
    """Which nodes hold no undelivered instruction, as far as Flower's own last answer to their poll
    says: a count of instructions stored for each node (``stored``, called once Flower's state has
    stored one), and the count each node's last empty answer was given at (``watch``: the count is
    read before Flower looks, so an instruction stored while it looks leaves the node not quiet).
    A new process knows no node as quiet: its first poll goes Flower's way."""

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

    def watch(self, pull_messages: Callable) -> Callable:
        """Flower's ``pull_messages`` handler, noting the nodes it found nothing for."""

        def watched(*, request, **kwargs):
            node_id = request.node.node_id
            with self._lock:
                count = self._stored[node_id]
            response = pull_messages(request=request, **kwargs)
            if not response.messages_list:
                with self._lock:
                    self._quiet_at[node_id] = count
            return response

        watched.__wrapped__ = pull_messages  # type: ignore[attr-defined]
        return watched

    def watch_store(self, store_message_ins: Callable) -> Callable:
        """A LinkState's ``store_message_ins``, counting each instruction it stored for its node."""

        def counted(state, message):
            message_id = store_message_ins(state, message)
            if message_id:  # counted once stored: a poll that looked before may not have seen it
                self.stored(message.metadata.dst_node_id)
            return message_id

        counted.__wrapped__ = store_message_ins  # type: ignore[attr-defined]
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
        answer = self.answer(Request(scope), body) if body is not None else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        response = flower_error_response(answer) if isinstance(answer, FlowerError) else answer
        await response(scope, receive, send)

    def answer(self, request: Request, body: bytes) -> Response | FlowerError | None:
        """The empty response, the guard's refusal, or None: Flower's path answers."""
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != PROTOBUF_MEDIA_TYPE:
            return None
        poll = PullMessagesRequest()
        try:
            poll.ParseFromString(body)
        except DecodeError:
            return None
        node_id = poll.node.node_id
        if not self.quiet.quiet(node_id):
            return None
        request.state.protobuf_request = poll  # what Flower's authenticate_node reads
        try:
            authenticate_node(request)
        except Exception:  # its 401 (HTTPException), or anything else: Flower's path answers as it does
            return None
        try:
            book = self.guard.admit("pull_messages", node_id, get_linkstate(request))
        except FlowerError as refused:
            return refused
        self.answered(book.site)
        return Response(EMPTY_RESPONSE, media_type=PROTOBUF_MEDIA_TYPE)
