"""The Fleet guard: inside the SuperLink, a registered SuperNode acts only as itself, within budgets.

Flower 1.42's Fleet API checks that a request is signed by a registered key and that the node id
the request names is that key's node (``flwr/superlink/routers/fleet/node_auth.py``); nothing
compares what the request *holds* with that node. The guard wraps Flower's Fleet handlers (its HTTP
router looks each one up on ``fleet_handlers`` at every call; ``flower.fleet.guard_fleet_api``
installs it) and holds the node N a request names to:

- **push-messages**: exactly one message, a reply from N to the SuperLink answering an instruction
  the SuperLink delivered to N, in the same run, that N has not answered yet; its object tree
  within the run's reply layout (number of objects);
- **push-object**: only objects of N's own pending reply, in N's own push session, each within the
  layout's object size and the reply within its total;
- **pull-object / confirm-message-received**: only objects of the messages delivered to N (or of
  N's own replies), in that run;
- **budgets**: replies held per node (stored and not yet taken by the ServerApp: beyond
  ``held_replies``, its oldest go, from Flower's store too), bytes held per site, and requests per
  node: ``requests_per_poll`` per poll interval of the SuperNodes, bursts of ``burst`` (beyond them,
  ``BusyGate`` refuses the node's requests before Flower reads them, until its next token).

The layout is the app's: fedcifar's ServerApp writes the shape its replies take
(``publish_reply_layout``: the model as one float32 vector and a metrics record, a handful of
objects) to ``$FEDCIFAR_FLEET_LAYOUTS/<run id>.json``; runs of other apps get the ceiling of
``GuardSettings``. Every ServerApp the SuperLink runs can write any run's layout, and the guard
keeps the first it reads: the SuperLink's runs are its operator's. A refusal is a Flower API error
— HTTP 403 (Flower's SuperNode logs any 403 as a run that is no longer running, and drops the
message), or 503 with ``Retry-After`` for the request budget, which it retries — with the reason in
its ``extra``, counted in ``fedcifar_fleet_refused_total{reason, site}`` and logged once per node
and reason.

Without SuperNode authentication a request's node is whoever it claims to be: the guard then keeps
each claimed node to itself, but cannot tell a node from one that claims its id. What the guard
remembers lives in the SuperLink's process: after a restart it knows no instruction delivered
before, so a reply to one is refused (the ServerApp that sent it is gone with it).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import status
from flwr.supercore.error.catalog import API_ERROR_MAP, ApiErrorSpec
from grpc import StatusCode

from fedcifar.deploy.registrar import site_of_node
from fedcifar.metrics import UNKNOWN_SITE
from fedcifar.superlink.busy_gate import BUSY_CODE
from fedcifar.superlink.fleet_books import HeldReply, Instruction, NodeBook, remember, tree_ids
from fedcifar.superlink.fleet_budgets import GuardSettings, ReplyLayout, TokenBucket

log = logging.getLogger("flwr.fedcifar.fleet")
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the source of every instruction
# Flower's API error codes (flwr.supercore.error.ApiErrorCode) stay far below these
REFUSED_CODE = 9101
REFUSED_MESSAGE = "Refused by the SuperLink's Fleet guard: a SuperNode may act only as itself, within its budgets."
# in Flower's catalog, so that its error translator answers a refusal: 403
API_ERROR_MAP[REFUSED_CODE] = ApiErrorSpec(StatusCode.PERMISSION_DENIED, status.HTTP_403_FORBIDDEN, REFUSED_MESSAGE)
# why a Fleet request was refused (fedcifar_fleet_refused_total{reason})
REASONS = (
    "not_one_message",  # push-messages with other than one message and one object tree
    "other_node",  # a message whose source is another node
    "not_a_reply",  # a message that is not a reply to the SuperLink (an instruction, to a node, no reply_to)
    "unknown_instruction",  # a reply to no instruction delivered to this node in that run and unanswered
    "too_many_objects",  # a reply's object tree above the run's layout
    "object_too_large",  # an object above the layout's object size
    "reply_too_large",  # a reply's objects above the layout's total
    "not_own_object",  # push or pull of an object (or a push session) that is not this node's
    "not_own_message",  # confirm-message-received of a message not delivered to this node
    "site_budget",  # more bytes held for this node's site than its budget
    "rate_limited",  # more requests than the node's request budget
    "unknown_node",  # a node id the SuperLink does not know (claimed, without SuperNode authentication)
)
LAYOUT_RECHECK_SECONDS = 1.0  # how often an unpublished layout is looked for again
LOGGED_CAP = 100_000  # (node, reason) pairs logged; beyond that, refusals are only counted


class Refusal(Exception):
    """A request the guard refuses; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class FleetGuard:
    """The checks and books; ``wrap(name, handler)`` returns Flower's handler with the guard around it."""

    def __init__(
        self,
        settings: GuardSettings,
        count: Callable[[str, str], None] = lambda reason, site: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        seen: Callable[[str], None] = lambda site: None,
        served: Callable[[str, str], None] = lambda handler, site: None,
    ) -> None:
        """``count(reason, site)`` for every refusal; ``seen(site)`` when a site's first node calls;
        ``served(handler, site)`` for every request that names a node, refused or not."""
        self.settings, self.count, self.clock, self.wall, self.seen = settings, count, clock, wall, seen
        self.served = served
        self.ceiling = ReplyLayout.ceiling(settings)
        self.lock = threading.Lock()
        self.books: dict[int, NodeBook] = {}
        self.site_books: dict[str, list[NodeBook]] = {}
        # bytes of replies each site holds: an upper bound, as replies the ServerApp took leave the
        # books lazily (``release``); counted again, over the site's books, only when it meets the budget
        self.site_bytes: Counter[str] = Counter()
        self.layouts: dict[int, ReplyLayout] = {}
        self.unpublished: dict[int, float] = {}  # run id -> when its layout was last looked for
        self.logged: set[tuple[int, str]] = set()
        self.busy: dict[bytes, tuple[float, NodeBook]] = {}  # public key -> (until, its node): over budget
        self.rate_limit = f"above {settings.requests_per_second:g} requests/s (bursts of {settings.burst})"

    # -- the handlers ------------------------------------------------------------------------

    def wrap(self, name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        check = {
            "pull_messages": self.pull_messages,
            "push_messages": self.push_messages,
            "push_object": self.push_object,
            "pull_object": self.pull_object,
            "confirm_message_received": self.confirm_message_received,
        }.get(name, self.metered)  # heartbeats, activation, runs, FABs: metered only

        def guarded(*, request, state, **kwargs):
            node_id = node_of(request, state)
            if node_id is None:  # activation of an unregistered key, or registration: Flower refuses
                return handler(request=request, state=state, **kwargs)
            book = self.admit(name, node_id, state)
            try:
                return check(book, handler, request=request, state=state, **kwargs)
            except Refusal as refusal:
                raise self.refuse(book, name, refusal) from None

        guarded.__name__ = guarded.__qualname__ = f"guarded_{name}"
        guarded.__wrapped__ = handler  # type: ignore[attr-defined]
        return guarded

    def admit(self, name: str, node_id: int, state) -> NodeBook:
        """The book of the node a request names, the request counted and charged to the node's budget;
        a refusal (``refuse``) for a node the SuperLink does not know or one over its budget."""
        book = self.book(node_id, state)
        self.served(name, book.site if book else UNKNOWN_SITE)
        try:
            if book is None:  # a node id no key was registered for (claimed without authentication)
                book = NodeBook(node_id, UNKNOWN_SITE, b"", TokenBucket(0, 0, self.clock))
                raise Refusal("unknown_node", f"node {node_id} is not registered")
            with self.lock:
                if not book.bucket.take():
                    # until its next token, the gate refuses the node's requests before Flower reads them
                    self.busy[book.public_key] = (book.bucket.next_token(), book)
                    raise Refusal("rate_limited", self.rate_limit)
        except Refusal as refusal:
            raise self.refuse(book, name, refusal) from None
        return book

    def pull_messages(self, book: NodeBook, handler, **kwargs):
        response = handler(**kwargs)
        with self.lock:
            for message, tree in zip(response.messages_list, response.message_object_trees, strict=False):
                meta = message.metadata
                instruction = Instruction(meta.run_id, frozenset(tree_ids(tree)), meta.created_at + meta.ttl)
                remember(book.instructions, meta.message_id, instruction)
        return response

    def push_messages(self, book: NodeBook, handler, *, request, state, **kwargs):
        messages, trees = request.messages_list, request.message_object_trees
        if len(messages) != 1 or len(trees) != 1:
            raise Refusal("not_one_message", f"{len(messages)} messages and {len(trees)} object trees")
        meta = messages[0].metadata
        if meta.src_node_id != book.node_id:
            raise Refusal("other_node", f"a message from node {meta.src_node_id}")
        if meta.dst_node_id != SUPERLINK_NODE_ID or not meta.reply_to_message_id:
            raise Refusal("not_a_reply", f"a message to node {meta.dst_node_id} that answers no instruction")
        if trees[0].object_id != meta.message_id:
            raise Refusal("not_a_reply", "an object tree whose root is not the message")
        store = state.object_store
        with self.lock:
            self.release(book, state)
            held = book.held.get(meta.message_id)
            again = held is not None and held.reply_to == meta.reply_to_message_id  # a retried push
            if not again:
                book.expire(self.wall())
                instruction = book.instructions.get(meta.reply_to_message_id)
                if instruction is None or instruction.run_id != meta.run_id:
                    raise Refusal(
                        "unknown_instruction",
                        f"a reply to {meta.reply_to_message_id!r} in run {meta.run_id}: no instruction the "
                        "SuperLink delivered to this node in that run and that it has not answered",
                    )
                # its id, the root of its object tree, must be new: Flower gives a tree's root to the last
                # push session that registered it, so a "reply" named after a held message (the round's
                # instructions) would take over the ServerApp's own push session
                if meta.message_id in store:
                    raise Refusal("not_a_reply", f"message {meta.message_id!r}: the SuperLink holds it already")
            layout = held.layout if again else self.layout(meta.run_id)
            ids = tree_ids(trees[0], layout.max_objects)
            if len(ids) > layout.max_objects:
                raise Refusal(
                    "too_many_objects", f"more than the {layout.max_objects} objects a reply of this run holds"
                )
            if not again:  # the instruction is answered now: a concurrent push for it is refused
                del book.instructions[meta.reply_to_message_id]
                self.make_room(book, state)
                held = HeldReply(meta.message_id, meta.run_id, meta.reply_to_message_id, frozenset(ids), layout)
                book.held[meta.message_id] = held
        try:
            response = handler(request=request, state=state, **kwargs)
        except BaseException:
            if not again:
                with self.lock:
                    self.forget(book, meta.message_id)
                    book.instructions[meta.reply_to_message_id] = instruction
            raise
        with self.lock:
            held.sessions.add(response.session_id)
        return response

    def push_object(self, book: NodeBook, handler, *, request, state, **kwargs):
        size = len(request.object_content)
        with self.lock:
            reply = next((r for r in book.held.values() if request.session_id in r.sessions), None)
            if reply is None or reply.run_id != request.run_id:
                raise Refusal(
                    "not_own_object", f"push session {request.session_id!r}: of no pending reply of this node"
                )
            if request.object_id not in reply.objects:
                raise Refusal("not_own_object", f"object {request.object_id!r}: not in this node's reply")
            if size > reply.layout.max_object_bytes:
                raise Refusal("object_too_large", f"{size} bytes, at most {reply.layout.max_object_bytes}")
            if reply.bytes + size > reply.layout.max_reply_bytes:
                raise Refusal(
                    "reply_too_large", f"{reply.bytes + size} bytes in a reply, at most {reply.layout.max_reply_bytes}"
                )
            if self.site_bytes[book.site] + size > self.settings.site_held_bytes:
                for other in self.site_books[book.site]:  # the bound met: what does the site hold now?
                    self.release(other, state)
                if (site_bytes := self.site_bytes[book.site]) + size > self.settings.site_held_bytes:
                    raise Refusal(
                        "site_budget",
                        f"{site_bytes + size} bytes held for site {book.site}, at most {self.settings.site_held_bytes}",
                    )
            reply.bytes += size  # reserved now, so that concurrent pushes cannot overrun the bounds
            self.site_bytes[book.site] += size
        stored = False
        try:
            response = handler(request=request, state=state, **kwargs)
            stored = response.stored
            return response
        finally:
            if not stored:
                with self.lock:
                    reply.bytes -= size
                    if book.held.get(reply.message_id) is reply:  # else released, its bytes with it
                        self.site_bytes[book.site] -= size

    def pull_object(self, book: NodeBook, handler, *, request, **kwargs):
        with self.lock:
            book.expire(self.wall())
            if not book.may_pull(request.run_id, request.object_id):
                raise Refusal(
                    "not_own_object",
                    f"object {request.object_id!r} of run {request.run_id}: of no message delivered to this node",
                )
        return handler(request=request, **kwargs)

    def confirm_message_received(self, book: NodeBook, handler, *, request, **kwargs):
        with self.lock:
            instruction = book.instructions.get(request.message_object_id)
            if instruction is None or instruction.run_id != request.run_id:
                raise Refusal(
                    "not_own_message",
                    f"message {request.message_object_id!r} of run {request.run_id}: not delivered to this node",
                )
        return handler(request=request, **kwargs)

    def over_budget(self, public_key: bytes) -> float | None:
        """Seconds until the next token of ``public_key``'s node while it is over its request budget
        (``BusyGate``: the refusal is counted), else None."""
        with self.lock:
            until, book = self.busy.get(public_key, (0.0, None))
            wait = until - self.clock()
            if book is None or wait <= 0:
                self.busy.pop(public_key, None)
                return None
        self.count("rate_limited", book.site)
        return wait

    @staticmethod
    def metered(_book: NodeBook, handler, **kwargs):
        return handler(**kwargs)

    # -- books, layouts, refusals --------------------------------------------------------------

    def book(self, node_id: int, state) -> NodeBook | None:
        """The node's book (made on its first call); None for a node the SuperLink does not know."""
        with self.lock:
            book = self.books.get(node_id)
        if book is None:
            info = state.get_node_info(node_ids=[node_id])
            if not info:
                return None
            site = site_of_node(info[0].name) if info[0].name else UNKNOWN_SITE
            key = info[0].public_key
            bucket = TokenBucket(self.settings.requests_per_second, self.settings.burst, self.clock)
            with self.lock:
                first = site not in self.site_books
                if node_id not in self.books:
                    self.books[node_id] = NodeBook(node_id, site, key, bucket)
                    self.site_books.setdefault(site, []).append(self.books[node_id])
                book = self.books[node_id]
            if first:
                self.seen(site)
        return book

    def release(self, book: NodeBook, state) -> None:
        """Forget the node's replies that the SuperLink no longer stores (the ServerApp took them, or a
        push session expired) or stores only until Flower cleans up their ended run."""
        store = state.object_store
        runs = {r.run_id for r in book.held.values()}
        statuses = state.get_run_status(runs) if runs else {}
        ended = {run for run in runs if run not in statuses or statuses[run].status == "finished"}
        # a reply whose push is under way has no session yet, nor its root in the store: it stays
        gone = [m for m, r in book.held.items() if r.sessions and (m not in store or r.run_id in ended)]
        for message_id in gone:
            self.forget(book, message_id)

    def forget(self, book: NodeBook, message_id: str) -> HeldReply | None:
        """Drop a reply from the node's books, and its bytes from its site's."""
        reply = book.held.pop(message_id, None)
        if reply is not None:
            self.site_bytes[book.site] -= reply.bytes
        return reply

    def make_room(self, book: NodeBook, state) -> None:
        """Keep at most ``held_replies`` - 1 replies of the node held, before it holds a new one: the
        oldest go, from Flower's store too. The ServerApp takes a reply as soon as it is stored, so one that newer
        replies have overtaken is one it gave up on (it came after the round's deadline), and the
        SuperLink would keep it until the run ends: a straggler holds a few, never more."""
        while len(book.held) >= self.settings.held_replies:
            oldest = self.forget(book, next(iter(book.held)))
            state.object_store.delete(oldest.message_id)
            log.info(
                "Fleet guard: dropped node %d's untaken reply %s (newer ones came)", book.node_id, oldest.message_id
            )

    def layout(self, run_id: int) -> ReplyLayout:
        if run_id in self.layouts:
            return self.layouts[run_id]
        folder = self.settings.layouts
        now = self.clock()
        if folder and now - self.unpublished.get(run_id, -math.inf) >= LAYOUT_RECHECK_SECONDS:
            self.unpublished[run_id] = now
            try:
                self.layouts[run_id] = ReplyLayout(**json.loads((Path(folder) / f"{run_id}.json").read_text()))
                self.unpublished.pop(run_id, None)
                layout = self.layouts[run_id]
                log.info(
                    "Fleet guard: a reply of run %d holds at most %d objects, %d bytes an object, %d bytes in all",
                    run_id,
                    layout.max_objects,
                    layout.max_object_bytes,
                    layout.max_reply_bytes,
                )
                return self.layouts[run_id]
            except (OSError, ValueError, TypeError):
                pass
        return self.ceiling

    def refuse(self, book: NodeBook, handler: str, refusal: Refusal) -> Exception:
        from flwr.supercore.error import FlowerError

        from fedcifar.server.ledger import brief

        self.count(refusal.reason, book.site)
        key = (book.node_id, refusal.reason)
        with self.lock:
            first = key not in self.logged and len(self.logged) < LOGGED_CAP
            self.logged.add(key)
        if first:
            log.warning(
                "Fleet guard refused %s of node %d (site %s): %s: %s (said once per node and reason; "
                "counted in fedcifar_fleet_refused_total)",
                handler,
                book.node_id,
                book.site,
                refusal.reason,
                brief(refusal.detail),
            )
        busy = refusal.reason == "rate_limited"
        return FlowerError(
            BUSY_CODE if busy else REFUSED_CODE,
            f"Fleet guard: node {book.node_id}: {refusal.reason}",
            public_details=f"fedcifar Fleet guard: {refusal.reason}: {brief(refusal.detail)}",
        )


def node_of(request, state) -> int | None:
    """The node a Fleet request names (the signing key's node, with SuperNode authentication); None
    for the activation of a key that is not registered (Flower refuses it)."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest

    if isinstance(request, ActivateNodeRequest):
        return state.get_node_id_by_public_key(request.public_key)
    if isinstance(request, DeactivateNodeRequest):
        return request.node_id
    return request.node.node_id


# Flower's Fleet handlers the guard wraps (registration is Flower's to refuse under authentication)
GUARDED: Iterable[str] = (
    "pull_messages",
    "push_messages",
    "push_object",
    "pull_object",
    "confirm_message_received",
    "send_node_heartbeat",
    "activate_node",
    "deactivate_node",
    "get_run",
    "get_fab",
)
