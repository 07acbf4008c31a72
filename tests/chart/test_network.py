"""What reaches the SuperLink: the nginx proxy's config, the Services and the NetworkPolicies."""

from __future__ import annotations

import re

from .support import FULLNAME, RELEASE, find, needs_helm, pod_spec, render

pytestmark = needs_helm


def test_the_public_face_passes_only_the_fleet_api(default_docs: list[dict]) -> None:
    """What nginx is told (tests/test_proxy.py runs this config in front of a real SuperLink)."""
    conf = find(default_docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    public, outputs = conf.split("listen 127.0.0.1:9095;")  # the second server: the run outputs (loopback)
    assert re.findall(r"location (.+?) \{", public) == ["/v1/fleet/", "= /health", "= /v1/fleet", "/"]
    assert re.findall(r"location (.+?) \{", outputs)[0::2] == ["= /runs/", "/"]  # + the four files' regex
    assert "proxy_pass" not in outputs and "disable_symlinks on;" in outputs
    assert conf.count("proxy_pass https://flower;") == 2 and conf.count("return 403") == 2
    # another method on the Fleet API (POST) or /health (GET, HEAD): 405 from nginx itself
    assert "if ($request_method != POST)" in conf and "if ($request_method !~ ^(GET|HEAD)$)" in conf
    assert conf.count("return 405") == 2
    assert "listen 8000 ssl;" in conf and "server 127.0.0.1:9093;" in conf
    assert "client_max_body_size 6m;" in conf and "proxy_ssl_verify on;" in conf
    assert "$http_" not in conf  # no request header (flwr-signature, flwr-timestamp) reaches the log
    other = render("--set", "superlink.proxy.maxBodySize=2m")
    assert "client_max_body_size 2m;" in find(other, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    checksum = "checksum/proxy"  # the pod rolls when the proxy config changes
    assert (
        find(default_docs, "Deployment")["spec"]["template"]["metadata"]["annotations"][checksum]
        != find(other, "Deployment")["spec"]["template"]["metadata"]["annotations"][checksum]
    )


def test_node_port_for_supernodes_outside_the_cluster() -> None:
    svc = find(
        render("--set", "superlink.service.type=NodePort", "--set", "superlink.service.nodePort=30800"),
        "Service",
        f"{FULLNAME}-superlink",
    )
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc["spec"]["type"] == "NodePort" and ports["http"]["nodePort"] == 30800
    assert ports["http"]["targetPort"] == "http"  # the proxy container: Fleet API and /health only
    assert set(ports) == {"http"}  # metrics stay on their own ClusterIP Service


def test_network_policies(default_docs: list[dict], existing_secrets_docs: list[dict]) -> None:
    release = {"app.kubernetes.io/name": "fedcifar", "app.kubernetes.io/instance": RELEASE}
    own = {
        "podSelector": {
            "matchLabels": release,
            "matchExpressions": [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": ["clients", "run", "test"]}
            ],
        }
    }
    run_and_test = {
        "podSelector": {
            "matchLabels": release,
            "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["run", "test"]}],
        }
    }
    superlink = find(default_docs, "NetworkPolicy", f"{FULLNAME}-superlink")["spec"]
    deploy = find(default_docs, "Deployment", f"{FULLNAME}-superlink")
    assert superlink["podSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert superlink["policyTypes"] == ["Ingress"]  # egress open: the Hub download
    assert superlink["ingress"] == [
        {"from": [own], "ports": [{"port": 8000, "protocol": "TCP"}]},  # the public face: Fleet API and /health
        {"ports": [{"port": 9400, "protocol": "TCP"}]},  # metrics: from anywhere by default
    ]
    clients = find(default_docs, "NetworkPolicy", f"{FULLNAME}-clients")["spec"]
    sts = find(default_docs, "StatefulSet")
    assert clients["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert clients["ingress"] == [{"ports": [{"port": 9400, "protocol": "TCP"}]}]  # the runtime API: nobody
    run = find(default_docs, "NetworkPolicy", f"{FULLNAME}-run")["spec"]
    assert run["podSelector"] == run_and_test["podSelector"] and "ingress" not in run
    for doc in (find(default_docs, "Job"), find(default_docs, "Pod", f"{FULLNAME}-test")):
        labels = pod_spec(doc) and (
            doc["spec"]["template"]["metadata"]["labels"] if doc["kind"] == "Job" else doc["metadata"]["labels"]
        )
        assert labels["app.kubernetes.io/component"] in ("run", "test")
    # peers from values
    monitoring = {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}
    admins = {"namespaceSelector": {"matchLabels": {"team": "flower-admins"}}}
    superlink = find(existing_secrets_docs, "NetworkPolicy", f"{FULLNAME}-superlink")["spec"]
    assert superlink["ingress"][0]["from"] == [own, admins]
    assert superlink["ingress"][1]["from"] == [monitoring]
    clients = find(existing_secrets_docs, "NetworkPolicy", f"{FULLNAME}-clients")["spec"]
    assert clients["ingress"][0]["from"] == [monitoring, run_and_test]  # the run Job checks the clients' metrics
    assert not [d for d in render("--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]
