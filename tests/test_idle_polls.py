"""A quiet node's poll answered before Flower's request path (``superlink/idle_polls.py``): when a node
counts as quiet, and the body a layer reads handed on whole. The layer in a real SuperLink, its checks
and a run through it: ``tests/test_hollow.py``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node

from fedcifar.superlink.asgi import read_body
from fedcifar.superlink.idle_polls import MAX_POLL_BYTES, IdlePolls, QuietNodes


def poll(node_id: int) -> PullMessagesRequest:
    return PullMessagesRequest(node=Node(node_id=node_id))


class State:
    """A LinkState's instructions: stored for known nodes, looked up (and delivered) by node."""

    def __init__(self, nodes) -> None:
        self.nodes, self.undelivered = set(nodes), []

    def store_message_ins(self, message):
        if message.metadata.dst_node_id not in self.nodes:
            return None
        self.undelivered.append(message)
        return f"id-{len(self.undelivered)}"

    def store_message_and_object_tree(self, message, object_tree, session_id):
        return self.store_message_ins(message) is not None, []

    def get_message_ins(self, node_id, limit, *, run_id=None):
        found = [m for m in self.undelivered if m.metadata.dst_node_id == node_id][:limit]
        self.undelivered = [m for m in self.undelivered if not any(m is f for f in found)]
        return found


def instruction(node_id: int, reply_to: str = ""):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node_id, reply_to_message_id=reply_to))


def watched(quiet: QuietNodes):
    """``State`` with its store and lookup watched, as ``flower.fleet`` watches Flower's."""
    return type(
        "Watched",
        (State,),
        {
            "store_message_ins": quiet.watch_store(State.store_message_ins),
            "store_message_and_object_tree": quiet.watch_store(State.store_message_and_object_tree),
            "get_message_ins": quiet.watch_lookup(State.get_message_ins),
        },
    )


def test_a_node_is_quiet_once_flower_found_nothing_for_it_until_an_instruction_is_stored_for_it():
    quiet = QuietNodes()
    state = watched(quiet)({5, 6})
    assert not quiet.quiet(5)  # a new process knows no node as quiet: the first poll goes Flower's way
    assert state.get_message_ins(5, 1) == []
    assert quiet.quiet(5) and not quiet.quiet(6)
    state.store_message_ins(instruction(5))
    state.store_message_and_object_tree(instruction(5), None, "session")
    assert not quiet.quiet(5)  # its poll goes to Flower, which delivers the instructions
    assert len(state.get_message_ins(5, 1)) == 1
    assert not quiet.quiet(5)  # a lookup that found one says nothing of what is left
    assert len(state.get_message_ins(5, 1)) == 1 and not quiet.quiet(5)
    assert state.get_message_ins(5, 1) == [] and quiet.quiet(5)
    state.store_message_ins(instruction(6))  # another node's instruction
    state.store_message_ins(instruction(7))  # not stored: nothing counted
    state.store_message_and_object_tree(instruction(5, reply_to="abc"), None, "session")  # a reply
    assert quiet.quiet(5)
    state.nodes.add(8)
    assert state.get_message_ins(8, 1, run_id=3) == [] and not quiet.quiet(8)  # one run's: not the others'


def test_an_instruction_stored_while_flower_looks_leaves_the_node_not_quiet():
    """The count is read before Flower looks and the store counted once it returned: an instruction
    Flower's lookup may have missed keeps the node's next poll on Flower's path."""
    quiet = QuietNodes()
    store = quiet.watch_store(State.store_message_ins)

    class Racing(State):
        def get_message_ins(self, node_id, limit, *, run_id=None):
            found = super().get_message_ins(node_id, limit, run_id=run_id)
            store(self, instruction(5))  # stored (and counted) after the lookup looked
            return found

    assert quiet.watch_lookup(Racing.get_message_ins)(Racing({5}), 5, 1) == []
    assert not quiet.quiet(5)


async def chunks_of(receive) -> list[dict]:
    messages = [await receive()]
    while messages[-1].get("more_body"):
        messages.append(await receive())
    return messages


def receiver(*messages: dict):
    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


def test_a_small_body_is_read_and_handed_on_whole():
    async def go():
        body, replay = await read_body(
            receiver(
                {"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"c", "more_body": False},
            ),
            16,
        )
        return body, await chunks_of(replay)

    body, handed_on = asyncio.run(go())
    assert body == b"abc"
    assert handed_on == [{"type": "http.request", "body": b"abc", "more_body": False}]


def test_a_large_body_is_not_read_past_the_limit_and_handed_on_whole():
    async def go():
        body, replay = await read_body(
            receiver(
                {"type": "http.request", "body": b"x" * 10, "more_body": True},
                {"type": "http.request", "body": b"y" * 10, "more_body": True},
                {"type": "http.request", "body": b"z", "more_body": False},
            ),
            8,
        )
        return body, await chunks_of(replay)

    body, handed_on = asyncio.run(go())
    assert body is None
    assert b"".join(m["body"] for m in handed_on) == b"x" * 10 + b"y" * 10 + b"z"


def test_a_client_gone_mid_body_is_handed_on_as_gone():
    async def go():
        body, replay = await read_body(receiver({"type": "http.request", "body": b"x", "more_body": True}), 8)
        return body, await replay()

    body, first = asyncio.run(go())
    assert body is None and first == {"type": "http.disconnect"}


def test_a_single_chunk_over_the_limit_is_not_read_as_a_poll():
    async def go():
        body, replay = await read_body(receiver({"type": "http.request", "body": b"x" * 9, "more_body": False}), 8)
        return body, await chunks_of(replay)

    body, handed_on = asyncio.run(go())
    assert body is None and handed_on == [{"type": "http.request", "body": b"x" * 9, "more_body": False}]


POLL = poll(5).SerializeToString()


@pytest.mark.parametrize(
    ("path", "content_type", "body", "plugin"),
    [
        ("/v1/fleet/push-messages", "application/protobuf", POLL, None),  # not a poll
        ("/v1/fleet/pull-messages", "application/protobuf", POLL, object()),  # a Fleet event-log plugin
        ("/v1/fleet/pull-messages", "application/json", POLL, None),
        ("/v1/fleet/pull-messages", "application/protobuf", b"\xff\xff\xff", None),  # no protobuf
        ("/v1/fleet/pull-messages", "application/protobuf", POLL + b"\x00" * MAX_POLL_BYTES, None),  # too large
    ],
)
def test_what_is_no_small_well_formed_poll_goes_to_flowers_path_whole(path, content_type, body, plugin):
    """Before any check of its own: Flower's path answers these as it always did, with the body intact."""
    reached = []

    async def flower(scope, receive, send):
        reached.append((scope["path"], b"".join(m["body"] for m in await chunks_of(receive))))

    layer = IdlePolls(flower, QuietNodes(), guard=None)  # the guard is never asked
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", content_type.encode())],
        "app": SimpleNamespace(state=SimpleNamespace(fleet_event_log_plugin=plugin)),
    }

    async def send(message):
        raise AssertionError(f"answered before Flower's path: {message}")

    half = len(body) // 2
    asyncio.run(
        layer(
            scope,
            receiver(
                {"type": "http.request", "body": body[:half], "more_body": True},
                {"type": "http.request", "body": body[half:], "more_body": False},
            ),
            send,
        )
    )
    assert reached == [(path, body)]
