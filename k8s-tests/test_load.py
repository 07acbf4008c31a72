"""Load on a real cluster: 16 client pods train 10 rounds; no round may fail, no client may grow.

Each client pod's memory is the resident memory of its long-lived processes (``procfs.tree_rss``:
the node wrapper, Flower's SuperNode and SuperExec, the fork server, the trainer; not the
per-message ClientApp processes, whose presence at sampling time is chance), read once the run has
passed round 5 and again at the end: growth must stay within 10%.
"""

from __future__ import annotations

import time

import pytest
from conftest import recreate_namespace
from kube import CHART, ROOT, helm, http_get, pods, port_forward, run, run_history, wait_for

NS, RELEASE = "fedcifar-e2e-load", "load"
EXTRA_NAMESPACES = (NS,)
FULL = f"{RELEASE}-fedcifar"
CLIENTS, ROUNDS, BASELINE_ROUND, MAX_GROWTH = 16, 10, 5, 0.10
DATA = ROOT / "tests" / "data" / "cifar10-mini"
pytestmark = pytest.mark.e2e
# the pod's process tree under PID 1 (`fedcifar supernode`), measured as `fedcifar soak` measures nodes
POD_RSS = "from fedcifar.common.procfs import tree_rss; print(tree_rss(1))"


def client_memory() -> dict[str, int]:
    names = run(
        "kubectl",
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=clients",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ).stdout.split()
    return {name: int(run("kubectl", "-n", NS, "exec", name, "--", "python", "-c", POD_RSS).stdout) for name in names}


@pytest.fixture(scope="module")
def load_release(kube, image):
    recreate_namespace(kube, NS)
    repo, tag = image
    sets = {
        "image.repository": repo,
        "image.tag": tag,
        "clients.replicas": CLIENTS,
        "run.rounds": ROUNDS,
        "data.source": "volume",
        "data.volume.hostPath": str(DATA),
        "superlink.resources.requests.cpu": "100m",
        "clients.resources.requests.cpu": "50m",
        "clients.resources.requests.memory": "400Mi",
        "run.resources.requests.cpu": "10m",
        "run.waitTimeoutSeconds": 900,
    }
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    started = time.monotonic()
    helm("install", RELEASE, str(CHART), "-n", NS, *args, "--wait", "--timeout", "10m", timeout=900)
    yield time.monotonic() - started
    helm("uninstall", RELEASE, "-n", NS, check=False)
    kube.delete_namespace(NS)


def test_16_clients_10_rounds_no_failed_round_no_memory_growth(kube, load_release):
    from kubernetes import client

    batch = client.BatchV1Api()
    with port_forward(NS, f"deploy/{FULL}-superlink", 9400) as port:

        def rounds_completed() -> float:
            for line in http_get(f"http://127.0.0.1:{port}/metrics").splitlines():
                if line.startswith("fedcifar_rounds_completed_total "):
                    return float(line.split()[1])
            return 0.0

        wait_for(f"round {BASELINE_ROUND} to complete", lambda: rounds_completed() >= BASELINE_ROUND, 1200, 1)
        baseline_round = rounds_completed()
        baseline = client_memory()
    wait_for("the run Job to succeed", lambda: batch.read_namespaced_job(f"{FULL}-run-1", NS).status.succeeded, 1200, 3)
    final = client_memory()

    superlink = [p.metadata.name for p in pods(kube, NS, "app.kubernetes.io/component=superlink")][0]
    history = run_history(NS, superlink, 1)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    failed = [
        r["round"]
        for r in rounds
        if r["participating_clients"] != CLIENTS or r["failures"] or r["rejected_updates"] or r["attempts"] != 1
    ]
    assert not failed, f"rounds without all {CLIENTS} clients at the first attempt: {failed}"
    growth = {name: final[name] / baseline[name] - 1 for name in baseline}
    assert len(growth) == CLIENTS and max(growth.values()) <= MAX_GROWTH, growth
    seconds = [r["round_seconds"] for r in rounds]
    print(
        f"\nload: {CLIENTS} client pods up in {load_release:.0f}s; {ROUNDS} rounds, 0 failed; round "
        f"{min(seconds):.1f}-{max(seconds):.1f}s (mean {sum(seconds) / len(seconds):.1f}s); client memory "
        f"after round {baseline_round:.0f} "
        f"{min(baseline.values()) / 2**20:.0f}-{max(baseline.values()) / 2**20:.0f} MiB, "
        f"at the end {min(final.values()) / 2**20:.0f}-{max(final.values()) / 2**20:.0f} MiB, "
        f"largest growth {100 * max(growth.values()):+.1f}%"
    )
