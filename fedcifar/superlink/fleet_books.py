"""What the Fleet guard remembers of each node: the instructions delivered to it, its replies held."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fedcifar.superlink.fleet_budgets import ReplyLayout, TokenBucket

MEMORY_CAP = 1024  # entries a node's book keeps at most of each kind (oldest dropped)


@dataclass
class Instruction:
    """A message the SuperLink delivered to the node: the objects it may pull, until it answers."""

    run_id: int
    objects: frozenset[str]
    expires: float  # wall clock: created_at + ttl


@dataclass
class HeldReply:
    """A reply of the node the SuperLink stores until the ServerApp takes it (or its run ends)."""

    message_id: str
    run_id: int
    reply_to: str
    objects: frozenset[str]
    layout: ReplyLayout
    sessions: set[str] = field(default_factory=set)  # Flower's push sessions for it (one more per retry)
    bytes: int = 0


@dataclass
class NodeBook:
    node_id: int
    site: str
    public_key: bytes  # as registered: what the gate matches a request's key header against
    bucket: TokenBucket
    instructions: OrderedDict[str, Instruction] = field(default_factory=OrderedDict)  # delivered, unanswered
    held: OrderedDict[str, HeldReply] = field(default_factory=OrderedDict)  # by reply message id, oldest first

    def expire(self, wall: float) -> None:
        for message_id in [m for m, i in self.instructions.items() if i.expires <= wall]:
            del self.instructions[message_id]

    def may_pull(self, run_id: int, object_id: str) -> bool:
        return any(i.run_id == run_id and object_id in i.objects for i in self.instructions.values()) or any(
            r.run_id == run_id and object_id in r.objects for r in self.held.values()
        )


def remember(book: OrderedDict, key: str, value: Any) -> None:
    """``book[key] = value``, dropping the oldest entries beyond ``MEMORY_CAP``."""
    book[key] = value
    book.move_to_end(key)
    while len(book) > MEMORY_CAP:
        book.popitem(last=False)


def tree_ids(tree, most: int | None = None) -> list[str]:
    """The object ids of ``tree``; of a node's tree, no more than ``most`` + 1 (enough to refuse it)."""
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

    return [node.object_id for node in itertools.islice(iterate_object_tree(tree), None if most is None else most + 1)]
