"""The run's Grid, with replies looked for every fraction of a second and a round that can end early."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedcifar.flower_tuning import pulls_bounded_by


class PollingGrid:
    """The run's Grid, but ``send_and_receive`` looks for replies every ``interval`` seconds.

    Flower 1.42's ``send_and_receive`` sleeps 3 s between pulls, so a round waits up to 3 s
    after its last reply; this is the same push-then-pull loop at a shorter interval, which
    also stops early once ``done(replies)`` holds (e.g. every slot has answered), and
    whose pulls end by the deadline too (``flower_tuning.pulls_bounded_by``).
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid, self.interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        done: Callable[[list[Message]], bool] | None = None,
    ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            left = float("inf") if deadline is None else deadline - time.monotonic()
            with pulls_bounded_by(left):  # a reply whose sender died mid-upload must not hold the round
                pulled = list(self._grid.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending and done is not None and done(replies):
                break
            if pending:
                time.sleep(self.interval)
        return replies
