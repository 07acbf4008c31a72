"""Hollow SuperNodes (``node/hollow.py``) against a real ``fedcifar superlink`` (TLS, SuperNode auth,
the Fleet guard): a few of them take part in a round that the real ServerApp aggregates (their
distinct updates averaged, as FedAvg weighs them), and a hollow node's requests, per Fleet handler,
match a real ``fedcifar supernode``'s, idle and in a round (counted by the SuperLink itself,
``fedcifar_fleet_requests_total``)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from support import FLOWER_ENV, scrape, secure_superlink, wait

from fedcifar.deploy import flwr_cli
from fedcifar.deploy.control import control_client, register_node_key, superlink_healthy
from fedcifar.deploy.key_formats import load_private_key
from fedcifar.deploy.pki import write_pki
from fedcifar.flower.polling import IDLE_POLL_ENV, POLL_ENV, POLL_HOLD_ENV, PollSchedule
from fedcifar.local.federation import free_port
from fedcifar.node.hollow import HollowFleet, hollow_step
from fedcifar.server.history import load_history
from fedcifar.task import initial_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MINI_SIZES = {"train": 500, "test": 200}  # tests/data/cifar10-mini
# the tests' poll schedule, for hollow and real nodes alike: short, so that an idle spell shows polls;
# a hold longer than the real node's training on the mini data, so that both poll fast through a round
FAST, IDLE, HOLD = 0.1, 0.5, 10.0


@pytest.fixture(scope="module")
def link(tmp_path_factory, mini_dir):
    """``fedcifar superlink`` on 127.0.0.1 (TLS, SuperNode auth), its ServerApps on the mini data."""
    work = tmp_path_factory.mktemp("hollow")
    pki = write_pki(work / "pki", supernodes=1)
    port, metrics = free_port(), free_port()
    env = {**FLOWER_ENV, "FLWR_HOME": str(work / "flwr"), "FEDCIFAR_DATA": str(mini_dir)}
    superlink = subprocess.Popen(
        secure_superlink(pki, port, metrics, work / "metrics"),
        cwd=work,
        stdout=open(work / "superlink.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    flwr_cli.write_connection(work / "flwr", flwr_cli.CONNECTION, address, str(pki / "ca.crt"))
    try:
        wait("the SuperLink", lambda: superlink_healthy(address, str(pki / "ca.crt")) and scrape(metrics), 90)
        yield {"address": address, "pki": pki, "work": work, "metrics": metrics, "env": env}
    finally:
        superlink.terminate()
        superlink.wait(30)


def fleet(link, count: int, first_slot: int, slots: int) -> HollowFleet:
    hollow = HollowFleet(
        link["address"],
        link["address"],  # the open-source SuperLink serves its Control API on the same port
        (link["pki"] / "ca.crt").read_bytes(),
        count,
        slots,
        first_slot,
        sizes=MINI_SIZES,
        schedule=lambda: PollSchedule(FAST, IDLE, HOLD),
    )
    hollow.register()
    hollow.start()
    wait(f"{count} hollow nodes activated", lambda: hollow.activated() == count, 60)
    return hollow


def run(link, out: Path, **config) -> dict:
    """``flwr run`` fedcifar with ``config``; waits for the run to end and returns its history."""
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in {**config, "out-dir": str(out)}.items())
    home = link["work"] / "flwr"
    reply = flwr_cli.flwr_json(
        "run", str(ROOT), flwr_cli.CONNECTION, "--run-config", pairs, env=link["env"], flwr_home=home
    )
    assert reply.get("success"), reply
    run_id = str(reply["run-id"])

    def finished():
        runs = flwr_cli.flwr_json("ls", flwr_cli.CONNECTION, "--run-id", run_id, env=link["env"], flwr_home=home)
        status = str((runs.get("runs") or [{}])[0].get("status", ""))
        return status if status.startswith("finished") else None

    assert wait(f"run {run_id} to finish", finished, 240, interval=1) == "finished:completed", (
        link["work"] / "superlink.log"
    ).read_text()[-3000:]
    return load_history(out)


def requests_by_handler(link, site: str) -> dict[str, float]:
    snapshot = scrape(link["metrics"]) or {}
    return {
        dict(labels)["handler"]: count
        for (name, labels), count in snapshot.items()
        if name == "fedcifar_fleet_requests_total" and dict(labels)["site"] == site
    }


def test_hollow_nodes_take_part_in_a_round_and_their_updates_are_averaged(link):
    hollow = fleet(link, 3, 0, 3)
    try:
        history = run(link, link["work"] / "smoke", **{"num-partitions": 3, "min-nodes": 3, "num-server-rounds": 1})
    finally:
        hollow.close()
    [record] = history["rounds"]
    assert (record["participating_clients"], record["partitions"], record["failures"]) == (3, [0, 1, 2], 0)
    assert record["sites"] == ["hollow"] * 3
    # each claimed 500 // 3 examples: the average of the three steps, on every weight of the initial model
    step = np.float32(np.mean([hollow_step(slot) for slot in range(3)]))
    model = torch.load(link["work"] / "smoke" / "model.pt")["model"]
    for name, start in initial_model(history["config"]["seed"]).state_dict().items():
        np.testing.assert_allclose(model[name].numpy(), start.numpy() + step, rtol=0, atol=1e-6)
    assert hollow.summary()["answered"] == {"train": 3}
    assert not hollow.summary()["failures"]


def test_hollow_nodes_sign_in_with_registered_keys_and_the_fleet_api_refuses_what_they_did_not_sign(link, tmp_path):
    """``--keys``: a key registered beforehand (as the registrar does from the sites' Secret) signs its
    node in. Then Fleet requests for that node, through the SuperLink with Flower's middleware scoped
    (``flower/middleware.py``): signed by its key, answered; unsigned, or signed by another key, refused
    by Flower's node authentication (401); the path spelt with an encoded slash reaches no handler."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    ca = (link["pki"] / "ca.crt").read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "hollow.slot-5.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    control = control_client(link["address"], ca)
    register_node_key(control, public_key_to_bytes(key.public_key()), "hollow/slot-5")
    control.close()
    hollow = HollowFleet(
        link["address"], None, ca, 1, 6, 5, sizes=MINI_SIZES, schedule=lambda: PollSchedule(FAST, IDLE, HOLD), keys=keys
    )
    hollow.start()
    try:
        wait("the hollow node activated", lambda: hollow.activated() == 1, 60)
        request = PullMessagesRequest(node=Node(node_id=hollow.nodes[0].node_id))

        def pull(signer):
            signed = [NodeAuthHttpInterceptor(signer, signer.public_key())] if signer else []
            with FleetHttpClient.from_server_address(link["address"], False, ca, signed) as fleet_api:
                return fleet_api.PullMessages(request)

        assert isinstance(pull(key), PullMessagesResponse)
        for signer in (None, ec.generate_private_key(ec.SECP256R1())):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                pull(signer)
            assert refused.value.response.status_code == 401
        context = ssl.create_default_context(cafile=str(link["pki"] / "ca.crt"))
        encoded = httpx.post(
            f"https://{link['address']}/v1/fleet%2Fpull-messages",
            content=request.SerializeToString(),
            headers={"content-type": "application/protobuf"},
            verify=context,
        )
        assert encoded.status_code in (401, 404), encoded.text
    finally:
        hollow.close()


def test_a_hollow_nodes_requests_match_a_real_nodes(link, mini_dir):
    """Slot 3 a real ``fedcifar supernode``, slot 4 a hollow node, both on the same poll schedule: the
    SuperLink counts each one's requests per Fleet handler, idle and in a round (train and evaluate)."""
    key = load_private_key((link["pki"] / "supernode-0.key").read_bytes())
    control = control_client(link["address"], (link["pki"] / "ca.crt").read_bytes())
    register_node_key(control, public_key_to_bytes(key.public_key()), "real/slot-3")
    control.close()
    schedule = {POLL_ENV: str(FAST), IDLE_POLL_ENV: str(IDLE), POLL_HOLD_ENV: str(HOLD)}
    real = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedcifar", "supernode", "--metrics-port", str(free_port())),
            *("--metrics-host", "127.0.0.1", "--site", "real", "--partition-id", "3", "--num-partitions", "5"),
            *("--data", str(mini_dir), "--superlink", link["address"], "--port", str(free_port())),
            f"--root-certificates={link['pki'] / 'ca.crt'}",
            f"--auth-supernode-private-key={link['pki'] / 'supernode-0.key'}",
        ],
        cwd=link["work"],
        env={**link["env"], **schedule},
        stdout=open(link["work"] / "real-node.log", "w"),
        stderr=subprocess.STDOUT,
    )
    hollow = None
    try:
        wait("the real node's first poll", lambda: requests_by_handler(link, "real").get("pull_messages"), 90)
        hollow = fleet(link, 1, 4, 5)
        time.sleep(HOLD + 1.5)  # both start busy: past their holds, backed off to the idle interval
        idle_from = {site: requests_by_handler(link, site) for site in ("real", "hollow")}
        time.sleep(5)
        idle = {site: requests_by_handler(link, site) for site in ("real", "hollow")}
        config = {"num-partitions": 5, "min-nodes": 2, "num-server-rounds": 1, "fraction-evaluate": 1.0}
        run(link, link["work"] / "mix", **config)
        time.sleep(1)  # the evaluate replies' last requests
        ran = {site: requests_by_handler(link, site) for site in ("real", "hollow")}
    finally:
        if hollow:
            hollow.close()
        real.terminate()
        real.wait(30)

    def polls(counts, since):
        return counts.get("pull_messages", 0) - since.get("pull_messages", 0)

    # idle: both poll every IDLE s (5 s: 10 polls), give or take 2
    assert abs(polls(idle["real"], idle_from["real"]) - polls(idle["hollow"], idle_from["hollow"])) <= 2, idle
    # in the round: the same requests of every other kind (the run and its FAB, each object pulled and
    # pushed, each receipt confirmed); polls on the same schedule, the real node's slower while its
    # ClientApp trains beside it on this machine's 2 cores (1.5 times fewer, measured), never more
    spent = {site: {h: ran[site].get(h, 0) - idle[site].get(h, 0) for h in ran[site]} for site in ran}
    for handler in ("get_run", "get_fab", "confirm_message_received", "push_messages"):
        assert spent["real"].get(handler) == spent["hollow"].get(handler) > 0, (handler, spent)
    for handler in ("pull_object", "push_object"):  # a content pulled before it arrived is asked for again
        assert abs(spent["real"].get(handler, 0) - spent["hollow"].get(handler, 0)) <= 2, (handler, spent)
    real_polls, hollow_polls = spent["real"]["pull_messages"], spent["hollow"]["pull_messages"]
    assert real_polls - 3 <= hollow_polls <= 2 * real_polls, spent


def test_a_quiet_nodes_polls_are_answered_before_flowers_path_after_flowers_own_checks(link, tmp_path):
    """``superlink/idle_polls.py``: instructions stored for nodes whose polls were answered early reach
    them at their next poll (a run of two rounds in which both train); a probe node's first poll goes
    Flower's way, its next ones are answered early (``fedcifar_fleet_quiet_polls_total``), and a poll
    naming it unsigned, signed by a key the SuperLink does not know or by another registered node's
    key is refused by Flower's node authentication (401) and answered early by nothing."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.fleet_pb2 import (
        ActivateNodeRequest,
        DeactivateNodeRequest,
        PullMessagesRequest,
        PullMessagesResponse,
    )
    from flwr.proto.node_pb2 import Node
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    ca = (link["pki"] / "ca.crt").read_bytes()
    keys_dir, keys = tmp_path / "keys", [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    keys_dir.mkdir()
    control = control_client(link["address"], ca)
    for slot, key in enumerate(keys[:2]):
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (keys_dir / f"quiet.slot-{slot}.key").write_bytes(pem)
        register_node_key(control, public_key_to_bytes(key.public_key()), f"quiet/slot-{slot}")
    probe = keys[2]
    register_node_key(control, public_key_to_bytes(probe.public_key()), "probe/slot-9")
    control.close()
    schedule = lambda: PollSchedule(FAST, IDLE, HOLD)  # noqa: E731
    hollow = HollowFleet(
        link["address"], None, ca, 2, 2, 0, sizes=MINI_SIZES, schedule=schedule, keys=keys_dir, site="quiet"
    )
    hollow.start()

    def quiet_polls(site: str) -> float:
        snapshot = scrape(link["metrics"]) or {}
        return sum(
            count
            for (name, labels), count in snapshot.items()
            if name == "fedcifar_fleet_quiet_polls_total" and dict(labels)["site"] == site
        )

    def fleet_api(signer):
        signed = [NodeAuthHttpInterceptor(signer, signer.public_key())] if signer else []
        return FleetHttpClient.from_server_address(link["address"], False, ca, signed)

    try:
        wait("both nodes activated", lambda: hollow.activated() == 2, 60)
        wait("their polls answered before Flower's path", lambda: quiet_polls("quiet") >= 10, 30)
        history = run(link, link["work"] / "quiet", **{"num-partitions": 2, "min-nodes": 2, "num-server-rounds": 2})
    finally:
        hollow.close()
    assert [(r["partitions"], r["failures"]) for r in history["rounds"]] == [([0, 1], 0), ([0, 1], 0)]
    assert hollow.summary()["answered"] == {"train": 4}

    with fleet_api(probe) as own:
        node_id = own.ActivateNode(
            ActivateNodeRequest(public_key=public_key_to_bytes(probe.public_key()), heartbeat_interval=30)
        ).node_id
        request = PullMessagesRequest(node=Node(node_id=node_id))
        try:
            assert own.PullMessages(request) == PullMessagesResponse()  # Flower found nothing: quiet now
            assert quiet_polls("probe") == 0
            assert own.PullMessages(request) == PullMessagesResponse()
            assert quiet_polls("probe") == 1  # answered early
            for signer in (None, ec.generate_private_key(ec.SECP256R1()), keys[0]):  # keys[0]: another node's
                with fleet_api(signer) as other, pytest.raises(httpx.HTTPStatusError) as refused:
                    other.PullMessages(request)
                assert refused.value.response.status_code == 401
            assert quiet_polls("probe") == 1
        finally:
            own.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
