"""The Fleet guard's rules one by one (``fedcifar/superlink/fleet_guard.py``), around stand-ins for Flower's
handlers and state; ``test_fleet_guard.py`` runs it for real inside a SuperLink."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest, PushMessagesResponse
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node, NodeInfo
from flwr.supercore.error import FlowerError
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import RunStatus

from fedcifar.superlink.busy_gate import BUSY_CODE, BusyGate
from fedcifar.superlink.fleet_budgets import GuardSettings, ReplyLayout, publish_reply_layout
from fedcifar.superlink.fleet_guard import REFUSED_CODE, FleetGuard
from fedcifar.task import MODEL_KEY, Net, flat_weights
from tests.fleet_node import SUPERLINK, forged

RUN = 7
SITES = {5: "site-a/slot-0", 6: "site-a/slot-1", 9: "site-b/slot-2"}


class Store(set):
    """The object store's keys (what the guard asks of it: ``in`` and ``delete``)."""

    def delete(self, object_id: str) -> None:
        self.discard(object_id)


class State:
    """What the guard reads of Flower's LinkState: node names, runs' status, the object store."""

    def __init__(self) -> None:
        self.object_store, self.finished = Store(), set()

    def get_node_info(self, node_ids):
        return [NodeInfo(node_id=n, name=SITES[n], public_key=f"key-{n}".encode()) for n in node_ids if n in SITES]

    def get_run_status(self, run_ids):
        return {r: RunStatus("finished" if r in self.finished else "running", "", "") for r in run_ids}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Flower:
    """Stand-ins for Flower's Fleet handlers: what they were asked, and plausible answers."""

    def __init__(self, state: State) -> None:
        self.state, self.pending, self.sessions = state, [], 0

    def pull_messages(self, *, request, state, store=None):
        messages, self.pending = self.pending, []
        return PullMessagesResponse(
            messages_list=[message_to_proto(m) for m in messages],
            message_object_trees=[get_object_tree(m) for m in messages],
        )

    def push_messages(self, *, request, state):
        self.sessions += 1
        tree = request.message_object_trees[0]
        self.state.object_store.add(tree.object_id)
        return PushMessagesResponse(session_id=f"session-{self.sessions}", objects_to_push=[tree.object_id])

    def push_object(self, *, request, state):
        return PushObjectResponse(stored=not request.object_content.startswith(b"fail"))

    def pull_object(self, *, request, state):
        return PullObjectResponse(object_found=True, object_available=True, object_content=b"content")

    def confirm_message_received(self, *, request, state, store=None):
        return ConfirmMessageReceivedResponse()


@pytest.fixture
def rig(monkeypatch):
    """A guard with stand-in handlers; ``counted`` collects (reason, site) of each refusal."""
    state, clock, counted = State(), Clock(), []
    flower = Flower(state)
    settings = GuardSettings(requests_per_poll=1, poll_interval=1, burst=100, held_replies=2, site_held_bytes=1000)
    guard = FleetGuard(settings, count=lambda reason, site: counted.append((reason, site)), clock=clock, wall=clock)
    handlers = {name: guard.wrap(name, getattr(flower, name)) for name in vars(Flower) if not name.startswith("_")}
    return state, flower, guard, handlers, clock, counted


SERIAL = itertools.count()


def instruction(node: int, created: float = 0.0, ttl: float = 100.0):
    """An instruction of the SuperLink to ``node`` (each one distinct), created at ``created`` s."""
    message = forged(RUN, SUPERLINK, node, RecordDict({"m": MetricRecord({"serial": next(SERIAL)})}), ttl=ttl)
    message.metadata.__dict__["_created_at"] = created
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def deliver(rig, node: int, **kwargs):
    state, flower, _, handlers, _, _ = rig
    sent = instruction(node, **kwargs)
    flower.pending.append(sent)
    handlers["pull_messages"](request=PullMessagesRequest(node=Node(node_id=node)), state=state, store=None)
    return sent


def reply(to, src: int | None = None, dst: int = SUPERLINK, size: int = 8):
    content = RecordDict({"m": MetricRecord({"loss": 1.0}), "a": ArrayRecord({"w": Array(np.zeros(size, np.uint8))})})
    message = forged(
        RUN, to.metadata.dst_node_id if src is None else src, dst, content, reply_to=to.metadata.message_id
    )
    return message


def push(rig, node: int, message, tree=None, extra_messages: int = 0):
    state, _, _, handlers, _, _ = rig
    proto = message_to_proto(message)
    tree = tree or get_object_tree(message)
    request = PushMessagesRequest(
        node=Node(node_id=node), messages_list=[proto] * (1 + extra_messages), message_object_trees=[tree]
    )
    return handlers["push_messages"](request=request, state=state)


def refusal(call) -> tuple[int, str]:
    with pytest.raises(FlowerError) as caught:
        call()
    return caught.value.code, caught.value.public_details.split(": ")[1]


def test_a_node_answers_only_the_instructions_delivered_to_it(rig):
    sent = deliver(rig, 5)
    other = deliver(rig, 6)
    assert refusal(lambda: push(rig, 5, reply(other, src=5))) == (REFUSED_CODE, "unknown_instruction")
    assert refusal(lambda: push(rig, 5, reply(other))) == (REFUSED_CODE, "other_node")  # in node 6's name
    assert refusal(lambda: push(rig, 5, reply(sent, dst=6))) == (REFUSED_CODE, "not_a_reply")
    assert refusal(lambda: push(rig, 5, reply(sent), extra_messages=1)) == (REFUSED_CODE, "not_one_message")
    injected = forged(RUN, 5, SUPERLINK, RecordDict())  # an "instruction" of its own to the SuperLink
    assert refusal(lambda: push(rig, 5, injected)) == (REFUSED_CODE, "not_a_reply")
    mismatched = reply(sent)
    assert refusal(lambda: push(rig, 5, mismatched, tree=get_object_tree(reply(sent, size=9)))) == (
        REFUSED_CODE,
        "not_a_reply",
    )
    answer = reply(sent)
    push(rig, 5, answer)
    push(rig, 5, answer)  # retried after a lost answer: the same reply again is fine
    assert refusal(lambda: push(rig, 5, reply(sent, size=3))) == (REFUSED_CODE, "unknown_instruction")  # answered
    rig[0].object_store.discard(answer.metadata.message_id)  # the ServerApp took it: pushed again, it is refused
    assert refusal(lambda: push(rig, 5, answer)) == (REFUSED_CODE, "unknown_instruction")
    # a "reply" named after a message the SuperLink holds (its root would take over that message's push session)
    held = deliver(rig, 5)
    rig[0].object_store.add(held.metadata.message_id)
    named_after = forged(RUN, 5, SUPERLINK, RecordDict(), reply_to=held.metadata.message_id)
    named_after.metadata.__dict__["_message_id"] = held.metadata.message_id
    tree = get_object_tree(named_after)
    tree.object_id = held.metadata.message_id
    assert refusal(lambda: push(rig, 5, named_after, tree=tree)) == (REFUSED_CODE, "not_a_reply")
    expired = deliver(rig, 5, created=-200.0)  # its ttl (100 s) ran out before it was answered
    assert refusal(lambda: push(rig, 5, reply(expired))) == (REFUSED_CODE, "unknown_instruction")


def test_a_node_pulls_and_confirms_only_what_was_delivered_to_it(rig):
    state, _, _, handlers, _, _ = rig
    sent = deliver(rig, 5)
    own = get_object_tree(sent)

    def pull(node, object_id, run=RUN):
        request = PullObjectRequest(node=Node(node_id=node), run_id=run, object_id=object_id)
        return handlers["pull_object"](request=request, state=state)

    def confirm(node, message_id, run=RUN):
        request = ConfirmMessageReceivedRequest(node=Node(node_id=node), run_id=run, message_object_id=message_id)
        return handlers["confirm_message_received"](request=request, state=state, store=None)

    for child in own.children:
        assert pull(5, child.object_id).object_found
    assert refusal(lambda: pull(6, own.object_id)) == (REFUSED_CODE, "not_own_object")
    assert refusal(lambda: pull(5, own.object_id, run=RUN + 1)) == (REFUSED_CODE, "not_own_object")
    assert refusal(lambda: confirm(6, own.object_id)) == (REFUSED_CODE, "not_own_message")
    confirm(5, own.object_id)


def test_a_reply_is_bounded_by_the_runs_layout_before_it_is_stored(rig, tmp_path):
    state, _, guard, handlers, _, counted = rig
    guard.settings = GuardSettings(**{**json.loads(guard.settings.to_env()), "layouts": str(tmp_path)})
    tight = ReplyLayout(max_objects=6, max_object_bytes=120, max_reply_bytes=300)
    (tmp_path / f"{RUN}.json").write_text(json.dumps(tight.__dict__))
    answer = reply(deliver(rig, 5))
    ids = list(get_all_nested_objects(answer))
    assert len(ids) == 6
    pushed = push(rig, 5, answer)

    def push_object(object_id, content, session=pushed.session_id, node=5):
        request = PushObjectRequest(
            node=Node(node_id=node), run_id=RUN, session_id=session, object_id=object_id, object_content=content
        )
        return handlers["push_object"](request=request, state=state)

    assert refusal(lambda: push_object(ids[0], b"x" * 121)) == (REFUSED_CODE, "object_too_large")
    assert refusal(lambda: push_object("f" * 64, b"x")) == (REFUSED_CODE, "not_own_object")
    assert refusal(lambda: push_object(ids[0], b"x", session="session-of-another")) == (REFUSED_CODE, "not_own_object")
    assert refusal(lambda: push_object(ids[0], b"x", node=6)) == (REFUSED_CODE, "not_own_object")
    assert not push_object(ids[0], b"fail" + b"x" * 116).stored  # Flower did not store it: its bytes do not count
    assert push_object(ids[0], b"y" * 120).stored and push_object(ids[1], b"y" * 120).stored
    assert refusal(lambda: push_object(ids[2], b"y" * 120)) == (REFUSED_CODE, "reply_too_large")  # 360 > 300
    assert {reason for reason, _ in counted} == {"object_too_large", "not_own_object", "reply_too_large"}
    assert {site for _, site in counted} == {"site-a"}


def test_an_unpublished_layout_is_the_ceiling_and_the_object_count_is_checked_first(rig):
    _, _, guard, _, _, _ = rig
    guard.ceiling = ReplyLayout(max_objects=3, max_object_bytes=10, max_reply_bytes=10)
    answer = reply(deliver(rig, 5))
    assert refusal(lambda: push(rig, 5, answer)) == (REFUSED_CODE, "too_many_objects")


def test_replies_held_per_node_and_bytes_per_site_are_budgeted(rig):
    state, _, guard, handlers, _, _ = rig
    first, second, third = (reply(deliver(rig, 5)) for _ in range(3))
    for answer in (first, second, third):
        push(rig, 5, answer)
    # held_replies = 2: the oldest untaken reply made room, from Flower's store too
    assert first.metadata.message_id not in state.object_store
    assert list(guard.books[5].held) == [second.metadata.message_id, third.metadata.message_id]
    state.finished.add(RUN)  # a run that ended holds nothing of the node's (Flower cleans it up)
    guard.release(guard.books[5], state)
    assert not guard.books[5].held
    state.finished.clear()

    def fill(node: int, response, size: int):
        request = PushObjectRequest(
            node=Node(node_id=node),
            run_id=RUN,
            session_id=response.session_id,
            object_id=response.objects_to_push[0],
            object_content=b"z" * size,
        )
        return handlers["push_object"](request=request, state=state)

    taken = reply(deliver(rig, 5))
    held = push(rig, 5, taken)
    assert fill(5, held, 600).stored
    other = push(rig, 6, reply(deliver(rig, 6)))  # the same site: 600 + 600 > 1000
    assert refusal(lambda: fill(6, other, 600)) == (REFUSED_CODE, "site_budget")
    elsewhere = push(rig, 9, reply(deliver(rig, 9)))  # another site has a budget of its own
    assert fill(9, elsewhere, 600).stored
    # the ServerApp takes node 5's reply: the site's count, met, is counted again, and node 6's goes in
    state.object_store.delete(taken.metadata.message_id)
    site = guard.books[5].site
    assert guard.site_bytes[site] == 600
    assert fill(6, other, 600).stored
    assert guard.site_bytes[site] == 600 and not guard.books[5].held


def test_requests_above_the_budget_are_busy_and_refusals_are_logged_once(rig, caplog):
    state, _, guard, handlers, clock, counted = rig
    poll = PullMessagesRequest(node=Node(node_id=9))
    for _ in range(100):  # the burst
        handlers["pull_messages"](request=poll, state=state, store=None)
    with caplog.at_level(logging.WARNING, logger="flwr.fedcifar.fleet"):
        for _ in range(3):
            assert refusal(lambda: handlers["pull_messages"](request=poll, state=state, store=None)) == (
                BUSY_CODE,
                "rate_limited",
            )
    assert counted == [("rate_limited", "site-b")] * 3
    assert len([r for r in caplog.records if "rate_limited" in r.getMessage()]) == 1
    clock.now += 2.0  # 1 request per second
    handlers["pull_messages"](request=poll, state=state, store=None)
    handlers["pull_messages"](request=poll, state=state, store=None)
    assert refusal(lambda: handlers["pull_messages"](request=poll, state=state, store=None))[1] == "rate_limited"


def test_the_layout_of_fedcifars_replies(tmp_path, monkeypatch):
    """The model as one float32 vector in one chunk, and a handful of records: about 250 KB in all."""
    model = flat_weights(Net())
    content = RecordDict({"arrays": ArrayRecord({MODEL_KEY: Array(model)}), "metrics": MetricRecord({"a": 1})})
    layout = ReplyLayout.of(content)
    assert layout.max_objects == 6 + 4  # message, record dict, array record, array, its chunk, metrics; 4 more
    assert model.nbytes < layout.max_object_bytes < model.nbytes + 4096
    assert layout.max_reply_bytes < 4 * model.nbytes
    assert publish_reply_layout(3, layout) is None  # no SuperLink listens: nothing written
    monkeypatch.setenv("FEDCIFAR_FLEET_LAYOUTS", str(tmp_path))
    assert json.loads(publish_reply_layout(3, layout).read_text()) == layout.__dict__


def test_settings_must_be_positive():
    with pytest.raises(ValueError, match="burst=0"):
        GuardSettings(burst=0)


def test_each_site_is_announced_once_for_its_zero_series():
    state, sites = State(), []
    guard = FleetGuard(GuardSettings(), seen=sites.append)
    poll = guard.wrap("pull_messages", Flower(state).pull_messages)
    for node in (5, 6, 9, 5):
        poll(request=PullMessagesRequest(node=Node(node_id=node)), state=state, store=None)
    assert sites == ["site-a", "site-b"]


def test_a_node_over_its_budget_is_refused_at_the_gate_before_flower_reads_its_requests(rig):
    state, _, guard, handlers, clock, counted = rig
    poll = PullMessagesRequest(node=Node(node_id=9))
    for _ in range(101):  # the burst, and one more: refused after Flower's authentication
        with contextlib.suppress(FlowerError):
            handlers["pull_messages"](request=poll, state=state, store=None)
    reached = []

    async def flower(scope, receive, send):
        reached.append(dict(scope["headers"])[b"flwr-public-key"])

    gate = BusyGate(flower, guard)

    def call(key: bytes, path: str = "/v1/fleet/pull-messages") -> list[dict]:
        scope = {"type": "http", "path": path, "headers": [(b"flwr-public-key", base64.b64encode(key))]}
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"x", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(gate(scope, receive, send))
        return sent

    refused = call(b"key-9")
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["code"] == BUSY_CODE
    assert counted == [("rate_limited", "site-b")] * 2  # once by the guard, once at the gate
    call(b"key-5")  # another node's requests pass
    call(b"key-9", "/health")  # and what is not the Fleet API
    clock.now += 1.0  # its next token
    call(b"key-9")
    assert reached == [base64.b64encode(k) for k in (b"key-5", b"key-9", b"key-9")]


def test_a_node_the_superlink_does_not_know_is_refused_without_a_book_of_its_own(rig):
    state, _, guard, handlers, _, counted = rig
    for claimed in range(1000, 1100):  # without authentication a node is whoever it claims to be
        poll = PullMessagesRequest(node=Node(node_id=claimed))
        assert refusal(lambda poll=poll: handlers["pull_messages"](request=poll, state=state, store=None)) == (
            REFUSED_CODE,
            "unknown_node",
        )
    assert not guard.books and counted == [("unknown_node", "unknown")] * 100


def test_a_reply_whose_push_is_under_way_is_not_taken_for_gone(rig):
    """Another request of the site forgets the node's replies the SuperLink no longer holds while Flower
    is still storing this one (its id not yet in the store): it must stay held."""
    state, flower, guard, handlers, _, _ = rig
    sent = deliver(rig, 5)
    storing = flower.push_messages

    def racing(**kwargs):
        guard.release(guard.books[5], state)
        return storing(**kwargs)

    handlers["push_messages"] = guard.wrap("push_messages", racing)
    answer = reply(sent)
    push(rig, 5, answer)
    assert answer.metadata.message_id in guard.books[5].held
