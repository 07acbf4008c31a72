"""The SuperNode's activation, reported (``tuning.py``): not a change in behaviour."""

from __future__ import annotations

import os
from pathlib import Path

from fedcifar.flower.patch import replace


def report_activation() -> None:
    """Publish ``fedcifar_client_node{site} 1`` once the SuperLink has activated this node.

    Not a change in behaviour: the SuperNode sets its node id when activation succeeded, and
    this also marks the node's metrics (the id itself stays off them) and notes the id in
    ``$FEDCIFAR_NODE_ID_FILE``, so that a restart after a kill can end this activation
    (``control.retire_previous_activation``). ``fedcifar submit`` waits for it, because a node
    that only runs is not yet sampled: after a restart with the same key, activation waits
    until the SuperLink has given up on the previous activation.
    """
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedcifar.deploy.control import NODE_ID_FILE_ENV
    from fedcifar.metrics import client_metrics

    def set_and_report(self, node_id):
        set_node_id(self, node_id)
        if node_id is not None:
            metrics = client_metrics()
            metrics.node.labels(metrics.site).set(1)
            if noted := os.environ.get(NODE_ID_FILE_ENV):  # for the restart of a killed node
                Path(noted).write_text(str(node_id))

    set_node_id = replace(InMemoryNodeState, "set_node_id", set_and_report)
