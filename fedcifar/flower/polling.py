"""Flower's waits, cut: the SuperNode's idle poll and local reply check, the first retry of an object
pull, and reply pulls bounded by the round's deadline (``tuning.py``, items 1, 3 and 4)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

from fedcifar.flower.patch import module_view, replace, replace_defaults

POLL_ENV = "FEDCIFAR_POLL_INTERVAL"
DEFAULT_POLL_SECONDS = 0.25
LOCAL_CHECK_SECONDS = 0.02
PULL_RETRY_SECONDS = 0.02  # Flower's default: 1 s (flwr.supercore.constant.PULL_INITIAL_BACKOFF)
BOUNDED_PULL_RETRY_CAP = 0.5  # Flower's default: 10 s (PULL_BACKOFF_CAP)


def capped_time(idle: float, local: float = LOCAL_CHECK_SECONDS):
    """The ``time`` module, but ``sleep`` waits at most ``idle`` s (sleeps of 1 s or more: the
    idle poll of the SuperLink) or ``local`` s (shorter ones: checks of local state)."""
    return module_view(time, sleep=lambda seconds: time.sleep(min(seconds, idle if seconds >= 1 else local)))


def shorten_supernode_polling(idle: float) -> None:
    import flwr.supernode.start_client_internal as supernode_loop

    replace(supernode_loop, "time", capped_time(idle))


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
