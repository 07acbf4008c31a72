"""The chart's alerting rules (templates/_alerts.tpl): one source, rendered as a plain rule file (ConfigMap)
and as a PrometheusRule that hold the same groups; `promtool check rules` on them, `promtool test rules`
(tests/chart/alerts.test.yaml: each alert fires when it should, stays silent when it should not), and
conventions: severity, summary, a description naming the release, a runbook link to a README section,
series fedcifar exports, each rule with the release that runs what it is about."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .support import MONITORING_API, ROOT, SERVER_ARGS, SITE_ARGS, find, needs_helm, render
from .test_monitoring import KNOWN_METRICS

pytestmark = needs_helm
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus); .ci/run installs it"
)
TEST_VALUES = ("--set", "run.roundTimeout=30", "--set", "alerts.runStalled.marginSeconds=60")
README = (ROOT / "README.md").read_text()


def rule_file(docs: list[dict]) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "demo-fedcifar-alerts")["data"]["fedcifar-alerts.yaml"])


def alerts(groups: list[dict]) -> list[dict]:
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(*TEST_VALUES, "--api-versions", MONITORING_API)


def test_the_rule_file_and_the_prometheusrule_hold_the_same_groups(rendered):
    rule = find(rendered, "PrometheusRule")
    assert rule["apiVersion"] == MONITORING_API and rule["metadata"]["namespace"] == "fl"
    assert rule["spec"]["groups"] == rule_file(rendered)["groups"]
    assert "PrometheusRule" not in [d["kind"] for d in render(*TEST_VALUES)]  # no API, no PrometheusRule
    assert rule_file(render(*TEST_VALUES)) == rule_file(rendered)  # the ConfigMap either way
    labelled = render("--api-versions", MONITORING_API, "--set", "alerts.prometheusRule.additionalLabels.release=kps")
    assert find(labelled, "PrometheusRule")["metadata"]["labels"]["release"] == "kps"


def test_each_release_ships_the_rules_about_its_own_pods():
    names = {
        shape: [g["name"] for g in rule_file(render(*args))["groups"]]
        for shape, args in (("all-in-one", ()), ("server", SERVER_ARGS), ("site", SITE_ARGS))
    }
    assert names == {
        "all-in-one": ["fedcifar-superlink", "fedcifar-supernodes"],
        "server": ["fedcifar-superlink"],
        "site": ["fedcifar-supernodes"],
    }
    assert not any(
        d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-alerts")
        for d in render("--set", "alerts.enabled=false", "--api-versions", MONITORING_API)
    )


def test_every_alert_follows_the_conventions(rendered):
    anchors = {re.sub(r"[^a-z0-9]", "", heading.lower()) for heading in re.findall(r"^### (\w+)$", README, re.M)}
    for rule in alerts(rule_file(rendered)["groups"]):
        name, annotations = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "demo" in annotations["description"], name  # the release
        if "partition" in rule["expr"] and "by (namespace, release, site)" not in rule["expr"]:
            assert "$labels.partition" in annotations["description"], name  # the slot
        if "site" in rule["expr"]:
            assert "$labels.site" in annotations["description"], name
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url.endswith("README.md") and anchor == name.lower() and anchor in anchors, name
        for metric in re.findall(r"\b(fedcifar_[a-z_]+)", rule["expr"]):
            assert metric in KNOWN_METRICS, (name, metric)
        for selector in re.findall(r"fedcifar_[a-z_]+\{([^}]*)\}", rule["expr"]):
            assert selector.startswith('namespace="fl", release="demo"'), (name, selector)  # its own series only


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass(rendered, tmp_path):
    (tmp_path / "fedcifar-alerts.yaml").write_text(yaml.safe_dump(rule_file(rendered)))
    shutil.copy(Path(__file__).parent / "alerts.test.yaml", tmp_path)
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "fedcifar-alerts.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
