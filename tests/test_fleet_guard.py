"""The Fleet guard (``fedcifar/superlink/fleet_guard.py``) against a registered node that acts for another.

A real local federation with TLS and SuperNode authentication: two honest ``fedcifar supernode``s
(slots 0 and 1), a victim V (slot 2) and an attacker A (site-b, slot 3), both driven by this test
request by request with Flower's own ``FleetHttpClient`` and request signer (``tests/fleet_node.py``);
V answers honestly (fedcifar's trainer, run here), A with an error, so every round completes. With
V's node id and pending instruction in hand, A tries each attack of issue 19 in round 1:

- inject a train instruction to V (source: the SuperLink);
- store a message to the SuperLink itself that never expires;
- pull V's instruction by its id;
- answer V's instruction in V's name (source: V);
- answer its own instruction with a reply far above the app's (64 MiB in objects of 4 MiB).

With Flower's own SuperLink (``flower-superlink``: the guard off) each attack succeeds, and the
ServerApp credits A's reply to V's slot; with ``fedcifar superlink`` (in memory, and with
``--database``) each is refused with its reason, counted in ``fedcifar_fleet_refused_total``, and the
global model after round 1 is the example-weighted mean of the honest replies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, RecordDict
from flwr.app.message import Message
from prometheus_client.parser import text_string_to_metric_families

from fedcifar.common.procfs import process_kind, process_memory
from fedcifar.deploy import control, flwr_cli, registrar
from fedcifar.deploy.pki import PUBLIC, write_pki
from fedcifar.local.federation import TOKEN_ENV, free_port, processes_with_token
from fedcifar.node.protocol import Task
from fedcifar.node.trainer import Trainer
from fedcifar.server.replies import Expected
from fedcifar.server_app import largest_reply
from fedcifar.superlink.fleet_budgets import GuardSettings, ReplyLayout
from fedcifar.task import MODEL_KEY, Net, flat_weights
from tests.conftest import MINI, ROOT
from tests.fleet_node import SUPERLINK, FleetNode, Refused, forged, train_reply_content
from tests.support import BIN, FLOWER_ENV, as_foreground_job, secure_superlink, wait

pytestmark = pytest.mark.integration
SLOTS, VICTIM, ATTACKER = 4, 2, 3
FLOODER = 4  # a fifth key, site-c's, bound to no slot: a registered node that floods
RUN_CONFIG = {
    "num-partitions": SLOTS,
    "min-nodes": SLOTS,
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-epochs": 1,
    "batch-size": 32,
    "round-timeout": 90.0,
    "round-retries": 0,
    "seed": 7,
    "device": "cpu",
}
BIG_REPLY_BYTES, PIECE_BYTES = 64 * 2**20, 4 * 2**20  # 16 arrays and their chunks: 36 objects
ATTACKS = ("inject instruction", "message to the SuperLink", "pull instruction", "reply in its name", "big reply")
# what the guard answers each attack with
REASONS = {
    "inject instruction": "other_node",
    "message to the SuperLink": "other_node",
    "pull instruction": "not_own_object",
    "reply in its name": "other_node",
    "big reply": "too_many_objects",
}


class Federation:
    """SuperLink (``fedcifar superlink``, or Flower's own with ``guard=False``), the two honest nodes, and
    the test-driven victim and attacker, all with registered keys."""

    def __init__(self, work: Path, guard: bool, database: bool = False) -> None:
        self.work, self.guard = work, guard
        self.pki = write_pki(work / "pki", supernodes=SLOTS + 1)
        self.port, self.metrics_port, self.token = free_port(), free_port(), uuid.uuid4().hex
        self.address = f"127.0.0.1:{self.port}"
        self.admin = work / "admin"
        self.procs: list[subprocess.Popen] = []
        (work / "logs").mkdir()
        command = secure_superlink(self.pki, self.port, self.metrics_port, work / "superlink" / "metrics")
        if not guard:  # the same SuperLink as Flower ships it
            command = [str(BIN / "flower-superlink"), *command[command.index("--host") :]]
        if database:
            command += ["--database", str(work / "state.db")]
        self.start("superlink", command)
        wait("the SuperLink", lambda: control.superlink_healthy(self.address, str(self.pki / "ca.crt")), 60)
        flwr_cli.write_connection(self.admin, flwr_cli.CONNECTION, self.address, str(self.pki / "ca.crt"))
        self.register_keys()
        for slot in (0, 1):
            self.start(
                f"supernode-{slot}",
                [
                    str(BIN / "fedcifar"),
                    "supernode",
                    "--metrics-port",
                    str(free_port()),
                    "--metrics-host",
                    "127.0.0.1",
                    "--partition-id",
                    str(slot),
                    "--num-partitions",
                    str(SLOTS),
                    "--site",
                    "site-a",
                    "--data",
                    str(MINI),
                    "--superlink",
                    self.address,
                    "--root-certificates",
                    str(self.pki / "ca.crt"),
                    "--port",
                    str(free_port()),
                    "--auth-supernode-private-key",
                    str(self.pki / f"supernode-{slot}.key"),
                ],
                FLWR_HOME=str(work / f"node-{slot}"),
            )
        self.victim = FleetNode(self.address, self.pki / "ca.crt", self.pki / f"supernode-{VICTIM}.key")
        self.attacker = FleetNode(self.address, self.pki / "ca.crt", self.pki / f"supernode-{ATTACKER}.key")
        self.victim.activate()
        self.attacker.activate()

    def start(self, name: str, command: list[str], **extra: str) -> None:
        env = {**FLOWER_ENV, TOKEN_ENV: self.token, "FEDCIFAR_DATA": str(MINI), "OMP_NUM_THREADS": "1", **extra}
        with open(self.work / "logs" / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(command, cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT))

    def register_keys(self) -> None:
        """Slots 0-2 as site-a's keys, slot 3 as site-b's, the flooder as site-c's, as a server operator
        registers them."""
        own, sites = self.work / "keys", self.work / "site-keys"
        own.mkdir(), sites.mkdir()
        for slot in range(SLOTS - 1):
            (own / f"supernode-{slot}.pub").write_bytes((self.pki / PUBLIC / f"supernode-{slot}.pub").read_bytes())
        for key, name in ((ATTACKER, f"site-b.slot-{ATTACKER}"), (FLOODER, "site-c.flooder")):
            (sites / f"{name}.pub").write_bytes((self.pki / PUBLIC / f"supernode-{key}.pub").read_bytes())
        folders = [registrar.KeyFolder(own, "site-a", 0), registrar.KeyFolder(sites)]
        assert len(registrar.register_public_keys(folders, self.admin)) == SLOTS + 1

    def submit(self, out: Path, **config) -> int:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in {**RUN_CONFIG, **config, "out-dir": str(out)}.items())
        admin = {"env": FLOWER_ENV, "flwr_home": self.admin}
        reply = flwr_cli.flwr_json("run", str(ROOT), flwr_cli.CONNECTION, "--run-config", pairs, **admin)
        assert reply.get("success"), reply
        return reply["run-id"]

    def refused(self) -> dict[tuple[str, str], float]:
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {
            (s.labels["reason"], s.labels["site"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "fedcifar_fleet_refused"
            for s in family.samples
            if s.name.endswith("_total")
        }

    def superlink_rss(self) -> int:
        """Resident bytes of the SuperLink's process (Flower's, where the guard lives)."""
        (pid,) = [p for p in processes_with_token(self.token) if process_kind(p) == "flower-superlink"]
        return process_memory(pid)

    def log(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in processes_with_token(self.token):  # the SuperExec and the ServerApp
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def honest_reply(instruction: Message, slot: int) -> tuple[RecordDict, np.ndarray, int]:
    """What fedcifar's ClientApp answers for ``slot``: trained here by fedcifar's trainer."""
    config = instruction.content["config"]
    model = instruction.content["arrays"][MODEL_KEY].numpy()
    task = Task(
        kind="train",
        arrays={MODEL_KEY: model},
        server_round=int(config["server-round"]),
        lr=float(config["lr"]),
        partition_id=slot,
        num_partitions=SLOTS,
        run_config={**RUN_CONFIG},
        data_path=str(MINI),
    )
    reply = Trainer().run(task)
    content = train_reply_content(ArrayRecord({MODEL_KEY: Array(reply.arrays[MODEL_KEY])}), reply.metrics)
    return content, reply.arrays[MODEL_KEY], reply.metrics["num-examples"]


def answer(node: FleetNode, instruction: Message, content: RecordDict | None) -> tuple[int, int]:
    """Send ``node``'s reply to ``instruction`` (an error reply without content): (objects asked, stored)."""
    if content is None:
        reply = Message(Error(code=0, reason="the attacker answers with an error"), reply_to=instruction)
    else:
        reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    pushed, stored = node.push(reply)
    return len(pushed.objects_to_push), stored


def attempt(action) -> str:
    """``accepted`` with what the attack achieved, or the reason it was refused."""
    try:
        return action()
    except Refused as refused:
        return refused.reason


def attack(fed: Federation, victim_instruction: Message, attacker_instruction: Message) -> dict[str, str]:
    """Issue 19's table, tried by the attacker while the victim holds its round-1 instruction unanswered."""
    run_id, victim_id = victim_instruction.metadata.run_id, fed.victim.node_id
    attacker, model = fed.attacker, attacker_instruction.content["arrays"]
    outcome: dict[str, str] = {}

    def inject() -> str:
        message = forged(run_id, SUPERLINK, victim_id, RecordDict({"arrays": model}))
        _, stored = attacker.push(message)
        pulled = fed.victim.pull()  # the victim takes it for an instruction of the SuperLink's
        assert pulled and pulled[0].metadata.message_id == message.metadata.message_id, "the victim did not get it"
        return f"accepted: stored {stored} objects; the victim pulled it"

    def to_superlink() -> str:
        message = forged(run_id, SUPERLINK, SUPERLINK, RecordDict({"arrays": model}), ttl=1e8)
        reply, stored = attacker.push(message)
        assert reply.objects_to_push, "not stored"
        return f"accepted: stored with ttl 1e8, {stored} objects"

    def pull() -> str:
        found = attacker.pull_object(run_id, victim_instruction.metadata.message_id)
        assert found.object_found and found.object_available
        return f"accepted: {len(found.object_content)} bytes of the victim's instruction"

    def in_its_name() -> str:
        zeros = ArrayRecord({MODEL_KEY: Array(np.zeros_like(model[MODEL_KEY].numpy()))})
        metrics = {"train_loss": 1.0, "num-examples": 100, "examples-trained": 100, "train-seconds": 0.5}
        content = train_reply_content(zeros, {**metrics, "partition-id": VICTIM})
        message = forged(run_id, victim_id, SUPERLINK, content, reply_to=victim_instruction.metadata.message_id)
        _, stored = attacker.push(message)
        assert stored, "not stored"
        return f"accepted: {stored} objects stored as the victim's reply"

    def big_reply() -> str:
        pieces = BIG_REPLY_BYTES // PIECE_BYTES  # arrays of 4 MiB: every request under the proxy's 6 MiB
        big = ArrayRecord({f"a{i}": Array(np.full(PIECE_BYTES // 4, i, np.float32)) for i in range(pieces)})
        asked, stored = answer(attacker, attacker_instruction, train_reply_content(big, {"num-examples": 1}))
        assert asked == stored > 2 * pieces
        return f"accepted: {stored} objects of a {BIG_REPLY_BYTES >> 20} MiB reply"

    for name, action in zip(ATTACKS, (inject, to_superlink, pull, in_its_name, big_reply), strict=True):
        outcome[name] = attempt(action)
    return outcome


def run_under_attack(fed: Federation) -> dict:
    out = fed.work / "run"
    run_id = fed.submit(out)
    try:
        return attacked_run(fed, out)
    except BaseException:
        admin = {"env": FLOWER_ENV, "flwr_home": fed.admin}
        print(flwr_cli.flwr("log", str(run_id), flwr_cli.CONNECTION, "--show", **admin).stdout[-5000:])
        raise


def attacked_run(fed: Federation, out: Path) -> dict:
    pending, tree = fed.victim.wait_for_instruction()  # pulled, its objects not yet
    attacker_instruction = fed.attacker.receive(*fed.attacker.wait_for_instruction())
    outcome = attack(fed, pending, attacker_instruction)
    victim_instruction = fed.victim.receive(pending, tree)
    if fed.guard:  # its big reply refused, the attacker still owes one: an error, so the round goes on
        answer(fed.attacker, attacker_instruction, None)
    content, trained, examples = honest_reply(victim_instruction, VICTIM)
    victim_stored = answer(fed.victim, victim_instruction, content)
    second = serve_round(fed)
    history = wait("the run", lambda: completed(out), 180)
    return {
        "outcome": outcome,
        "victim_stored": victim_stored,
        "history": history,
        "before": victim_instruction.content["arrays"][MODEL_KEY].numpy(),
        "after": second.content["arrays"][MODEL_KEY].numpy(),
        "victim_update": (trained, examples),
        "config": history["config"],
    }


def serve_round(fed: Federation, latencies: list | None = None) -> Message:
    """One round of the test-driven nodes: the victim trains and answers, the attacker answers an error;
    the victim's instruction (its polls' seconds into ``latencies``)."""
    instruction = fed.victim.receive(*fed.victim.wait_for_instruction(latencies=latencies))
    answer(fed.attacker, fed.attacker.receive(*fed.attacker.wait_for_instruction()), None)
    answer(fed.victim, instruction, honest_reply(instruction, VICTIM)[0])
    return instruction


def completed(out: Path) -> dict | None:
    path = out / "history.json"
    history = json.loads(path.read_text()) if path.exists() else {}
    return history if history.get("status") == "completed" else None


def honest_mean(result: dict, victim: tuple[np.ndarray, int] | None) -> np.ndarray:
    """The example-weighted mean of slots 0 and 1 (fedcifar's trainer, run here) and ``victim``."""
    replies = []
    for slot in (0, 1):
        task = Task(
            kind="train",
            arrays={MODEL_KEY: result["before"]},
            server_round=1,
            lr=result["config"]["learning-rate"],
            partition_id=slot,
            num_partitions=SLOTS,
            run_config=result["config"],
            data_path=str(MINI),
        )
        reply = Trainer().run(task)
        replies.append((reply.arrays[MODEL_KEY], reply.metrics["num-examples"]))
    if victim:
        replies.append(victim)
    return sum(w * n for w, n in replies) / sum(n for _, n in replies)


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("unguarded"), guard=False)
    try:
        yield fed, run_under_attack(fed)
    finally:
        fed.close()


def guarded_federation(tmp_path_factory, state: str):
    fed = Federation(tmp_path_factory.mktemp(f"guarded-{state}"), guard=True, database=state == "database")
    try:
        before = fed.refused()
        yield fed, run_under_attack(fed), before
    finally:
        fed.close()


@pytest.fixture(scope="module")
def guarded_in_memory(tmp_path_factory):
    yield from guarded_federation(tmp_path_factory, "memory")


@pytest.fixture(scope="module")
def guarded_with_database(tmp_path_factory):
    yield from guarded_federation(tmp_path_factory, "database")


@pytest.fixture(params=["in_memory", "with_database"])
def guarded(request):
    return request.getfixturevalue(f"guarded_{request.param}")


def test_without_the_guard_every_attack_succeeds(unguarded):
    fed, result = unguarded
    assert all(o.startswith("accepted") for o in result["outcome"].values()), result["outcome"]
    assert result["victim_stored"] == (0, 0)  # the attacker's reply took the victim's place
    first = result["history"]["rounds"][0]
    assert VICTIM in first["partitions"]  # credited to the victim's slot ...
    trained, _ = result["victim_update"]
    assert not np.allclose(result["after"], honest_mean(result, (trained, result["victim_update"][1])), atol=1e-6)
    # ... and the global model is not the mean of the honest replies
    print("\nwithout the guard: " + json.dumps(result["outcome"], indent=1))


def test_the_guard_refuses_every_attack_and_the_model_is_the_mean_of_the_honest_replies(guarded):
    fed, result, before = guarded
    assert result["outcome"] == REASONS
    asked, stored = result["victim_stored"]
    assert asked == stored > 0  # the victim's own reply is stored
    rounds = result["history"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:  # the honest nodes and the victim trained every round
        assert record["partitions"] == [0, 1, VICTIM] and record["sites"] == ["site-a"] * 3
    np.testing.assert_allclose(result["after"], honest_mean(result, result["victim_update"]), rtol=1e-4, atol=1e-6)
    after = fed.refused()
    counted = {k: after[k] - before.get(k, 0) for k in after}
    expected: dict[tuple[str, str], int] = {}
    for reason in REASONS.values():
        expected[(reason, "site-b")] = expected.get((reason, "site-b"), 0) + 1
    assert {k: v for k, v in counted.items() if v} == expected
    log = fed.log("superlink")
    for reason in set(REASONS.values()):  # once per node and reason
        assert log.count(f": {reason}: ") == 1, reason
    print("\nwith the guard: " + json.dumps(result["outcome"]))


def rounds_served(fed: Federation, name: str, rounds: int, latencies: list) -> dict:
    """``rounds`` rounds of a new run, after 15 s of the victim's idle polls (each poll's seconds into
    ``latencies``, and those of the run)."""
    idle_until = time.monotonic() + 15
    while time.monotonic() < idle_until:
        started = time.perf_counter()
        assert fed.victim.pull() is None
        latencies.append(time.perf_counter() - started)
        time.sleep(0.1)
    out = fed.work / name
    fed.submit(out, **{"num-server-rounds": rounds})
    for _ in range(rounds):
        serve_round(fed, latencies)
    return wait(name, lambda: completed(out), 180)


def test_a_flood_from_one_node_is_refused_and_costs_the_others_little(guarded_in_memory):
    """A registered node (never sampled) sends signed polls as fast as one core lets it: the requests
    beyond its budget get 503, the run goes on with every honest node in every round, and the
    SuperLink holds no more than the budgets of the nodes present. The figures (the honest node's poll
    p50/p99 and the rounds, quiet and flooded) are printed: benchmarks/RESULTS.md compares them."""
    fed, _, _ = guarded_in_memory
    flooder = FleetNode(fed.address, fed.pki / "ca.crt", fed.pki / f"supernode-{FLOODER}.key")
    flooder.activate()
    flooder.deactivate()  # registered and signing, but never sampled
    quiet_polls: list[float] = []
    quiet = rounds_served(fed, "quiet", 2, quiet_polls)
    quiet_rss = fed.superlink_rss()
    before = fed.refused()
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.fleet_flood", fed.address, str(fed.pki / "ca.crt")]
        + [str(fed.pki / f"supernode-{FLOODER}.key"), str(flooder.node_id), "600", str(os.cpu_count() - 1)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,  # SIGINT ends the flood and makes it report
    )
    try:
        rate_limited = ("rate_limited", "site-c")  # at full speed before the run starts: past its burst
        wait("the flood refused", lambda: fed.refused().get(rate_limited, 0) > before.get(rate_limited, 0), 60)
        flooded_polls: list[float] = []
        flooded = rounds_served(fed, "flooded", 2, flooded_polls)
        flooded_rss = fed.superlink_rss()
    finally:
        attacker.send_signal(signal.SIGINT)
        report = json.loads(attacker.communicate(timeout=60)[0])
    refused = fed.refused()
    busy = refused.get(("rate_limited", "site-c"), 0) - before.get(("rate_limited", "site-c"), 0)
    # every 503 counted (one more when the stop came while an answer was on its way); no more served
    # than the node's budget: its burst and its rate over the flood
    settings, refused_503 = GuardSettings(), report["status"].get("503", 0)
    assert busy - 1 <= refused_503 <= busy and refused_503 > 0, (report, busy)
    assert report["status"].get("200", 0) <= settings.burst + settings.requests_per_second * report["seconds"] + 5
    for history in (quiet, flooded):
        assert [r["partitions"] for r in history["rounds"]] == [[0, 1, VICTIM]] * 2
    model = ArrayRecord({MODEL_KEY: Array(flat_weights(Net()))})
    layout = ReplyLayout.of(largest_reply(Expected(Expected.layout_of(model), (1,), (1,), 1, 1.0), model))
    budgets = (SLOTS + 1) * GuardSettings().held_replies * layout.max_reply_bytes
    assert flooded_rss <= quiet_rss + budgets, (quiet_rss, flooded_rss, budgets)

    def summary(polls: list[float], history: dict) -> str:
        p50, p99 = np.percentile(polls, [50, 99]) * 1000
        seconds = ", ".join(f"{r['round_seconds']:.2f}" for r in history["rounds"])
        return f"poll p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(polls)} polls), rounds {seconds} s"

    print(
        f"\nflood: {report['requests']} signed polls in {report['seconds']:.1f} s from one core "
        f"({report['per_second']:.0f}/s), answers {report['status']}"
        f"\nquiet:   {summary(quiet_polls, quiet)}, SuperLink RSS {quiet_rss / 2**20:.0f} MiB"
        f"\nflooded: {summary(flooded_polls, flooded)}, SuperLink RSS {flooded_rss / 2**20:.0f} MiB"
        f" (bound: quiet + {budgets / 2**20:.0f} MiB of budgets)"
    )
