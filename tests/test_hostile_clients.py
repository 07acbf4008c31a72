"""A hostile SuperNode in a real local federation with TLS and SuperNode authentication.

Two honest ``fedcifar supernode`` nodes train slots 0 and 1; slot 2's key belongs to an attacker
who runs a plain ``flower-supernode`` whose ClientApp processes are ``tests/hostile.py``: each
round it sends another bad reply of the catalogue (train and evaluate), including claims of an
honest node's slot. Every round completes; every bad reply is refused and counted with its
reason; the global model after every round equals the example-weighted mean of the honest
replies (recomputed here from the global model the attacker received); the ServerApp stays
small. Then the attack checks cannot catch — well-formed zeros with a plausible count — under
FedAvg, FedMedian and Krum.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedcifar.common.procfs import process_kind, process_memory
from fedcifar.deploy import flwr_cli, key_formats, registrar
from fedcifar.deploy.pki import write_pki
from fedcifar.local.federation import TOKEN_ENV, free_port, processes_with_token
from fedcifar.node.protocol import Task
from fedcifar.node.trainer import Trainer
from fedcifar.server.checkpoint import load_checkpoint
from fedcifar.task import MODEL_KEY, Net, flat_weights
from tests.conftest import MINI, ROOT
from tests.hostile import EVALUATE_REPLIES, TRAIN_REPLIES, ZEROS
from tests.support import BIN, FLOWER_ENV, secure_superlink, wait

pytestmark = pytest.mark.integration
SLOTS, HOSTILE_SLOT = 3, 2
RUN_CONFIG = {
    "num-partitions": SLOTS,
    "min-nodes": SLOTS,
    "local-epochs": 1,
    "batch-size": 32,
    "round-timeout": 60.0,
    "round-retries": 0,
    "seed": 7,
    "device": "cpu",
}
SERVERAPP_RSS_LIMIT = 1.5 * 2**30


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    (work / "pki").mkdir()
    pki = write_pki(work / "pki", supernodes=SLOTS)
    keys = work / "keys"
    keys.mkdir()
    for i in range(SLOTS):
        (keys / f"supernode-{i}.pub").write_bytes((pki / "public" / f"supernode-{i}.pub").read_bytes())
    token, port, metrics_port = uuid.uuid4().hex, free_port(), free_port()
    env = {**FLOWER_ENV, TOKEN_ENV: token, "FEDCIFAR_DATA": str(MINI), "OMP_NUM_THREADS": "1"}
    logs, procs = work / "logs", []
    logs.mkdir()

    def start(name: str, command: list[str], **extra: str) -> None:
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=work,
                    env={**env, **extra},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    ready = work / "superlink" / "ready"
    start(
        "superlink",
        secure_superlink(pki, port, metrics_port),
        **{
            registrar.PUBLIC_KEYS_ENV: str(keys),
            registrar.READY_FILE_ENV: str(ready),
            "FEDCIFAR_SITE": "site-a",
            "FLWR_HOME": str(work / "superlink" / "flwr"),
        },
    )
    link = ["--superlink", f"127.0.0.1:{port}", "--root-certificates", str(pki / "ca.crt")]
    admin = work / "admin"
    flwr_cli.write_connection(admin, flwr_cli.CONNECTION, f"127.0.0.1:{port}", str(pki / "ca.crt"))
    plan, records = work / "plan.json", work / "records"
    try:
        wait("the SuperNode keys registered", ready.exists, 90)
        for i in range(SLOTS - 1):
            start(
                f"supernode-{i}",
                [
                    str(BIN / "fedcifar"),
                    "supernode",
                    "--metrics-port",
                    str(free_port()),
                    "--metrics-host",
                    "127.0.0.1",
                    "--partition-id",
                    str(i),
                    "--num-partitions",
                    str(SLOTS),
                    "--site",
                    "site-a",
                    "--data",
                    str(MINI),
                    *link,
                    "--port",
                    str(free_port()),
                    "--auth-supernode-private-key",
                    str(pki / f"supernode-{i}.key"),
                ],
                FLWR_HOME=str(work / f"node-{i}"),
            )
        hostile_key = key_formats.rewrite_private_key_arg(
            ["--auth-supernode-private-key", str(pki / f"supernode-{HOSTILE_SLOT}.key")], work / "hostile-key"
        )
        start(
            "hostile",
            [
                sys.executable,
                str(ROOT / "tests" / "hostile.py"),
                "supernode",
                *link,
                "--port",
                str(free_port()),
                *hostile_key,
                "--node-config",
                f"partition-id={HOSTILE_SLOT} num-partitions={SLOTS}",
            ],
            HOSTILE_PLAN=str(plan),
            HOSTILE_RECORDS=str(records),
            FLWR_HOME=str(work / "hostile-home"),
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
        )
        yield {
            "work": work,
            "admin": admin,
            "token": token,
            "plan": plan,
            "records": records,
            "logs": logs,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(federation, name: str, plan: dict, **config) -> tuple[dict, int]:
    """One run to its end; its history and the ServerApp's peak resident memory."""
    federation["plan"].write_text(json.dumps(plan))
    out = federation["work"] / "runs" / name
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in {**RUN_CONFIG, **config, "out-dir": str(out)}.items())
    admin = {"env": FLOWER_ENV, "flwr_home": federation["admin"]}
    reply = flwr_cli.flwr_json("run", str(ROOT), flwr_cli.CONNECTION, "--run-config", pairs, **admin)
    assert reply.get("success"), reply
    run_id, peak = reply["run-id"], 0

    def completed() -> dict | None:
        nonlocal peak
        for pid in processes_with_token(federation["token"]):
            if process_kind(pid) == "flwr-serverapp":
                peak = max(peak, process_memory(pid, "VmHWM"))  # 0 if it ended since it was listed
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else {}
        return history if history.get("status") == "completed" else None

    try:
        history = wait(f"run {name} to complete", completed, 600, interval=0.2)
    except AssertionError:
        logs = flwr_cli.flwr("log", str(run_id), flwr_cli.CONNECTION, "--show", **admin)
        raise AssertionError(f"run {name} did not complete:\n{logs.stdout[-4000:]}") from None
    return history, peak


def global_models(federation, history: dict) -> list[np.ndarray]:
    """The global model before each round (as the attacker received it), and after the last."""
    records = federation["records"] / str(history["run_id"])
    models = [np.load(records / f"global-{r}.npy") for r in range(len(history["rounds"]))]
    net = Net()
    net.load_state_dict(load_checkpoint(Path(history["config"]["out-dir"]), net.state_dict()).model)
    return [*models, flat_weights(net)]


def honest_replies(history: dict, before: np.ndarray, server_round: int) -> list[tuple[np.ndarray, int]]:
    """What slots 0 and 1 answer to ``before`` in ``server_round``: fedcifar's trainer, run here."""
    replies = []
    for slot in range(SLOTS - 1):
        task = Task(
            kind="train",
            arrays={MODEL_KEY: before},
            server_round=server_round,
            lr=history["config"]["learning-rate"],
            partition_id=slot,
            num_partitions=SLOTS,
            run_config=history["config"],
            data_path=str(MINI),
        )
        reply = Trainer().run(task)
        replies.append((reply.arrays[MODEL_KEY], reply.metrics["num-examples"]))
    return replies


def mean(replies: list[tuple[np.ndarray, int]]) -> np.ndarray:
    return sum(w * n for w, n in replies) / sum(n for _, n in replies)


def refused(federation) -> dict[str, float]:
    """fedcifar_rejected_updates_total of the attacker's slot, by reason, from the SuperLink's endpoint."""
    text = urllib.request.urlopen(federation["metrics"], timeout=10).read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fedcifar_rejected_updates"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["partition"] == str(HOSTILE_SLOT)
    }


def test_every_bad_reply_is_refused_and_the_model_is_the_mean_of_the_honest_ones(federation):
    train, evaluate = list(TRAIN_REPLIES), list(EVALUATE_REPLIES)
    before = refused(federation)
    history, serverapp_peak = run(
        federation,
        "hostile",
        {"train": train, "evaluate": evaluate},
        **{"num-server-rounds": len(train), "fraction-evaluate": 1.0},
    )

    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, len(train) + 1))  # every round completed
    expected_counts: dict[str, int] = {}
    for record, bad in zip(rounds, train, strict=True):
        bad_evaluate = evaluate[(record["round"] - 1) % len(evaluate)]
        reasons = [TRAIN_REPLIES[bad][1], EVALUATE_REPLIES[bad_evaluate][1]]
        assert record["refusals"] == [
            {"slot": str(HOSTILE_SLOT), "site": "site-a", "reason": r, "kind": k}
            for r, k in zip(reasons, ("train", "evaluate"), strict=True)
        ], (bad, bad_evaluate)
        assert record["partitions"] == [0, 1] and record["sites"] == ["site-a", "site-a"]
        for reason in reasons:
            expected_counts[reason] = expected_counts.get(reason, 0) + 1
    after = refused(federation)
    assert {r: after[r] - before.get(r, 0) for r in expected_counts} == expected_counts

    models = global_models(federation, history)
    for server_round in range(1, len(rounds) + 1):
        np.testing.assert_allclose(
            models[server_round],
            mean(honest_replies(history, models[server_round - 1], server_round)),
            rtol=1e-4,
            atol=1e-6,
            err_msg=f"round {server_round}",
        )
    assert 0 < serverapp_peak < SERVERAPP_RSS_LIMIT, f"ServerApp peak RSS {serverapp_peak / 2**20:.0f} MiB"
    print(
        f"\nServerApp peak RSS {serverapp_peak / 2**20:.0f} MiB over {len(rounds)} rounds; refused: {expected_counts}"
    )


def test_well_formed_zeros_pass_the_checks_fedavg_takes_them_in_robust_rules_leave_them_out(federation):
    kept = {}
    for strategy in ("fedavg", "fedmedian", "krum"):
        history, _ = run(
            federation, f"zeros-{strategy}", {"train": [ZEROS]}, **{"num-server-rounds": 3, "strategy": strategy}
        )
        models = global_models(federation, history)
        for server_round, record in enumerate(history["rounds"], start=1):
            assert record["partitions"] == [0, 1, 2] and record["refusals"] == []  # no check can catch it
            honest = honest_replies(history, models[server_round - 1], server_round)
            zeros = (np.zeros_like(models[0]), 100)
            got = models[server_round]
            if strategy == "fedavg":
                np.testing.assert_allclose(got, mean([*honest, zeros]), rtol=1e-4, atol=1e-6)
            elif strategy == "fedmedian":
                np.testing.assert_allclose(
                    got, np.median([w for w, _ in honest] + [zeros[0]], axis=0), rtol=1e-4, atol=1e-6
                )
            else:  # Krum keeps the one update nearest its neighbours: an honest one
                assert any(np.allclose(got, w, rtol=1e-4, atol=1e-6) for w, _ in honest)
        last = history["rounds"][-1]
        honest_mean = mean(honest_replies(history, models[-2], last["round"]))
        kept[strategy] = (np.linalg.norm(models[-1]) / np.linalg.norm(honest_mean), last["eval_loss"])
    print(
        "\none node sending zeros, round 3: |global| / |mean of the honest updates|, test loss: "
        + ", ".join(f"{s} {ratio:.3f}, {loss:.4f}" for s, (ratio, loss) in kept.items())
    )
