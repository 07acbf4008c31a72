"""A quiet node's poll answered before Flower's request path (``superlink/idle_polls.py``): when a node
counts as quiet, and the body a layer reads handed on whole. The layer in a real SuperLink, its checks
and a run through it: ``tests/test_hollow.py``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
from flwr.proto.node_pb2 import Node

from fedcifar.superlink.asgi import read_body
from fedcifar.superlink.idle_polls import QuietNodes


def poll(node_id: int) -> PullMessagesRequest:
    return PullMessagesRequest(node=Node(node_id=node_id))


class State:
    """A LinkState's ``store_message_ins``: stores what is addressed to a known node."""

    def __init__(self, nodes) -> None:
        self.nodes, self.stored = set(nodes), []

    def store_message_ins(self, message):
        if message.metadata.dst_node_id not in self.nodes:
            return None
        self.stored.append(message)
        return f"id-{len(self.stored)}"


def instruction(node_id: int):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node_id))


def pulled(found: int) -> PullMessagesResponse:
    from flwr.proto.message_pb2 import Message

    return PullMessagesResponse(messages_list=[Message() for _ in range(found)])


def test_a_node_is_quiet_once_flower_found_nothing_for_it_until_an_instruction_is_stored_for_it():
    quiet = QuietNodes()
    holds = {5: 0, 6: 0}

    def flower(*, request, **kwargs):
        node_id = request.node.node_id
        found, holds[node_id] = holds[node_id], 0
        return pulled(found)

    watched = quiet.watch(flower)
    assert not quiet.quiet(5)  # a new process knows no node as quiet: the first poll goes Flower's way
    watched(request=poll(5))
    assert quiet.quiet(5) and not quiet.quiet(6)
    state, store = State({5, 6}), quiet.watch_store(State.store_message_ins)
    assert store(state, instruction(5)) == "id-1"
    holds[5] += 1
    assert not quiet.quiet(5)  # its poll goes to Flower, which delivers the instruction
    assert len(watched(request=poll(5)).messages_list) == 1
    assert not quiet.quiet(5)  # a poll that found something says nothing of what is left
    watched(request=poll(5))
    assert quiet.quiet(5)
    store(state, instruction(6))  # another node's instruction
    assert quiet.quiet(5)
    assert store(state, instruction(7)) is None and quiet.quiet(5)  # not stored: nothing counted


def test_an_instruction_stored_while_flower_looks_leaves_the_node_not_quiet():
    """The count is read before Flower looks and the store counted once stored: an instruction Flower's
    scan may have missed keeps the node's next poll on Flower's path."""
    quiet = QuietNodes()
    state = State({5})
    store = quiet.watch_store(State.store_message_ins)

    def flower(*, request, **kwargs):
        store(state, instruction(5))  # stored (and counted) after Flower's scan, before it answers
        return pulled(0)

    quiet.watch(flower)(request=poll(5))
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
