"""The Fleet guard's budgets and the reply layouts it holds runs to (``fleet_guard.py``).

``GuardSettings``: what ``fedcifar superlink`` passes the SuperLink's process as JSON. ``ReplyLayout``:
the most a reply of a run may hold; fedcifar's ServerApp publishes its own (``publish_reply_layout``)
to ``$FEDCIFAR_FLEET_LAYOUTS/<run id>.json``; runs of other apps get the settings' ceiling.
``TokenBucket``: a node's request budget.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedcifar.common.atomic import write_bytes
from fedcifar.flower.polling import DEFAULT_POLL_SECONDS

SETTINGS_ENV = "FEDCIFAR_FLEET_GUARD"  # GuardSettings as JSON, set by `fedcifar superlink`
LAYOUTS_ENV = "FEDCIFAR_FLEET_LAYOUTS"  # where ServerApps publish their runs' reply layouts
CHUNK_SLACK = 1024  # an array chunk's object header and a little more
RECORD_BYTES = 64 * 2**10  # any object that is no array chunk: a message with its error text, a metrics record
EXTRA_OBJECTS = 4  # beyond the honest reply's (an extra array and its chunk, ...), within RECORD_BYTES each


@dataclass(frozen=True)
class GuardSettings:
    """The guard's budgets; ``fedcifar superlink`` passes them to the SuperLink's process as JSON."""

    poll_interval: float = DEFAULT_POLL_SECONDS  # the SuperNodes' idle poll (their shortest, where they differ)
    requests_per_poll: float = 8.0  # a node's sustained request rate, per poll interval
    burst: int = 256  # a node's burst (a round's object pulls and pushes come at once)
    held_replies: int = 8  # replies of one node stored and not yet taken by the ServerApp
    max_reply_bytes: int = 16 * 2**20  # the ceiling of a run that published no layout
    max_reply_objects: int = 1024
    site_held_bytes: int = 256 * 2**20  # bytes of one site's replies stored at a time
    layouts: str | None = None  # the folder of published layouts ($FEDCIFAR_FLEET_LAYOUTS)

    def __post_init__(self) -> None:
        positive = {k: v for k, v in asdict(self).items() if k != "layouts"}
        number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
        bad = [f"{k}={v}" for k, v in positive.items() if not (number(v) and v > 0)]
        if bad:
            raise ValueError(f"the Fleet guard's budgets must be positive numbers, got {', '.join(bad)}")

    @property
    def requests_per_second(self) -> float:
        return self.requests_per_poll / self.poll_interval

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> GuardSettings:
        """What ``fedcifar superlink`` set, else the defaults."""
        raw = os.environ.get(SETTINGS_ENV)
        return cls(**json.loads(raw)) if raw else cls()


@dataclass(frozen=True)
class ReplyLayout:
    """The most a reply of a run may hold: objects in its tree, bytes per object, bytes in all."""

    max_objects: int
    max_object_bytes: int
    max_reply_bytes: int

    @classmethod
    def of(cls, content) -> ReplyLayout:
        """The layout of replies shaped like ``content`` (a ``RecordDict`` holding the largest reply an
        honest node sends): its array chunks exactly (plus their header), every other object, the
        message itself and ``EXTRA_OBJECTS`` more, up to ``RECORD_BYTES`` each. Bounds on what a reply
        costs the SuperLink, not on its shape: a reply with a stray array still reaches the ServerApp,
        whose checks (``server/replies.py``) refuse it with a reason of their own."""
        from flwr.app.message.arraychunk import ArrayChunk
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        objects = get_all_nested_objects(content).values()
        chunks = [len(o.deflate()) + CHUNK_SLACK for o in objects if isinstance(o, ArrayChunk)]
        # + the Message, and a few more: the ServerApp's checks say what is wrong with a reply's shape
        records = len(objects) - len(chunks) + 1 + EXTRA_OBJECTS
        return cls(
            max_objects=len(chunks) + records,
            max_object_bytes=max([RECORD_BYTES, *chunks]),
            max_reply_bytes=sum(chunks) + records * RECORD_BYTES,
        )

    @classmethod
    def ceiling(cls, settings: GuardSettings) -> ReplyLayout:
        # any object up to the reply's bound: other apps may send records larger than Flower's chunks
        return cls(settings.max_reply_objects, settings.max_reply_bytes, settings.max_reply_bytes)


def publish_reply_layout(run_id: int, layout: ReplyLayout) -> Path | None:
    """Tell the SuperLink's guard the layout of this run's replies (a ServerApp beside a ``fedcifar
    superlink``; elsewhere nothing listens and nothing is written)."""
    folder = os.environ.get(LAYOUTS_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{int(run_id)}.json"
    return write_bytes(path, json.dumps(asdict(layout)).encode())


class TokenBucket:
    """``rate`` requests a second on average, ``capacity`` at once."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.tokens, self.at = capacity, clock()

    def next_token(self) -> float:
        """When (``clock``) the next request will be allowed."""
        return self.at + max(0.0, 1 - self.tokens) / self.rate

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
