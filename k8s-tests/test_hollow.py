"""Hundreds of hollow SuperNodes, in a few pods, against a server release's SuperLink through its Service.

A server release (SuperLink with TLS, SuperNode authentication, the Fleet guard and its nginx; no
clients) holds ``PODS x NODES_PER_POD`` node slots. Each slot's key pair is made as the README's
"Hollow nodes on the cluster" makes it (``openssl``): the public halves go into the server's sites'
Secret, which the SuperLink's registrar registers as ``hollow/slot-<k>``; the private halves into a
Secret of their own, mounted by pods running ``fedcifar hollow --keys`` (no Control API needed: a
release serves it on its pod's loopback only). Once every node is active: an idle window (the
SuperLink's and the proxy's CPU from their cgroups, Fleet requests a second, the nodes' poll latency),
then one round with every node (``helm upgrade --set run.enabled=true``): every reply aggregated, none
rejected; its wall time and the SuperLink container's memory. The figures print as one JSON line.

``FEDCIFAR_E2E_HOLLOW_PODS`` and ``FEDCIFAR_E2E_HOLLOW_NODES_PER_POD`` size it (CI: 2 x 100).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import recreate_namespace
from kube import CHART, helm, http_get, pod_logs, pods, port_forward, run, run_history, small_release, wait_for

NS, RELEASE = "fedcifar-e2e-hollow", "scale"
EXTRA_NAMESPACES = (NS,)
FULL = f"{RELEASE}-fedcifar"
SUPERLINK = f"{FULL}-superlink"
PODS = int(os.environ.get("FEDCIFAR_E2E_HOLLOW_PODS", "2"))
NODES_PER_POD = int(os.environ.get("FEDCIFAR_E2E_HOLLOW_NODES_PER_POD", "100"))
SLOTS = PODS * NODES_PER_POD
SITE = "hollow"
IDLE_SECONDS = 30
SETTLE_SECONDS = 15  # nodes start busy: the chart's 10 s hold at 0.25 s, then doubling to 3 s
SAMPLE_SIZES = ("--train-size", "500", "--test-size", "200")  # the release's data: tests/data/cifar10-mini
pytestmark = pytest.mark.e2e
# the container's CPU seconds and its memory peak (cgroup v1, as this cluster's Docker mounts it)
CGROUP = "cat /sys/fs/cgroup/cpuacct/cpuacct.usage /sys/fs/cgroup/memory/memory.max_usage_in_bytes"
SIGUSR1 = "import os, signal; os.kill(1, signal.SIGUSR1)"  # fedcifar hollow (PID 1): a window of its figures


def make_keys(folder: Path) -> tuple[Path, Path]:
    """One key pair per slot, as the README makes them."""
    private, public = folder / "private", folder / "public"
    private.mkdir()
    public.mkdir()
    script = f"""
    for k in $(seq 0 {SLOTS - 1}); do
      openssl ecparam -name prime256v1 -genkey -noout -out "{private}/{SITE}.slot-$k.key"
      openssl ec -in "{private}/{SITE}.slot-$k.key" -pubout -out "{public}/{SITE}.slot-$k.pub" 2>/dev/null
    done
    """
    subprocess.run(["bash", "-euc", script], check=True, timeout=300)
    return private, public


def create_secret(name: str, folder: Path) -> None:
    run("kubectl", "-n", NS, "create", "secret", "generic", name, f"--from-file={folder}")


def hollow_pod(index: int, image: tuple[str, str]) -> dict:
    """Pod ``index``: ``NODES_PER_POD`` hollow nodes from slot ``index x NODES_PER_POD``."""
    args = ["hollow", "--superlink", f"{SUPERLINK}:8000", "--root-certificates", "/etc/fedcifar/tls/ca.crt"]
    args += ["--keys", "/etc/fedcifar/hollow-keys", "--site", SITE, "--slots", str(SLOTS), *SAMPLE_SIZES, "--json"]
    args += ["--nodes", str(NODES_PER_POD), "--first-slot", str(index * NODES_PER_POD), "--start-rate", "25"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"hollow-{index}", "namespace": NS, "labels": {"app": "fedcifar-hollow"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001, "runAsNonRoot": True},
            "containers": [
                {
                    "name": "hollow",
                    "image": f"{image[0]}:{image[1]}",
                    "imagePullPolicy": "Never",
                    "command": ["fedcifar", *args],
                    "env": [{"name": "FLWR_TELEMETRY_ENABLED", "value": "0"}],
                    "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
                    "volumeMounts": [
                        {"name": "keys", "mountPath": "/etc/fedcifar/hollow-keys", "readOnly": True},
                        {"name": "ca", "mountPath": "/etc/fedcifar/tls", "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "keys", "secret": {"secretName": "hollow-keys", "defaultMode": 0o440}},
                {
                    "name": "ca",
                    "secret": {"secretName": f"{SUPERLINK}-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
                },
            ],
        },
    }


def events(kube, pod: str, kind: str) -> list[dict]:
    """``fedcifar hollow --json``'s lines of one kind in a pod's log."""
    lines = [json.loads(line) for line in pod_logs(kube, NS, pod).splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == kind]


def cgroup(container: str) -> tuple[int, int]:
    """The container's CPU nanoseconds and memory peak (bytes) in the SuperLink pod."""
    out = run("kubectl", "-n", NS, "exec", f"deploy/{SUPERLINK}", "-c", container, "--", "sh", "-c", CGROUP).stdout
    cpu, memory = (int(v) for v in out.split())
    return cpu, memory


def fleet_requests(port: int) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in http_get(f"http://127.0.0.1:{port}/metrics").splitlines()
        if line.startswith("fedcifar_fleet_requests_total{")
    )


@pytest.fixture(scope="module")
def server(kube, image):
    recreate_namespace(kube, NS)
    work = Path(tempfile.mkdtemp(prefix="fedcifar-e2e-hollow-"))
    try:
        private, public = make_keys(work)
        create_secret(f"{FULL}-site-keys", public)  # the sites' Secret, registered by the SuperLink
        create_secret("hollow-keys", private)
        values = {
            "clients.enabled": "false",
            "run.enabled": "false",
            "run.numPartitions": SLOTS,
            "run.rounds": 1,
            "networkPolicy.extraApiFrom[0].podSelector.matchLabels.app": "fedcifar-hollow",
        }
        helm("install", RELEASE, str(CHART), "-n", NS, *small_release(image, values), "--wait", "--timeout", "5m")
        yield
    finally:
        helm("uninstall", RELEASE, "-n", NS, check=False)
        kube.delete_namespace(NS)
        shutil.rmtree(work, ignore_errors=True)


def test_hundreds_of_hollow_nodes_in_pods_train_one_round_through_the_service(kube, image, server, batch):
    superlink = pods(kube, NS, "app.kubernetes.io/component=superlink")[0].metadata.name
    wait_for(
        f"the registrar to register {SLOTS} keys",
        lambda: pod_logs(kube, NS, superlink, container="superlink").count(": registered") >= SLOTS,
        600,
        2,
    )
    started = time.monotonic()
    run(
        "kubectl",
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [hollow_pod(i, image) for i in range(PODS)]}),
    )
    pod_names = [f"hollow-{i}" for i in range(PODS)]
    wait_for("every hollow node active", lambda: all(events(kube, pod, "active") for pod in pod_names), 600, 2)
    figures: dict = {"pods": PODS, "nodes": SLOTS, "active_seconds": round(time.monotonic() - started, 1)}

    time.sleep(SETTLE_SECONDS)
    with port_forward(NS, f"deploy/{SUPERLINK}", 9400) as port:
        for pod in pod_names:  # the polls' window starts here
            run("kubectl", "-n", NS, "exec", pod, "--", "python", "-c", SIGUSR1)
        before = {c: cgroup(c) for c in ("superlink", "proxy")}, fleet_requests(port), time.monotonic()
        time.sleep(IDLE_SECONDS)
        after = {c: cgroup(c) for c in ("superlink", "proxy")}, fleet_requests(port), time.monotonic()
        for pod in pod_names:
            run("kubectl", "-n", NS, "exec", pod, "--", "python", "-c", SIGUSR1)
    seconds = after[2] - before[2]
    windows = [
        wait_for(f"{pod}'s idle window", lambda pod=pod: events(kube, pod, "window")[1:], 30) for pod in pod_names
    ]
    figures["idle"] = {
        "superlink_cores": round((after[0]["superlink"][0] - before[0]["superlink"][0]) / 1e9 / seconds, 3),
        "proxy_cores": round((after[0]["proxy"][0] - before[0]["proxy"][0]) / 1e9 / seconds, 3),
        "fleet_requests_per_second": round((after[1] - before[1]) / seconds, 1),
        "poll_p50_seconds": max(w[-1]["poll_p50_seconds"] for w in windows),
        "poll_p99_seconds": max(w[-1]["poll_p99_seconds"] for w in windows),
    }

    helm("upgrade", RELEASE, str(CHART), "-n", NS, "--reuse-values", "--set", "run.enabled=true", "--wait")
    wait_for("the run Job to succeed", lambda: batch.read_namespaced_job(f"{FULL}-run-2", NS).status.succeeded, 900, 3)
    history = run_history(NS, f"deploy/{SUPERLINK}", 2)
    (round_1,) = history["rounds"]
    assert round_1["participating_clients"] == SLOTS, round_1
    assert not round_1["failures"] and not round_1["rejected_updates"] and round_1["attempts"] == 1, round_1
    for pod in pod_names:
        run("kubectl", "-n", NS, "exec", pod, "--", "python", "-c", SIGUSR1)
    answered = [
        wait_for(f"{pod}'s round window", lambda pod=pod: events(kube, pod, "window")[2:], 30)[-1] for pod in pod_names
    ]
    assert sum(w["answered"].get("train", 0) for w in answered) == SLOTS, answered
    assert not any(w["failures"] for w in answered), answered
    figures["round"] = {
        "seconds": round(round_1["round_seconds"], 1),
        "superlink_memory_peak_mib": round(cgroup("superlink")[1] / 2**20),
        "proxy_memory_peak_mib": round(cgroup("proxy")[1] / 2**20),
    }
    print(f"\nhollow nodes on the cluster: {json.dumps(figures)}")
