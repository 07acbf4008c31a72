"""Prometheus scrape annotations, ServiceMonitor and PodMonitor, Grafana dashboards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fedcifar.metrics import ClientMetrics, ServerMetrics, SuperLinkMetrics
from fedcifar.superlink.run_state import RUN_STATE_SERIES

from .support import CHART, FULLNAME, MONITORING_API, container, find, kinds, needs_helm, render

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# monitoring


def test_scrape_annotations(default_docs: list[dict]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        doc = find(default_docs, kind)
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9400"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert {p["name"]: p["containerPort"] for p in container(doc)["ports"]}["metrics"] == 9400
    off = render("--set", "metrics.scrapeAnnotations=false")
    for kind in ("Deployment", "StatefulSet"):
        assert "prometheus.io/scrape" not in find(off, kind)["spec"]["template"]["metadata"]["annotations"]


def test_monitors_absent_without_api(default_docs: list[dict], monitoring_without_api_docs: list[dict]) -> None:
    for docs in (default_docs, monitoring_without_api_docs):
        assert "ServiceMonitor" not in kinds(docs) and "PodMonitor" not in kinds(docs)
    # enabled but the API is there: nothing unless enabled
    docs = render("--api-versions", MONITORING_API)
    assert "ServiceMonitor" not in kinds(docs) and "PodMonitor" not in kinds(docs)


def test_monitors_present_with_api(monitoring_docs: list[dict]) -> None:
    sm = find(monitoring_docs, "ServiceMonitor", f"{FULLNAME}-superlink")
    assert sm["apiVersion"] == MONITORING_API
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = find(monitoring_docs, "Service", f"{FULLNAME}-superlink")
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["fl"]}
    pm = find(monitoring_docs, "PodMonitor", f"{FULLNAME}-clients")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sts = find(monitoring_docs, "StatefulSet")
    assert pm["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    release_label = {
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
        "targetLabel": "release",
    }
    assert pm["spec"]["podMetricsEndpoints"][0] == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "relabelings": [release_label],  # what the alerting rules select a release by
    }
    assert sm["spec"]["endpoints"][0]["relabelings"][0] == release_label


# ---------------------------------------------------------------------------------------------
# dashboards

DASHBOARD_FILES = sorted((CHART / "dashboards").glob("*.json"))
# Labels a Prometheus with the standard kubernetes pod relabeling adds, plus the series' own labels.
ALLOWED_LABELS = {
    "namespace",
    "pod",
    "site",
    "partition",
    "num_partitions",
    "device",
    "kind",
    "le",
    "reason",
    "handler",
    "phase",
    "status",
    "sub_status",
}
# series that carry the site (client metrics; the server's per-node failures, refused updates, Fleet requests)
SITE_SERIES = (
    "fedcifar_client_",
    "fedcifar_rejected_updates",
    "fedcifar_fleet_refused",
    "fedcifar_fleet_requests",
    "fedcifar_fleet_quiet_polls",
)


def exported_series() -> set[str]:
    """Every series name fedcifar exports, read from its own metric definitions."""
    registry = CollectorRegistry()
    ServerMetrics(registry), SuperLinkMetrics(registry), ClientMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    return exported | set(RUN_STATE_SERIES)  # asked of the SuperLink at each scrape (superlink/run_state.py)


KNOWN_METRICS = exported_series()


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_configmaps(default_docs: list[dict]) -> None:
    assert len(DASHBOARD_FILES) >= 2
    maps = [d for d in default_docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert len(maps) == len(DASHBOARD_FILES)  # one ConfigMap per dashboard
    uids = set()
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert key.endswith(".json")
        dashboard = json.loads(text)
        source = json.loads((CHART / "dashboards" / f"{cm['metadata']['name'].rsplit('-', 1)[-1]}.json").read_text())
        assert dashboard == source
        uids.add(dashboard["uid"])
    assert len(uids) == len(maps)
    custom = render(
        "--set",
        "dashboards.label=my_dashboards",
        "--set-string",
        "dashboards.labelValue=yes",
        "--set",
        "dashboards.namespace=monitoring",
    )
    for cm in (d for d in custom if "-dashboard-" in d["metadata"]["name"]):
        assert cm["metadata"]["labels"]["my_dashboards"] == "yes"
        assert cm["metadata"]["namespace"] == "monitoring"
    assert not [d for d in render("--set", "dashboards.enabled=false") if "-dashboard-" in d["metadata"]["name"]]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_json(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    assert re.fullmatch(r"fedcifar-[a-z-]+", dashboard["uid"]) and len(dashboard["uid"]) <= 40
    assert dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ns = variables["namespace"]
    assert ns["type"] == "query" and "label_values(" in json.dumps(ns["query"]) and "namespace" in ns["definition"]
    site = variables["site"]  # one Grafana shows the whole federation, site by site
    assert site["multi"] and site["includeAll"] and site["definition"].endswith(", site)")
    exprs = []
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            exprs.append((panel["title"], target["expr"]))
    assert exprs
    titles = " ".join(p["title"].lower() for p in all_panels(dashboard))
    for title, expr in exprs:
        selectors = re.findall(r"(fedcifar_[a-z_]+)(\{[^}]*\})?", expr)
        assert selectors, (title, expr)
        for metric, selector in selectors:
            assert metric in KNOWN_METRICS, (title, metric)
            expected = (
                '{namespace=~"$namespace", site=~"$site"}'
                if metric.startswith(SITE_SERIES)
                else '{namespace=~"$namespace"}'
            )
            assert selector == expected, (title, expr)  # every series filtered
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= ALLOWED_LABELS, (title, labels)
        assert "$__rate_interval" in expr or "rate(" not in expr, (title, expr)
        assert "$__range" not in expr and "$__interval" not in expr.replace("$__rate_interval", "")
    if path.stem == "training":
        joined = "\n".join(e for _, e in exprs)
        assert "fedcifar_train_loss" in joined and "fedcifar_client_train_loss" in joined
        assert "fedcifar_eval_accuracy" in joined and "fedcifar_eval_loss" in joined
        assert "histogram_quantile(0.5, sum by (namespace, le) (fedcifar_round_duration_seconds_bucket" in joined
        assert "histogram_quantile(0.95, sum by (namespace, le) (fedcifar_round_duration_seconds_bucket" in joined
        assert "fedcifar_rounds_completed_total" in joined
        assert "sum by (namespace, phase) (fedcifar_round_phase_seconds_sum" in joined  # where the time goes
        assert "fedcifar_connected_clients" in joined and "fedcifar_participating_clients" in joined
        assert "rate(fedcifar_client_examples_trained_total" in joined
        assert "throughput" in titles
    bysite = [e for _, e in exprs if re.search(r"\bby \(site(, reason)?\)", e)]
    assert bysite, "no per-site panel"
