"""Flower's waits, cut: the SuperNode's idle poll (fast while a run keeps it busy, backing off to
Flower's 3 s when idle) and local reply check, the first retry of an object pull, and reply pulls
bounded by the round's deadline (``tuning.py``, items 1, 3 and 4)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from fedcifar.flower.patch import module_view, replace, replace_defaults

POLL_ENV = "FEDCIFAR_POLL_INTERVAL"
IDLE_POLL_ENV = "FEDCIFAR_IDLE_POLL_INTERVAL"
POLL_HOLD_ENV = "FEDCIFAR_POLL_HOLD"
DEFAULT_POLL_SECONDS = 0.25
DEFAULT_IDLE_POLL_SECONDS = 3.0  # Flower's own idle poll
DEFAULT_POLL_HOLD_SECONDS = 10.0  # longer than the wait between rounds of a small federation
LOCAL_CHECK_SECONDS = 0.02
PULL_RETRY_SECONDS = 0.02  # Flower's default: 1 s (flwr.supercore.constant.PULL_INITIAL_BACKOFF)
BOUNDED_PULL_RETRY_CAP = 0.5  # Flower's default: 10 s (PULL_BACKOFF_CAP)


@dataclass
class PollSchedule:
    """When a SuperNode asks the SuperLink for its next message: every ``fast`` s while a run keeps it
    busy (for ``hold`` s after it last pulled a message or pushed a reply), then backing off, doubling,
    to ``idle`` s. A round keeps its latency (a node sampled in a round is asked again within seconds), while an idle
    federation costs its SuperLink what stock Flower's 3 s polling does: the first message after an
    idle spell waits at most ``idle`` s more. A node starts busy (a run usually follows its start: the
    chart's run Job, ``fedcifar run``). ``fast == idle``: a fixed interval."""

    fast: float = DEFAULT_POLL_SECONDS
    idle: float = DEFAULT_IDLE_POLL_SECONDS
    hold: float = DEFAULT_POLL_HOLD_SECONDS
    clock: Callable[[], float] = time.monotonic
    last_active: float = field(init=False)
    interval: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.fast <= self.idle or self.hold < 0:
            raise ValueError(
                f"polling needs 0 < {POLL_ENV} ({self.fast}) <= {IDLE_POLL_ENV} ({self.idle}) and "
                f"{POLL_HOLD_ENV} >= 0 ({self.hold}): set them so"
            )
        self.active()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> PollSchedule:
        fast = float(env.get(POLL_ENV) or DEFAULT_POLL_SECONDS)
        return cls(
            fast,
            max(fast, float(env.get(IDLE_POLL_ENV) or DEFAULT_IDLE_POLL_SECONDS)),
            float(env.get(POLL_HOLD_ENV) or DEFAULT_POLL_HOLD_SECONDS),
        )

    def active(self) -> None:
        """A message came, or a reply went: poll fast again, for ``hold`` s."""
        self.last_active, self.interval = self.clock(), self.fast

    def next_wait(self) -> float:
        """Seconds to wait after a poll that found no message."""
        if self.clock() - self.last_active > self.hold:
            self.interval = min(self.idle, self.interval * 2)
        return self.interval


def paced_time(schedule: PollSchedule, local: float = LOCAL_CHECK_SECONDS):
    """The ``time`` module, but a sleep of 1 s or more (Flower's idle poll of the SuperLink) waits
    ``schedule.next_wait()``, and shorter ones (checks of local state) at most ``local`` s."""
    return module_view(
        time, sleep=lambda seconds: time.sleep(schedule.next_wait() if seconds >= 1 else min(seconds, local))
    )


def pace_supernode_polling(schedule: PollSchedule) -> None:
    """Flower's SuperNode loop polls on ``schedule``: each message it pulls, and each reply it pushes (a
    training may outlast the hold), starts a fast spell."""
    import flwr.supernode.start_client_internal as supernode_loop

    pull_and_store, push = supernode_loop._pull_and_store_message, supernode_loop._push_messages

    def pulled(*args, **kwargs):
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            schedule.active()
        return run_id

    def pushed(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            schedule.active()

    replace(supernode_loop, "_pull_and_store_message", pulled)
    replace(supernode_loop, "_push_messages", pushed)
    replace(supernode_loop, "time", paced_time(schedule))


def shorten_object_pull_backoff(seconds: float = PULL_RETRY_SECONDS) -> None:
    """The first retry of a missing object after ``seconds`` instead of 1 s, in this process."""
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        replace_defaults(pull, initial_backoff=seconds)


@contextlib.contextmanager
def pulls_bounded_by(seconds: float, retry_cap: float = BOUNDED_PULL_RETRY_CAP) -> Iterator[None]:
    """Within the block, Flower's ``pull_objects`` gives up after ``seconds`` at most (retrying at least
    every ``retry_cap`` s, so it does not sleep far past them); defaults restored after it."""
    from flwr.supercore.inflatable import inflatable_utils

    pull = inflatable_utils.pull_objects
    limits = pull.__kwdefaults__ or {}
    saved = replace_defaults(
        pull,
        max_time=min(max(seconds, 0.0), limits.get("max_time", math.inf)),
        backoff_cap=min(retry_cap, limits.get("backoff_cap", math.inf)),
    )
    try:
        yield
    finally:
        replace_defaults(pull, **saved)
