"""The one change to Flower's behaviour: the SuperNode loop's sleeps, capped. Guarded against upgrades."""

from __future__ import annotations

import inspect
import time

import flwr.supernode.start_client_internal as supernode_loop

from fedcifar.flower_tuning import capped_time, shorten_supernode_polling
from fedcifar.server_app import PollingGrid


def test_the_patched_sleeps_are_still_in_the_pinned_flower():
    """If flwr changes these loops, the patch would silently stop mattering: fail loudly instead."""
    assert "time.sleep(3)" in inspect.getsource(supernode_loop.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(supernode_loop._push_messages)
    import flwr.superlink.grid.http_grid as http_grid

    assert "time.sleep(3)" in inspect.getsource(http_grid.HttpGrid.send_and_receive)  # why PollingGrid exists
    assert {"push_messages", "pull_messages"} <= set(dir(http_grid.HttpGrid))


def test_capped_time_caps_only_sleep():
    fake = capped_time(idle=0.05, local=0.01)
    started = time.perf_counter()
    fake.sleep(3)  # the idle poll
    fake.sleep(0.5)  # a local check
    assert time.perf_counter() - started < 0.5
    assert fake.time is time.time and fake.monotonic is time.monotonic


def test_shorten_supernode_polling_replaces_only_that_modules_time(monkeypatch):
    monkeypatch.setattr(supernode_loop, "time", supernode_loop.time)  # restored after the test
    shorten_supernode_polling(0.1)
    assert supernode_loop.time is not time
    assert time.sleep is not supernode_loop.time.sleep  # the real module is untouched


def test_polling_grid_delegates_everything_else():
    class Recorder:
        def get_node_ids(self):
            return [1, 2]

    grid = PollingGrid(Recorder(), 0.05)
    assert grid.get_node_ids() == [1, 2] and grid.interval == 0.05
