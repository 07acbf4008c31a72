"""The run's Grid, with replies looked for every fraction of a second and a round that can end early."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedcifar.flower.polling import pulls_bounded_by
from fedcifar.server.ledger import brief

log = logging.getLogger("flwr.fedcifar")


class PollingGrid:
    """The run's Grid, but ``send_and_receive`` looks for replies every ``interval`` seconds.

    Flower 1.42's ``send_and_receive`` sleeps 3 s between pulls, so a round waits up to 3 s
    after its last reply; this is the same push-then-pull loop at a shorter interval, which
    also stops early once ``done(replies)`` holds (e.g. every slot has answered), and
    whose pulls end by the deadline too (``flower.polling.pulls_bounded_by``). A pull names
    every reply still awaited, and the SuperLink looks each up among all the messages it
    holds: above ``IDS_PER_PULL`` awaited, the interval grows with them (to ``MAX_INTERVAL``),
    so that pulls cost the SuperLink no more each second at 1,000 nodes than at 50, and the
    last replies of a round (few awaited) are still looked for every ``interval``.
    """

    IDS_PER_PULL = 50
    MAX_INTERVAL = 1.0

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid, self.interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float, done: Callable[[list[Message]], bool] | None = None
    ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        # an empty id: the SuperLink did not store that message (its node left); its node counts as missing
        pending = {message_id for message_id in self._grid.push_messages(messages) if message_id}
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            with pulls_bounded_by(deadline - time.monotonic()):  # a sender dead mid-upload must not hold the round
                pulled = self._pull(pending)
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if pending and done is not None and done(replies):
                break
            if pending:
                time.sleep(self.wait(len(pending)))
        return replies

    def wait(self, awaited: int) -> float:
        """Seconds to the next pull while ``awaited`` replies are still to come."""
        return min(self.MAX_INTERVAL, self.interval * max(1.0, awaited / self.IDS_PER_PULL))

    def _pull(self, pending: set[str]) -> list[Message]:
        """The replies in; one that Flower cannot even decode (a node's malformed objects) is dropped
        from ``pending`` and logged, its node then counted as missing, never the end of the run."""
        try:
            return list(self._grid.pull_messages(pending))
        except Exception:
            pulled = []
            for message_id in list(pending):
                try:
                    pulled.extend(self._grid.pull_messages([message_id]))
                except Exception as err:
                    log.warning(
                        "dropped the reply to message %s: Flower could not read it (%s)",
                        message_id,
                        brief(f"{type(err).__name__}: {err}"),
                    )
                    pending.discard(message_id)
            return pulled
