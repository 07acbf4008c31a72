"""A registered node that floods the SuperLink with signed ``pull-messages`` requests, as fast as one
process on one core sends them (``python -m tests.fleet_flood ADDRESS CA KEY NODE_ID SECONDS CPU``),
until SECONDS pass or SIGINT: prints, as JSON, how many it sent, in how long, and the HTTP status
of the answers. Test helper."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from tests.fleet_node import FleetNode, Refused


def flood(address: str, ca: Path, key: Path, node_id: int, seconds: float) -> dict:
    node = FleetNode(address, ca, key)
    node.node_id = node_id  # activated (and deactivated) by the test: a registered node, never sampled
    answers: Counter[int] = Counter()
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            try:
                node.pull()
                answers[200] += 1
            except Refused as refused:
                answers[refused.status] += 1
    except KeyboardInterrupt:  # the test says stop
        pass
    elapsed = time.monotonic() - started
    total = sum(answers.values())
    return {"requests": total, "seconds": elapsed, "per_second": total / elapsed, "status": dict(answers)}


if __name__ == "__main__":
    address, ca, key, node_id, seconds, cpu = sys.argv[1:7]
    os.sched_setaffinity(0, {int(cpu)})  # the attacker on one core
    print(json.dumps(flood(address, Path(ca), Path(key), int(node_id), float(seconds))))
