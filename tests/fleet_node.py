"""A SuperNode the test drives request by request, with Flower's own Fleet client and request signer
(``FleetHttpClient``, ``NodeAuthHttpInterceptor``): an honest node whose timing the test sets, or an
attacker holding a registered key. Test helper, never shipped.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.app.message import Message
from flwr.app.message.message import make_message, remove_content_from_message
from flwr.app.metadata import Metadata
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest, PullMessagesRequest, PushMessagesRequest
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ObjectTree,
    PullObjectRequest,
    PushObjectRequest,
)
from flwr.proto.node_pb2 import Node
from flwr.supercore.error import FlowerError
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedcifar.deploy.key_formats import load_private_key

SUPERLINK = 1


@dataclass
class Refused(Exception):
    """An HTTP error answer: its status and the Flower error it carries (None: not one)."""

    status: int
    error: FlowerError | None

    @property
    def reason(self) -> str:
        """The Fleet guard's reason (``fedcifar Fleet guard: <reason>: ...``), else Flower's message."""
        details = (self.error.public_details or "") if self.error else ""
        if details.startswith("fedcifar Fleet guard: "):
            return details.split(": ")[1]
        return self.error.message if self.error else f"HTTP {self.status}"


def forged(run_id: int, src: int, dst: int, content: RecordDict, reply_to: str = "", ttl: float = 3600.0) -> Message:
    """A message with whatever metadata its sender likes (its id, as Flower sets it: its object id)."""
    meta = Metadata(run_id, "", src, dst, reply_to, "1", time.time(), ttl, "train")
    message = make_message(meta, content)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


class FleetNode:
    def __init__(self, address: str, ca: Path, private_key: Path) -> None:
        key = load_private_key(private_key.read_bytes())
        self.public_key = public_key_to_bytes(key.public_key())
        self.client = FleetHttpClient.from_server_address(
            address, False, ca.read_bytes(), [NodeAuthHttpInterceptor(key, key.public_key())]
        )
        self.node_id = 0

    def call(self, method: str, request):
        try:
            return getattr(self.client, method)(request)
        except httpx.HTTPStatusError as err:
            raise Refused(err.response.status_code, FlowerError.from_json(err.response.text)) from None

    @property
    def node(self) -> Node:
        return Node(node_id=self.node_id)

    def activate(self, heartbeat_interval: float = 600) -> int:
        """Online for twice ``heartbeat_interval`` (the test sends no heartbeats)."""
        request = ActivateNodeRequest(public_key=self.public_key, heartbeat_interval=heartbeat_interval)
        self.node_id = self.call("ActivateNode", request).node_id
        return self.node_id

    def deactivate(self) -> None:
        self.call("DeactivateNode", DeactivateNodeRequest(node_id=self.node_id))

    def pull(self) -> tuple[Message, ObjectTree] | None:
        """The next instruction for this node (its metadata; the content stays at the SuperLink)."""
        reply = self.call("PullMessages", PullMessagesRequest(node=self.node))
        if not reply.messages_list:
            return None
        return message_from_proto(reply.messages_list[0]), reply.message_object_trees[0]

    def wait_for_instruction(self, timeout: float = 120, latencies: list | None = None) -> tuple[Message, ObjectTree]:
        """Poll every 0.1 s until an instruction comes; each poll's seconds into ``latencies``."""
        from tests.support import wait  # not at the top: tests.fleet_flood's process needs none of it (torch)

        def poll() -> tuple[Message, ObjectTree] | None:
            started = time.perf_counter()
            pulled = self.pull()
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
            return pulled

        return wait(f"an instruction for node {self.node_id}", poll, timeout, interval=0.1)

    def pull_object(self, run_id: int, object_id: str):
        return self.call("PullObject", PullObjectRequest(node=self.node, run_id=run_id, object_id=object_id))

    def available_object(self, run_id: int, object_id: str):
        """``pull_object``'s answer where the object is available, else None."""
        reply = self.pull_object(run_id, object_id)
        return reply if reply.object_available else None

    def receive(self, message: Message, tree: ObjectTree) -> Message:
        """Pull an instruction's objects, confirm it, and return it whole (as Flower's SuperNode does)."""
        from tests.support import wait  # not at the top: tests.fleet_flood's process needs none of it (torch)

        run_id = message.metadata.run_id
        contents = {}
        for tree_node in iterate_object_tree(tree):
            # the sender may still be pushing it: Flower retries too
            probe = functools.partial(self.available_object, run_id, tree_node.object_id)
            reply = wait(f"object {tree_node.object_id} to become available", probe, 30, interval=0.05)
            contents[tree_node.object_id] = reply.object_content
        self.confirm(run_id, tree.object_id)
        whole = inflate_object_from_contents(tree.object_id, contents, keep_object_contents=False)
        whole.metadata.__dict__["_message_id"] = tree.object_id  # not in its content: Flower sets it so too
        return whole

    def confirm(self, run_id: int, message_id: str) -> None:
        self.call(
            "ConfirmMessageReceived",
            ConfirmMessageReceivedRequest(node=self.node, run_id=run_id, message_object_id=message_id),
        )

    def push(self, message: Message, objects: dict[str, bytes] | None = None, tree: ObjectTree | None = None):
        """Push ``message`` and then the objects the SuperLink asks for (by default its own, as Flower's
        SuperNode sends them); returns the push-messages reply and how many objects were stored."""
        tree = tree or get_object_tree(message)
        if objects is None:
            objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
        reply = self.call(
            "PushMessages",
            PushMessagesRequest(
                node=self.node,
                messages_list=[message_to_proto(remove_content_from_message(message))],
                message_object_trees=[tree],
            ),
        )
        stored = 0
        for object_id in reply.objects_to_push:
            pushed = self.call(
                "PushObject",
                PushObjectRequest(
                    node=self.node,
                    run_id=message.metadata.run_id,
                    session_id=reply.session_id,
                    object_id=object_id,
                    object_content=objects[object_id],
                ),
            )
            stored += pushed.stored
        return reply, stored


def train_reply_content(arrays: ArrayRecord, metrics: dict) -> RecordDict:
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
