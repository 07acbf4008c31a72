"""Who holds which slot: the SuperNodes of a run, as the server has come to know them.

A node's site, and with SuperNode authentication its slot, come from the name its key was
registered under (``grid.get_nodes()``; ``registrar.site_of_node`` / ``slot_of_node``): a node
cannot claim them. Without a key binding, a node's slot is the one its accepted replies
answered for. Failures (an error reply, no reply by the deadline) are counted here, by slot
and site; Prometheus labels name only the run's slots, anything else is ``unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from fedcifar.deploy.registrar import site_of_node, slot_of_node
from fedcifar.metrics import FAILURE_REASONS, REJECT_REASONS, UNKNOWN_SITE, ServerMetrics

log = logging.getLogger("flwr.fedcifar")
UNKNOWN_SLOT = "unknown"


@dataclass
class NodeLedger:
    num_partitions: int
    metrics: ServerMetrics
    site_of: dict[int, str] = field(default_factory=dict)  # node id -> the site its key was registered under
    bound_slot: dict[int, int] = field(
        default_factory=dict
    )  # node id -> the slot its key holds (maybe none of the run's)
    slot_of: dict[int, int] = field(default_factory=dict)  # node id -> the slot it last answered for
    failed: set[int] = field(default_factory=set)  # nodes whose latest message went unanswered or failed
    _answered_at: dict[int, int] = field(default_factory=dict)  # node id -> the exchange it last answered in
    _exchanges: int = 0
    _skipped: set[int] = field(default_factory=set)  # superseded nodes, once logged

    def learn_nodes(self, nodes: Iterable) -> None:
        """Sites and key-bound slots from Flower's node list (``grid.get_nodes()``)."""
        for node in nodes:
            self.site_of[node.node_id] = site_of_node(node.name)
            slot = slot_of_node(node.name)
            if slot is not None:  # a key bound beyond the run's slots can answer for none of them
                self.bound_slot[node.node_id] = slot

    def held_by_others(self, node_id: int) -> frozenset[int]:
        """The slots that keys other than ``node_id``'s hold."""
        return frozenset(slot for node, slot in self.bound_slot.items() if node != node_id)

    def site(self, node_id: int) -> str:
        return self.site_of.get(node_id, UNKNOWN_SITE)

    def label(self, node_id: int, claimed: object = None) -> str:
        """The slot label of a node's series: its key's slot, else the slot it answered for, else
        what it claims if that is one of the run's slots."""
        slot = self.bound_slot.get(node_id, self.slot_of.get(node_id, claimed))
        known = isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < self.num_partitions
        return str(slot) if known else UNKNOWN_SLOT

    def new_exchange(self) -> None:
        """One send-and-receive: orders answers, so a node's successor can be told apart."""
        self._exchanges += 1

    def answered(self, node_id: int, slot: int) -> None:
        """A reply from ``node_id`` for ``slot`` was accepted."""
        if self.slot_of.get(node_id) != slot:  # zero series, so dashboards show the slot before its first fault
            for reason in FAILURE_REASONS:
                self.metrics.failures.labels(str(slot), self.site(node_id), reason)
            for reason in REJECT_REASONS:
                self.metrics.rejected_updates.labels(str(slot), self.site(node_id), reason)
        self.slot_of[node_id] = slot
        self._answered_at[node_id] = self._exchanges
        self.failed.discard(node_id)

    def failure(self, node_id: int, reason: str, detail: str) -> None:
        label, site = self.label(node_id), self.site(node_id)
        self.failed.add(node_id)
        self.metrics.failures.labels(label, site, reason).inc()
        log.warning("client failure (%s): node %d, slot %s, site %s: %s", reason, node_id, label, site, brief(detail))

    def refusal(self, node_id: int, claimed: object, reason: str, detail: str) -> dict[str, str]:
        label, site = self.label(node_id, claimed), self.site(node_id)
        self.metrics.rejected_updates.labels(label, site, reason).inc()
        log.warning("reply refused (%s): node %d, slot %s, site %s: %s", reason, node_id, label, site, brief(detail))
        return {"slot": label, "site": site, "reason": reason}

    def skip_superseded(self, messages: Iterable[Message]) -> list[Message]:
        kept = []
        for m in messages:
            node_id = m.metadata.dst_node_id
            if not self.superseded(node_id):
                kept.append(m)
            elif node_id not in self._skipped:
                self._skipped.add(node_id)
                log.info(
                    "node %d no longer gets messages: slot %s (site %s) answers from a newer node",
                    node_id,
                    self.label(node_id),
                    self.site(node_id),
                )
        return kept

    def superseded(self, node_id: int) -> bool:
        """A node that failed, whose slot another node has answered for since (a restarted pod or
        process registers anew): Flower lists the dead id until its heartbeats are missed (a minute
        or more), and every message to it would be one more counted failure."""
        slot = self.slot_of.get(node_id)
        if node_id not in self.failed or slot is None:
            return False
        since = self._answered_at.get(node_id, -1)
        return any(
            s == slot and self._answered_at.get(other, -1) > since
            for other, s in self.slot_of.items()
            if other != node_id
        )


def brief(text: str, limit: int = 300) -> str:
    """A node-supplied text fit for one log line: newlines escaped, cut at ``limit`` characters."""
    text = repr(str(text))[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."
