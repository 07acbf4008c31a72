"""The changes to Flower's behaviour (flower_tuning.py), each checked by running the Flower code it changes.

Flower's own functions run here after ``tune(role)``, with what they talk to (the SuperLink connection, the node
state, the Runtime API, the process launcher) replaced by small fakes, so that each test fails both without the
change and if the pinned Flower stops doing what the change relies on. Guarded against upgrades by the version check.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import flwr.supernode.start_client_internal as supernode_loop
import pytest
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.proto.message_pb2 import Metadata as MetadataProto
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.constant import PULL_INITIAL_BACKOFF, ExecutorType, TaskType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, get_executor, subprocess_executor
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from fedcifar.common.procfs import process_memory, tree_rss
from fedcifar.flower import processes
from fedcifar.flower.patch import VERIFIED_FLWR
from fedcifar.flower.polling import (
    IDLE_POLL_ENV,
    LOCAL_CHECK_SECONDS,
    POLL_ENV,
    POLL_HOLD_ENV,
    PollSchedule,
    pace_supernode_polling,
    paced_time,
    pulls_bounded_by,
)
from fedcifar.flower.processes import CLIENTAPP, SUPEREXEC_MAIN, ClientAppForkServer
from fedcifar.flower.tuning import ALLOW_UNVERIFIED_ENV, UnverifiedFlower, check_flower_version, tune
from fedcifar.server.polling import PollingGrid

PULLS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
# A first retry of a missing object "soon": tuned, after 0.02 s; Flower's default, after 1 s ± 20% (never below 0.8)
SOON = 0.5


@pytest.fixture
def tuned(monkeypatch):
    """``tune(role)`` for one test: whatever it changes in Flower is put back afterwards."""
    for name in ("time", "subprocess", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(supernode_loop, name, getattr(supernode_loop, name))
    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    monkeypatch.setattr(InMemoryNodeState, "set_node_id", InMemoryNodeState.set_node_id)
    for pull in PULLS:
        monkeypatch.setattr(pull, "__kwdefaults__", dict(pull.__kwdefaults__))
    return tune


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The seconds each ``time.sleep`` of this test's thread asked for; it returns at once instead of sleeping."""
    asked: list[float] = []
    real_sleep, this_thread = time.sleep, threading.get_ident()

    def sleep(seconds):
        if threading.get_ident() != this_thread:  # another thread's sleep is none of this test's business
            return real_sleep(seconds)
        asked.append(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return asked


@pytest.fixture
def launched(monkeypatch) -> list[list[str]]:
    """The commands ``subprocess.Popen`` was asked to start; none is started."""
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kwargs: commands.append(list(args)))
    return commands


class Enough(Exception):
    """Ends one of Flower's endless loops once the test has seen what it needs."""


def run_supernode(monkeypatch) -> list[float]:
    """Run Flower's SuperNode loop (``start_client_internal``) against a SuperLink that has no message for it at
    first, then one whose content is still missing when first asked for, and a ClientApp that has not replied yet.
    Returns the times (``time.monotonic``) at which the SuperNode asked for that content."""
    message = SimpleNamespace(metadata=SimpleNamespace(run_id=1, group_id="", message_type="train", message_id="m1"))
    inbox = iter([None, (message, ObjectTree(object_id="m1"))])
    asked: list[float] = []
    reply_checks = iter([[]])  # no reply yet, then the test has seen enough

    def pull_object(run_id, object_id):
        asked.append(time.monotonic())
        if len(asked) == 1:  # the SuperLink listed the message before its content arrived
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    def get_messages_legacy(is_reply):
        with contextlib.suppress(StopIteration):
            return next(reply_checks)
        raise Enough

    state = SimpleNamespace(
        set_node_id=lambda node_id: None,
        get_run=lambda run_id: SimpleNamespace(primary_task_type="", fab_hash="fab"),  # a run it knows: no FAB pull
        create_task=lambda **kwargs: 1,
        store_message=lambda message: None,
        get_messages_legacy=get_messages_legacy,
    )
    store = SimpleNamespace(preregister=lambda run_id, tree: ["m1"], put=lambda object_id, content: None)
    factory = SimpleNamespace(state=lambda: state, objectstore_factory=SimpleNamespace(store=lambda: store))

    @contextlib.contextmanager
    def connection(**kwargs):  # node id, receive, send, get_run, get_fab, pull_object, push_object, confirm
        yield 7, lambda: next(inbox), None, None, None, pull_object, None, lambda run_id, message_id: None

    monkeypatch.setattr(supernode_loop, "_init_connection", connection)
    monkeypatch.setattr(supernode_loop, "register_signal_handlers", lambda **kwargs: None)  # pytest keeps its own
    with pytest.raises(Enough):
        supernode_loop.start_client_internal(
            state_factory=factory, server_address="127.0.0.1:9092", node_config={}, insecure=True
        )
    return asked


def test_the_supernode_looks_for_messages_and_replies_at_the_shortened_intervals(tuned, monkeypatch, sleeps, launched):
    monkeypatch.setenv(POLL_ENV, "0.4")
    monkeypatch.setenv(IDLE_POLL_ENV, "1.5")
    tuned("supernode")
    run_supernode(monkeypatch)
    # Flower: 3 s after a pull that found no message (here: the busy interval, the node has just started),
    # then 0.5 s between looks for the ClientApp's reply
    assert sleeps == [0.4, LOCAL_CHECK_SECONDS]


def test_the_supernode_starts_the_warm_superexec_with_flowers_arguments(tuned, monkeypatch, sleeps, launched):
    tuned("supernode")
    run_supernode(monkeypatch)
    [command] = launched  # Flower's own command would be ["flower-superexec", ...]
    assert command[:4] == [sys.executable, "-c", SUPEREXEC_MAIN, "superexec"]
    flowers_arguments = command[4:]
    assert flowers_arguments[flowers_arguments.index("--parent-pid") + 1] == str(os.getpid())
    assert "--runtime-api-address" in flowers_arguments and "--insecure" in flowers_arguments


def test_the_supernode_asks_again_soon_for_message_content_that_was_missing(tuned, monkeypatch, sleeps, launched):
    tuned("supernode")
    asked = run_supernode(monkeypatch)
    assert len(asked) == 2 and asked[1] - asked[0] < SOON


def test_the_superexec_starts_each_clientapp_from_the_fork_server(tuned, monkeypatch, launched):
    forked = []

    class ForkServer:  # records what the warm server would fork (tested below with a real one)
        def popen(self, args, **kwargs):
            forked.append((list(args), kwargs))

    monkeypatch.setattr(processes, "ClientAppForkServer", ForkServer)
    tuned("superexec")
    spec = ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:9094",
        token="task-token",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4242,
        suppress_output=True,
        task_id=1,
    )
    get_executor(ExecutorType.SUBPROCESS).launch(spec)  # the executor flower-superexec runs by default
    assert launched == []  # no cold `flwr-clientapp` process
    [(args, kwargs)] = forked
    assert args[0] == CLIENTAPP and args[args.index("--token") + 1] == "task-token"
    assert kwargs["stdout"] is subprocess.DEVNULL  # Flower's suppress_output, which the fork server keeps


def fork_servers() -> set[int]:
    """This process's multiprocessing fork servers (it starts one, and keeps it for every later child)."""
    servers = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid() and b"multiprocessing.forkserver" in (stat.parent / "cmdline").read_bytes():
                servers.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    return servers


def test_clientapps_are_forked_from_the_warm_server_and_named_like_flowers():
    server = ClientAppForkServer(preload=["flwr.supernode.cli"])
    process = server.popen([CLIENTAPP, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.join(60)
    assert process.exitcode == 0  # Flower's own entry point ran (and printed its help, silenced)
    (warm,) = fork_servers()  # the server the first one started, still there
    again = server.popen([CLIENTAPP, "--help"], stdout=subprocess.DEVNULL)
    again.join(60)
    assert again.exitcode == 0 and fork_servers() == {warm}  # warm: forked from that server, none started anew
    other = server.popen([sys.executable, "-c", "pass"])  # anything else: a plain subprocess
    assert isinstance(other, subprocess.Popen) and other.wait(30) == 0


class RuntimeApi:
    """Flower's Runtime API as an app process sees it: one message listed ("r1", the reply to "m1") whose content
    never becomes available (its sender died mid-upload). Records when that content was asked for, and after
    ``give_up`` s answers that it does not exist, so that a pull without a bound fails a test instead of hanging it."""

    def __init__(self, give_up: float = 5.0) -> None:
        self.give_up, self.asked = give_up, []

    def PullTaskInput(self, request):
        return PullTaskInputResponse()

    def PullMessages(self, request):
        metadata = MetadataProto(message_id="r1", reply_to_message_id="m1")
        return PullAppMessagesResponse(
            messages_list=[MessageProto(metadata=metadata)], message_object_trees=[ObjectTree(object_id="r1")]
        )

    def PullObject(self, request):
        self.asked.append(time.monotonic())
        if self.asked[-1] - self.asked[0] > self.give_up:
            return PullObjectResponse(object_found=False)
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, request):
        raise AssertionError("confirmed a message whose content never arrived")


def test_forked_clientapps_ask_again_soon_for_message_content_that_was_missing(monkeypatch):
    """What each forked ClientApp runs shortens its own pulls. Run here in a child forked from this process rather
    than the warm server, so that Flower's entry point can be swapped for a probe that pulls its message as
    flwr-clientapp does (``pull_task_input``); the child starts from Flower's defaults."""
    import flwr.supernode.cli
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    for pull in PULLS:
        monkeypatch.setitem(pull.__kwdefaults__, "initial_backoff", PULL_INITIAL_BACKOFF)
    reader, writer = multiprocessing.Pipe(duplex=False)

    def probe():
        api = RuntimeApi(give_up=0.3)
        with contextlib.suppress(inflatable_utils.ObjectPullError):
            pull_task_input(api)
        writer.send(api.asked)

    monkeypatch.setattr(flwr.supernode.cli, "flwr_clientapp", probe)
    server = ClientAppForkServer(preload=["flwr.supernode.cli"])
    server.context = multiprocessing.get_context("fork")
    child = server.popen([CLIENTAPP, "--insecure"])
    child.join(30)
    assert child.exitcode == 0 and reader.poll(1)
    asked = reader.recv()
    assert asked[1] - asked[0] < SOON


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


def server_grid(monkeypatch, api: RuntimeApi | None = None) -> HttpGrid:
    """Flower's ServerApp Grid, talking to ``api`` instead of the SuperLink; a pushed message is listed as "m1"."""
    monkeypatch.setattr(RuntimeHttpClient, "from_server_address", lambda **kwargs: api)
    grid = HttpGrid(token="task-token")
    grid.set_run(Run.create_empty(7))
    grid.push_messages = lambda messages: ["m1"]  # pushing is not what these tests are about
    return grid


def test_a_reply_whose_content_never_arrives_ends_at_the_rounds_deadline(tuned, monkeypatch):
    tuned("serverapp")
    api = RuntimeApi(give_up=60.0)
    started = time.monotonic()
    [reply] = PollingGrid(server_grid(monkeypatch, api), 0.05).send_and_receive(["a message"], timeout=1.0)
    took = time.monotonic() - started
    # Flower's own "objects unavailable" reply, counted as that client's failure; Flower alone retries for 2 hours
    assert reply.metadata.reply_to_message_id == "m1" and reply.has_error()
    assert "Reply message objects are unavailable" in reply.error.reason
    assert 0.9 < took < 30  # the 1 s deadline ended it: not Flower's 2 hours, nor the API giving up after 60 s
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == 7200  # restored after the round


def test_the_serverapp_asks_again_soon_for_reply_content_that_was_missing(tuned, monkeypatch):
    tuned("serverapp")
    api = RuntimeApi()
    PollingGrid(server_grid(monkeypatch, api), 0.05).send_and_receive(["a message"], timeout=0.3)
    assert api.asked[1] - api.asked[0] < SOON


def test_polling_grid_looks_for_replies_every_interval_where_flowers_grid_waits_3s(monkeypatch, sleeps):
    """Why PollingGrid exists: Flower's own ``send_and_receive`` sleeps 3 s between looks for replies."""
    reply = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m1"))
    grid = server_grid(monkeypatch)
    for send_and_receive in (grid.send_and_receive, PollingGrid(grid, 0.05).send_and_receive):
        looks = iter([[], [reply]])  # the reply is there on the second look
        grid.pull_messages = lambda message_ids, looks=looks: next(looks)
        assert list(send_and_receive(["a message"], timeout=60)) == [reply]
    assert sleeps == [3, 0.05]


def test_polling_grid_looks_less_often_while_many_replies_are_awaited():
    """A pull names every awaited reply, and the SuperLink scans its messages for each: fewer pulls
    while many are awaited, every interval again for a round's last ones."""
    grid = PollingGrid(object(), 0.05)
    assert [grid.wait(n) for n in (1, 50, 100, 500, 1000, 5000)] == [0.05, 0.05, 0.1, 0.5, 1.0, 1.0]


def test_polling_grid_delegates_everything_else():
    class Recorder:
        def get_node_ids(self):
            return [1, 2]

    grid = PollingGrid(Recorder(), 0.05)
    assert grid.get_node_ids() == [1, 2] and grid.interval == 0.05


def test_paced_time_changes_only_sleep(sleeps):
    fake = paced_time(PollSchedule(fast=0.05, idle=0.05), local=0.01)
    fake.sleep(3)  # the idle poll
    fake.sleep(0.5)  # a local check
    assert sleeps == [0.05, 0.01]
    assert fake.time is time.time and fake.monotonic is time.monotonic


def test_a_node_polls_fast_while_busy_and_backs_off_to_the_idle_interval():
    now = [0.0]
    schedule = PollSchedule(fast=0.25, idle=3.0, hold=60, clock=lambda: now[0])
    assert schedule.next_wait() == 0.25  # just started: a run usually follows
    waits = []
    for _ in range(8):
        waits.append(schedule.next_wait())
        now[0] += 30
    # fast for the hold, then doubling to the idle interval
    assert waits == [0.25, 0.25, 0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    schedule.active()  # a message (or a reply pushed): fast again at once
    assert schedule.next_wait() == 0.25
    assert PollSchedule(fast=1.0, idle=1.0, hold=0).next_wait() == 1.0  # a fixed interval


def test_poll_settings_come_from_the_environment_and_bad_ones_are_refused():
    schedule = PollSchedule.from_env({POLL_ENV: "0.5", IDLE_POLL_ENV: "4", POLL_HOLD_ENV: "10"})
    assert (schedule.fast, schedule.idle, schedule.hold) == (0.5, 4.0, 10.0)
    assert PollSchedule.from_env({POLL_ENV: "5"}).idle == 5.0  # never slower when idle than when busy
    with pytest.raises(ValueError, match=POLL_ENV):
        PollSchedule.from_env({POLL_ENV: "0"})


def test_pace_supernode_polling_replaces_only_that_modules_time_and_notes_activity(monkeypatch):
    for name in ("time", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(supernode_loop, name, getattr(supernode_loop, name))  # restored after the test
    monkeypatch.setattr(supernode_loop, "_pull_and_store_message", lambda **kwargs: kwargs["found"])
    monkeypatch.setattr(supernode_loop, "_push_messages", lambda **kwargs: None)
    now = [0.0]
    schedule = PollSchedule(fast=0.1, idle=2.0, hold=60, clock=lambda: now[0])
    now[0], schedule.interval = 100.0, 2.0  # idle: past the start's hold, backed off
    pace_supernode_polling(schedule)
    assert supernode_loop.time is not time
    assert time.sleep is not supernode_loop.time.sleep  # the real module is untouched
    supernode_loop._pull_and_store_message(found=None)
    assert schedule.next_wait() == 2.0  # no message: still idle
    supernode_loop._pull_and_store_message(found=7)
    assert schedule.next_wait() == 0.1
    schedule.interval = 2.0
    supernode_loop._push_messages()
    assert schedule.next_wait() == 0.1


def test_pulls_bounded_by_only_shortens():
    defaults = inflatable_utils.pull_objects.__kwdefaults__
    with pulls_bounded_by(float("inf")):
        assert defaults["max_time"] == 7200 and defaults["backoff_cap"] == 0.5
    with pulls_bounded_by(-1):
        assert defaults["max_time"] == 0


def test_local_supernodes_poll_less_once_they_outnumber_the_cores():
    from fedcifar.local.federation import idle_polling
    from fedcifar.node.process import SUPEREXEC_POLL_ENV

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
    with pytest.raises(ValueError, match="no Flower tuning for 'gateway'"):
        tune("gateway")


GUARD_CHECK = """
import sys
from flwr.superlink.routers.fleet import router
from flwr.superlink.servicer.fleet import fleet_handlers
from fedcifar.superlink import fleet_guard
from fedcifar.flower.fleet import GuardNotInPlace, guard_fleet_api
if sys.argv[1] == "renamed":  # a Flower release whose router reaches push-messages some other way
    router.fleet_push_messages = lambda request, state: fleet_handlers.store_reply(request, state)
try:
    guard_fleet_api()
except GuardNotInPlace as err:
    sys.exit(str(err))
print(" ".join(sorted(n for n in fleet_guard.GUARDED if getattr(fleet_handlers, n).__name__ == "guarded_" + n)))
"""


@pytest.mark.parametrize("case", ["flower", "renamed", "grpc"])
def test_the_fleet_guard_stands_in_front_of_every_fleet_handler_or_the_superlink_does_not_start(case, tmp_path):
    """Flower's HTTP Fleet router looks each handler up on ``fleet_handlers`` at every call: the guard
    wraps all of them there, and refuses to start where the router reaches one another way or Flower's
    legacy gRPC Fleet API would open beside it."""
    from fedcifar.superlink import fleet_guard

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    if case == "grpc":
        env["FLWR_INTERNAL_GRPC_FLEET_API"] = "1"
    done = subprocess.run([sys.executable, "-c", GUARD_CHECK, case], env=env, capture_output=True, text=True)
    if case == "flower":
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == sorted(fleet_guard.GUARDED)
    elif case == "renamed":
        assert "no longer calls fleet_handlers.push_messages" in done.stderr
    else:
        assert "FLWR_INTERNAL_GRPC_FLEET_API would open Flower's legacy gRPC APIs" in done.stderr


# ---------------------------------------------------------------------------------------------
# Flower's SuperLink middleware, each layer on its API's paths (item 6)

OTHER_API = {"/v1/control/": "/v1/fleet/pull-messages", "/v1/fleet/": "/v1/runtime/pull-app-messages"}


def test_every_layer_of_flowers_superlink_middleware_is_scoped_or_acts_on_every_api():
    """A layer a Flower release adds fails here until someone reads it and says where it acts."""
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.superlink.main import _get_middleware
    from flwr.superlink.routers.control.middlewares import CONTROL_SENSITIVE_ROUTE_KEYS
    from starlette.middleware.base import BaseHTTPMiddleware

    from fedcifar.flower.middleware import SCOPES, PathScoped, scoped

    flowers = _get_middleware()
    every_api = [layer.cls for layer in flowers if layer.cls not in SCOPES]
    assert every_api == [BaseHTTPMiddleware, ProtobufTranslationMiddleware]  # Flower's error translator, protobuf
    assert all(path.startswith("/v1/control/") for _, path in CONTROL_SENSITIVE_ROUTE_KEYS)
    ours = scoped(flowers)
    assert [layer.kwargs["layer"].cls if layer.cls is PathScoped else layer.cls for layer in ours] == [
        layer.cls for layer in flowers
    ]
    assert sum(layer.cls is PathScoped for layer in ours) == len(SCOPES) == 6


WITHOUT_PLUGINS = [
    ("ControlSensitiveResponse", "other API"),
    ("ControlAuthentication", "other API"),
    ("ControlLicense", "other API"),
    ("ControlEventLog", "other API"),
    ("ControlEventLog", "own API, no plugin"),
    ("NodeAuth", "other API"),
    ("FleetEventLog", "other API"),
    ("FleetEventLog", "own API, no plugin"),
]


class EventLogPlugin:
    """Flower's event-log plugin interface, noting what it is asked to write."""

    def __init__(self) -> None:
        self.written = []

    def compose_log_before_event(self, **event):
        return ("before", event["method_name"])

    def compose_log_after_event(self, **event):
        return ("after", event["method_name"])

    def write_log(self, entry) -> None:
        self.written.append(entry)


def flower_layer_call(cls, path: str, plugin=None):
    """Flower's own ``dispatch`` of layer ``cls`` on a signed-looking Fleet/Control request to ``path``
    (a protobuf request in its state, as Flower's translation layer leaves it): whether the layer
    scoping would skip it, the calls it made to the next layer, and whether it returned that
    layer's response untouched."""
    import asyncio
    from types import SimpleNamespace

    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response

    from fedcifar.flower.middleware import SCOPES, PathScoped

    app = SimpleNamespace(state=SimpleNamespace(control_event_log_plugin=plugin, fleet_event_log_plugin=plugin))
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b"", "app": app}
    scope["state"] = {"protobuf_request": PullMessagesRequest()}
    skipped = not PathScoped(None, *SCOPES[cls], Middleware(cls)).acts_on(scope)
    request, reply, calls = Request(scope), Response(b"flower's"), []

    async def call_next(seen):
        calls.append(seen)
        return reply

    untouched = asyncio.run(cls(app=None).dispatch(request, call_next)) is reply
    untouched = untouched and dict(reply.headers) == dict(Response(b"flower's").headers)
    return skipped, calls == [request], untouched


@pytest.mark.parametrize(("layer", "where"), WITHOUT_PLUGINS)
def test_what_scoping_skips_is_a_pass_through_in_flowers_own_layers(layer, where, monkeypatch):
    """Flower's own ``dispatch`` of each scoped layer, given a request it is scoped away from (another
    API's; its own API's where the app has no event-log plugin), calls the next layer once and returns
    its response as it is: with a protobuf request in the state (node authentication would check its
    signature) and a license plugin that fails the test if asked."""
    from flwr.superlink.routers.control import middlewares as control_middlewares

    from fedcifar.flower.middleware import SCOPES

    monkeypatch.setattr(
        control_middlewares, "get_license_plugin", lambda: SimpleNamespace(check_license=lambda: pytest.fail("asked"))
    )
    (cls,) = [cls for cls in SCOPES if cls.__name__ == f"{layer}Middleware"]
    prefix = SCOPES[cls][0]
    path = OTHER_API[prefix] if where == "other API" else f"{prefix}list-runs"
    assert flower_layer_call(cls, path) == (True, True, True)


@pytest.mark.parametrize("layer", ["ControlEventLog", "FleetEventLog"])
def test_an_event_log_layer_acts_where_the_app_holds_the_plugin_scoping_reads(layer):
    """The positive control: the state attribute ``SCOPES`` names is the one Flower's layer reads."""
    from fedcifar.flower.middleware import SCOPES

    (cls,) = [cls for cls in SCOPES if cls.__name__ == f"{layer}Middleware"]
    plugin, path = EventLogPlugin(), f"{SCOPES[cls][0]}list-runs"
    skipped, passed_on, _ = flower_layer_call(cls, path, plugin)
    assert not skipped and passed_on
    assert plugin.written[0] == ("before", path)  # the after-event needs the handler's protobuf reply


@pytest.mark.parametrize("plugin", ["none needed", "absent", "present"])
def test_a_scoped_layer_sees_its_apis_requests_and_no_others(plugin):
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fedcifar.flower.middleware import PathScoped

    seen = []

    class Recording(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            seen.append(request.url.path)
            response = await call_next(request)
            response.headers["x-layer"] = "control"
            return response

    async def endpoint(request):
        return PlainTextResponse(request.url.path)

    routes = [Route(f"/v1/{api}/x", endpoint, methods=["POST"]) for api in ("control", "fleet", "runtime")]
    needs = None if plugin == "none needed" else "recording_plugin"
    app = Starlette(routes=routes, middleware=[Middleware(PathScoped, "/v1/control/", needs, Middleware(Recording))])
    app.state.recording_plugin = object() if plugin == "present" else None

    async def post_each() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://superlink") as client:
            return {api: await client.post(f"/v1/{api}/x") for api in ("control", "fleet", "runtime")}

    replies = asyncio.run(post_each())
    acts = plugin != "absent"
    assert seen == (["/v1/control/x"] if acts else [])
    assert {api: (r.text, r.headers.get("x-layer")) for api, r in replies.items()} == {
        "control": ("/v1/control/x", "control" if acts else None),
        "fleet": ("/v1/fleet/x", None),
        "runtime": ("/v1/runtime/x", None),
    }


# ---------------------------------------------------------------------------------------------
# a change whose target Flower moved fails loudly, at start


def test_a_change_whose_target_is_gone_fails_loudly_and_changes_nothing():
    import types

    from fedcifar.flower.patch import FlowerChanged, module_view, replace, replace_defaults

    flower_module = types.ModuleType("flwr.some.module")
    flower_module.kept = "Flower's"
    with pytest.raises(FlowerChanged, match=r"flwr.some.module.renamed is gone: .* verified on flwr 1\.42"):
        replace(flower_module, "renamed", "fedcifar's")
    assert not hasattr(flower_module, "renamed")
    assert replace(flower_module, "kept", "fedcifar's") == "Flower's" and flower_module.kept == "fedcifar's"
    with pytest.raises(FlowerChanged, match="has no sleep"):
        module_view(flower_module, sleep=print)

    def pull(*, max_time: float = 1.0) -> None: ...

    with pytest.raises(FlowerChanged, match="has no keyword initial_backoff"):
        replace_defaults(pull, initial_backoff=0.02)
    assert pull.__kwdefaults__ == {"max_time": 1.0}
