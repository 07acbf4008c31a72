"""The chart's alerting rules on a real cluster: the session's Prometheus loads the rule file a release
ships (its ConfigMap) and sends alerts to a real Alertmanager, whose webhook receiver keeps what it
gets (manifests/prometheus.yaml). A healthy run raises no alert; its ServerApp stopped (SIGSTOP)
mid-run raises FedcifarRunStalled at the receiver, with the release and the run's id; resumed
(SIGCONT), it completes rounds again. Short bounds for the test: round-timeout 15 s and a margin of 5 s (an
step's bound of 35 s), `for: 0m`.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import yaml
from conftest import ALERTS_NS, MON_NS, SHARED_K8S, recreate_namespace
from kube import CHART, helm, http_get, pods, port_forward, prom_query, run, small_release, wait_for

RELEASE = "alerts"
EXTRA_NAMESPACES = (ALERTS_NS,)
pytestmark = pytest.mark.e2e
SIGNAL_SERVERAPP = (  # in the SuperLink container: signal the run's ServerApp process
    "import os, signal, sys\nfrom fedcifar.common.procfs import pids, process_kind\n"
    "for p in pids():\n"
    "    if process_kind(p) == 'flwr-serverapp':\n"
    "        os.kill(p, getattr(signal, sys.argv[1]))"
)


@pytest.fixture(scope="module")
def alerting_release(kube, image, prometheus):
    recreate_namespace(kube, ALERTS_NS)
    args = small_release(
        image,
        {
            "run.rounds": 200,  # still running when its ServerApp is stopped
            "run.roundTimeout": 15,
            "alerts.runStalled.marginSeconds": 5,
            "alerts.runStalled.for": "0m",
        },
    )
    helm("install", RELEASE, str(CHART), "-n", ALERTS_NS, *args, "--wait", "--timeout", "5m")
    rules = run(
        "kubectl",
        "-n",
        ALERTS_NS,
        "get",
        "configmap",
        f"{RELEASE}-fedcifar-alerts",
        "-o",
        "jsonpath={.data.fedcifar-alerts\\.yaml}",
    ).stdout
    # the release's rule file, as it ships, into the Prometheus; then a reload
    run(
        "kubectl",
        "-n",
        MON_NS,
        "exec",
        "-i",
        "deploy/prometheus",
        "-c",
        "prometheus",
        "--",
        "sh",
        "-c",
        "cat > /rules/fedcifar-alerts.yaml",
        input=rules,
    )
    urllib.request.urlopen(urllib.request.Request(f"{prometheus}/-/reload", method="POST"), timeout=10).close()
    wait_for(
        "Prometheus to load the release's rules",
        lambda: "FedcifarRunStalled" in http_get(f"{prometheus}/api/v1/rules"),
        60,
        1,
    )
    yield RELEASE
    helm("uninstall", RELEASE, "-n", ALERTS_NS, check=False)
    kube.delete_namespace(ALERTS_NS)


def firing(prometheus: str) -> list[dict]:
    return prom_query(prometheus, f'ALERTS{{release="{RELEASE}", alertstate="firing"}}')


def notified(port: int) -> list[dict]:
    """Every alert the receiver got about this release, in order."""
    return [
        alert
        for notification in json.loads(http_get(f"http://127.0.0.1:{port}/"))
        for alert in notification["alerts"]
        if alert["labels"].get("release") == RELEASE
    ]


def signal_serverapp(pod: str, signal_name: str) -> None:
    run("kubectl", "-n", ALERTS_NS, "exec", pod, "-c", "superlink", "--", "python", "-c", SIGNAL_SERVERAPP, signal_name)


def superlink_pod(kube) -> str:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=superlink"
    return next(p.metadata.name for p in pods(kube, ALERTS_NS, selector) if p.metadata.deletion_timestamp is None)


def test_a_stalled_serverapp_raises_the_stall_alert_at_alertmanager_and_a_healthy_run_none(
    kube, alerting_release, prometheus
):
    selector = f'namespace="{ALERTS_NS}", release="{RELEASE}"'

    def rounds() -> float:
        found = prom_query(prometheus, f"fedcifar_rounds_completed_total{{{selector}}}")
        return float(found[0]["value"][1]) if found else 0

    def run_id() -> str | None:
        running = prom_query(prometheus, f'fedcifar_run_info{{{selector}, status="running"}}')
        return running[0]["metric"]["run_id"] if running else None

    wait_for("3 rounds of a healthy run", lambda: rounds() >= 3, 600, 2)
    running = run_id()
    assert running, "the run is not running"
    with port_forward(MON_NS, "deploy/alert-receiver", 8080) as receiver:
        assert firing(prometheus) == [] and notified(receiver) == []  # healthy: nothing

        pod = superlink_pod(kube)
        stopped_at = time.monotonic()
        signal_serverapp(pod, "SIGSTOP")
        try:
            alert = wait_for(
                "FedcifarRunStalled at the Alertmanager's webhook receiver",
                lambda: next((a for a in notified(receiver) if a["labels"]["alertname"] == "FedcifarRunStalled"), None),
                120,
                2,
            )
        finally:
            signal_serverapp(pod, "SIGCONT")
        others = {a["labels"]["alertname"] for a in notified(receiver)} - {"FedcifarRunStalled"}
        assert others == set(), others  # the frozen ServerApp's other figures stand still
    assert alert["status"] == "firing"
    labels = alert["labels"]
    assert (labels["release"], labels["namespace"], labels["run_id"], labels["severity"]) == (
        RELEASE,
        ALERTS_NS,
        running,
        "critical",
    )
    assert f"Run {running} of release {RELEASE}" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("README.md#fedcifarrunstalled")
    print(f"\nFedcifarRunStalled at the receiver {time.monotonic() - stopped_at:.0f} s after the SIGSTOP (bound 35 s)")
    stalled_at = rounds()
    wait_for("the resumed ServerApp to complete rounds again", lambda: rounds() > stalled_at, 120, 2)


def test_the_api_server_accepts_the_prometheusrule_servicemonitor_and_podmonitor(namespaces):
    """Validated against the Prometheus Operator's own CRDs (../shared/k8s/crds/), applied for this test
    alone: their presence changes what every release renders."""
    crds = str(SHARED_K8S / "crds")
    run("kubectl", "apply", "--server-side", "-f", crds)
    try:
        wait_for(
            "the monitoring.coreos.com/v1 API",
            lambda: "prometheusrules" in run("kubectl", "api-resources", "--api-group=monitoring.coreos.com").stdout,
            60,
            1,
        )
        rendered = helm(
            "template",
            RELEASE,
            str(CHART),
            "-n",
            MON_NS,
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.podMonitor.enabled=true",
        ).stdout
        monitoring = [d for d in yaml.safe_load_all(rendered) if d and d["apiVersion"] == "monitoring.coreos.com/v1"]
        assert sorted(d["kind"] for d in monitoring) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
        applied = run(
            "kubectl", "apply", "--dry-run=server", "-n", MON_NS, "-f", "-", input=yaml.safe_dump_all(monitoring)
        )
        assert applied.stdout.count("(server dry run)") == 3, applied.stdout
    finally:
        run("kubectl", "delete", "-f", crds, "--wait=true", check=False, timeout=120)
