"""Faults on a real cluster: a client pod killed mid-run, then the SuperLink's processes killed.

The run must still complete every round: the strategy drops the lost client's reply at the
round's deadline (or as soon as Flower reports the node gone) and counts it against partition 1;
the StatefulSet brings the pod back with the same ordinal, so the same partition; when the
SuperLink dies, the run Job fails its attempt, Kubernetes retries it, and the new run resumes from
the checkpoint of the last completed round (the outputs live on the SuperLink's state volume, kept
across a container restart).
"""

from __future__ import annotations

import time

import pytest
from conftest import recreate_namespace
from kube import CHART, helm, http_get, pod_logs, pods, port_forward, run, run_history, small_release, wait_for
from prometheus_client.parser import text_string_to_metric_families

from fedcifar.metrics import FAILURE_REASONS

NS, RELEASE = "fedcifar-e2e-faults", "faults"
EXTRA_NAMESPACES = (NS,)
FULL = f"{RELEASE}-fedcifar"
ROUNDS, ROUND_TIMEOUT = 8, 20
pytestmark = pytest.mark.e2e


def server_metrics(port: int) -> dict[tuple, float]:
    text = http_get(f"http://127.0.0.1:{port}/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def superlink_pod(kube) -> str:
    live = [
        p
        for p in pods(kube, NS, f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=superlink")
        if p.metadata.deletion_timestamp is None
    ]
    return live[0].metadata.name


def history(kube) -> dict:
    return run_history(NS, superlink_pod(kube), 1)


@pytest.fixture(scope="module")
def faults_release(kube, image):
    recreate_namespace(kube, NS)
    args = small_release(image, {"run.rounds": ROUNDS, "run.roundTimeout": ROUND_TIMEOUT})
    helm("install", RELEASE, str(CHART), "-n", NS, *args, "--wait", "--timeout", "5m")
    yield RELEASE
    helm("uninstall", RELEASE, "-n", NS, check=False)
    kube.delete_namespace(NS)


def test_a_killed_client_pod_and_a_killed_superlink_lose_no_round(kube, faults_release):
    from kubernetes import client

    batch = client.BatchV1Api()
    with port_forward(NS, f"deploy/{FULL}-superlink", 9400) as port:
        completed = lambda: server_metrics(port).get(("fedcifar_rounds_completed_total", ()), 0)  # noqa: E731
        wait_for("round 1 to complete", lambda: completed() >= 1, 600, 0.5)
        killed_at = time.monotonic()
        run("kubectl", "-n", NS, "delete", "pod", f"{FULL}-clients-1", "--grace-period=0", "--force", "--wait=false")

        # the lost reply is a "timeout" at the round's deadline, or an "error" when Flower's SuperLink
        # sees the node's heartbeats stop first: which one comes first is the cluster's timing
        def round_that_lost_it() -> float | None:
            """The round in progress once the lost reply is counted (the site: the name the release
            registered its keys under); the failure is counted when that round's exchange ends."""
            m = server_metrics(port)
            lost = sum(
                m.get(("fedcifar_client_failures_total", (("partition", "1"), ("reason", r), ("site", RELEASE))), 0)
                for r in FAILURE_REASONS
            )
            return m[("fedcifar_round", ())] if lost >= 1 else None

        lost_in = wait_for("the lost reply of partition 1 to be counted", round_that_lost_it, ROUND_TIMEOUT + 60, 1)
        # that round aggregates, evaluates and checkpoints after the count: the crash comes after it,
        # or the resumed run would redo it with both pods
        wait_for(f"round {lost_in:.0f} to be checkpointed", lambda: completed() >= lost_in, ROUND_TIMEOUT + 60, 0.5)
        done_before_crash = completed()
    assert done_before_crash < ROUNDS, "the run ended before the SuperLink could be killed"

    # the SuperLink's processes die (a crash: the container restarts, its state volume stays)
    kill = (  # Flower's SuperLink: run by fedcifar superlink, with the Fleet guard, as fedcifar.flower.tuning
        "import os, signal\nfrom fedcifar.common.procfs import pids, process_kind\n"
        "for p in pids():\n"
        "    if process_kind(p) == 'flower-superlink':\n"
        "        os.kill(p, signal.SIGKILL)"
    )
    run("kubectl", "-n", NS, "exec", superlink_pod(kube), "-c", "superlink", "--", "python", "-c", kill)
    crashed_at = time.monotonic()

    def job_done():
        job = batch.read_namespaced_job(f"{FULL}-run-1", NS)
        return job if job.status.succeeded else None

    job = wait_for("the run Job to succeed after a retry", job_done, 900, 3)
    recovered = time.monotonic() - crashed_at
    assert job.status.failed >= 1  # the attempt that lost its SuperLink
    h = history(kube)
    rounds = h["rounds"]
    assert h["status"] == "completed" and [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert h["resumes"] and h["resumes"][0]["after_round"] >= done_before_crash  # nothing redone before it
    assert any(r["partitions"] == [0] and r["failures"] >= 1 for r in rounds)  # the round without the lost pod
    assert rounds[-1]["partitions"] == [0, 1]  # the restarted pod trained again
    new_pod_log = pod_logs(kube, NS, f"{FULL}-clients-1")
    assert "partition 1 of 2" in new_pod_log
    print(
        f"\nclient pod killed -> failure counted; SuperLink killed after {done_before_crash:.0f} rounds -> "
        f"run completed {recovered:.0f}s later ({job.status.failed} failed Job attempt), "
        f"{time.monotonic() - killed_at:.0f}s after the first fault"
    )
