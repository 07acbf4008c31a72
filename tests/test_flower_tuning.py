"""The changes to Flower's behaviour: shorter SuperNode sleeps, warm-forked ClientApps. Guarded against upgrades."""

from __future__ import annotations

import inspect
import multiprocessing
import subprocess
import sys
import time
import types
from pathlib import Path

import flwr.supernode.start_client_internal as supernode_loop
import pytest

from fedcifar.flower_tuning import (
    ALLOW_UNVERIFIED_ENV,
    CLIENTAPP,
    CLIENTAPP_MAIN,
    PULL_RETRY_SECONDS,
    VERIFIED_FLWR,
    ClientAppForkServer,
    UnverifiedFlower,
    capped_time,
    check_flower_version,
    pulls_bounded_by,
    shorten_object_pull_backoff,
    shorten_supernode_polling,
    start_warm_superexec,
    tune,
)
from fedcifar.procfs import process_memory, tree_rss
from fedcifar.server.polling import PollingGrid


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


def test_the_rerouted_launches_are_still_in_the_pinned_flower():
    """The SuperNode starts `flower-superexec` and SuperExec starts `flwr-clientapp` with subprocess.Popen."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor import subprocess_executor

    source = inspect.getsource(supernode_loop.start_client_internal)
    assert 'command = ["flower-superexec"]' in source and "subprocess.Popen(command)" in source
    assert "subprocess.Popen(" in inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert CLIENTAPP in TASK_TYPE_TO_COMMAND.values()


def test_clientapps_are_forked_from_the_warm_server_and_named_like_flowers():
    server = ClientAppForkServer(preload=["flwr.supernode.cli"])
    started = time.perf_counter()
    process = server.popen([CLIENTAPP, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.join(60)
    assert process.exitcode == 0  # Flower's own entry point ran (and printed its help, silenced)
    first = time.perf_counter() - started
    started = time.perf_counter()
    again = server.popen([CLIENTAPP, "--help"], stdout=subprocess.DEVNULL)
    again.join(60)
    assert again.exitcode == 0 and time.perf_counter() - started < first  # warm: the server exists now
    other = server.popen([sys.executable, "-c", "pass"])  # anything else: a plain subprocess
    assert isinstance(other, subprocess.Popen) and other.wait(30) == 0


def test_node_memory_leaves_out_the_fork_servers_children():
    """A child of the fork server is a ClientApp even before it renames itself (soak: a +89 MiB spike)."""
    child = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        server = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert "multiprocessing.forkserver" in Path(f"/proc/{server}/cmdline").read_text()
        assert process_memory(child.pid) > 2**20  # what counting the child would add
        assert tree_rss(server) == pytest.approx(process_memory(server), abs=2**20)
    finally:
        child.kill()
        child.join()


def test_the_supernode_starts_the_warm_superexec(monkeypatch):
    seen = []
    monkeypatch.setattr(supernode_loop, "subprocess", supernode_loop.subprocess)  # restored after the test
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: seen.append(args))
    start_warm_superexec()
    supernode_loop.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "x:1"])
    supernode_loop.subprocess.Popen(["something-else"])
    assert seen[0][:2] == [sys.executable, "-c"] and seen[0][3:] == [
        "superexec",
        "--insecure",
        "--runtime-api-address",
        "x:1",
    ]
    assert seen[1] == ["something-else"]


def test_object_pulls_retry_soon(monkeypatch):
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF
    from flwr.supercore.inflatable import inflatable_utils

    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    assert PULL_INITIAL_BACKOFF == 1  # the pinned Flower's default
    for pull in pulls:  # ... a keyword default where this patch expects it
        assert "initial_backoff" in pull.__kwdefaults__
        monkeypatch.setitem(pull.__kwdefaults__, "initial_backoff", 1)  # restored after the test
    shorten_object_pull_backoff()
    assert all(pull.__kwdefaults__["initial_backoff"] == PULL_RETRY_SECONDS for pull in pulls)
    assert "inflatable_utils.pull_objects" in CLIENTAPP_MAIN  # the forked ClientApps get it too


UNAVAILABLE = types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id="m1"))  # as Flower makes it


class ObjectsNeverArrive:
    """A Grid whose one reply is listed but whose content never arrives (its sender died mid-upload),
    pulled with Flower's own ``pull_objects``, as ``HttpGrid.pull_messages`` does."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages):
        return ["m1"]

    def pull_messages(self, message_ids):
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError, pull_objects

        def never(object_id):
            self.pulls += 1
            raise ObjectUnavailableError(object_id)

        try:
            pull_objects(object_ids=["content"], pull_object_fn=never)
        except ObjectPullError:
            return [UNAVAILABLE]
        return []


def test_a_reply_whose_content_never_arrives_ends_at_the_rounds_deadline():
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils

    source = inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert "pull_objects(" in source and "max_time" not in source  # it pulls with the defaults we bound
    before = dict(inflatable_utils.pull_objects.__kwdefaults__)
    grid = ObjectsNeverArrive()
    started = time.monotonic()
    replies = PollingGrid(grid, 0.05).send_and_receive(["a message"], timeout=1.5)
    took = time.monotonic() - started
    assert replies == [UNAVAILABLE]
    # Flower alone would retry for 2 hours; how many retries fit in 1.5 s depends on its ±20% jitter
    assert 1.4 < took < 5 and grid.pulls >= 2
    assert inflatable_utils.pull_objects.__kwdefaults__ == before  # restored


def test_pulls_bounded_by_only_shortens():
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_objects.__kwdefaults__
    with pulls_bounded_by(float("inf")):
        assert defaults["max_time"] == 7200 and defaults["backoff_cap"] == 0.5
    with pulls_bounded_by(-1):
        assert defaults["max_time"] == 0


def test_local_supernodes_poll_less_once_they_outnumber_the_cores():
    from fedcifar.flower_tuning import POLL_ENV
    from fedcifar.local import idle_polling
    from fedcifar.node import SUPEREXEC_POLL_ENV

    defaults = {POLL_ENV: "0.25", SUPEREXEC_POLL_ENV: "0.1"}
    assert idle_polling(2, 2) == idle_polling(4, 2) == idle_polling(16, 16) == defaults
    assert idle_polling(16, 2) == {POLL_ENV: "1", SUPEREXEC_POLL_ENV: "0.4"}  # the same idle requests per core as 4


def test_the_changes_run_only_on_the_flower_release_they_were_verified_on(monkeypatch, capsys):
    check_flower_version()  # the installed one
    check_flower_version(f"{VERIFIED_FLWR}.9")
    with pytest.raises(
        UnverifiedFlower, match=rf"verified on flwr {VERIFIED_FLWR}\.\*, but flwr 1\.43\.0 is installed"
    ):
        check_flower_version("1.43.0")
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    check_flower_version("1.43.0")  # the user's explicit override
    assert "going on as FEDCIFAR_ALLOW_UNVERIFIED_FLWR=1 says" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no Flower tuning for 'clientapp'"):
        tune("clientapp")
