"""The chart's lint, its default render, and the shapes of the clients, data and state volumes; every
rendered value set validated with kubernetes-validate for Kubernetes 1.28 and 1.33."""

from __future__ import annotations

import re

import pytest
import yaml

from .support import (
    ALLOWED_API_VERSIONS,
    CERT_MANAGER_API,
    CHART,
    FULLNAME,
    GPU_ARGS,
    MONITORING_API,
    MONITORING_ARGS,
    RELEASE,
    VALIDATE_VERSIONS,
    container,
    env_of,
    find,
    helm,
    kinds,
    mounts_of,
    needs_helm,
    pod_spec,
    render,
    run_config_of,
    workloads,
)

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# lint and the default render


def test_helm_lint() -> None:
    result = helm("lint", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    strict = helm("lint", "--strict", str(CHART), *GPU_ARGS)
    assert strict.returncode == 0, strict.stdout + strict.stderr


def test_default_objects(default_docs: list[dict]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    assert names == {
        ("ServiceAccount", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-env"),
        ("ConfigMap", f"{FULLNAME}-alerts"),
        ("ConfigMap", f"{FULLNAME}-dashboard-training"),
        ("ConfigMap", f"{FULLNAME}-dashboard-clients"),
        ("Service", f"{FULLNAME}-superlink"),
        ("Service", f"{FULLNAME}-superlink-metrics"),
        ("Service", f"{FULLNAME}-clients"),
        ("Deployment", f"{FULLNAME}-superlink"),
        ("StatefulSet", f"{FULLNAME}-clients"),
        ("Job", f"{FULLNAME}-run-1"),
        ("Pod", f"{FULLNAME}-test"),
        ("Secret", f"{FULLNAME}-superlink-tls"),
        ("Secret", f"{FULLNAME}-superlink-ca"),
        ("Secret", f"{FULLNAME}-supernode-keys"),
        ("Secret", f"{FULLNAME}-supernode-public-keys"),
        ("NetworkPolicy", f"{FULLNAME}-superlink"),
        ("NetworkPolicy", f"{FULLNAME}-clients"),
        ("NetworkPolicy", f"{FULLNAME}-run"),
        ("ConfigMap", f"{FULLNAME}-superlink-proxy"),
        ("ServiceAccount", f"{FULLNAME}-run"),
        ("Role", f"{FULLNAME}-run"),
        ("RoleBinding", f"{FULLNAME}-run"),
    }
    for doc in default_docs:
        assert doc["apiVersion"] in ALLOWED_API_VERSIONS, doc["apiVersion"]
        assert doc["metadata"]["namespace"] == "fl"
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "fedcifar"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "fedcifar-0.1.0"


def test_renders_for_kubernetes_1_20() -> None:
    docs = render("--kube-version", "1.20.2", *MONITORING_ARGS)
    assert {d["apiVersion"] for d in docs} <= ALLOWED_API_VERSIONS - {MONITORING_API, CERT_MANAGER_API}


def test_fullname_is_truncated_to_valid_names() -> None:
    long_release = "a" * 53
    result = helm("template", long_release, str(CHART))
    assert result.returncode == 0, result.stderr
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
            if doc["kind"] == "StatefulSet":
                assert len(doc["metadata"]["name"]) <= 52  # + "-<10 char hash>" in a label


def test_superlink(default_docs: list[dict]) -> None:
    deploy = find(default_docs, "Deployment", f"{FULLNAME}-superlink")
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    c = container(deploy, "superlink")
    assert c["command"] == ["fedcifar", "superlink"]
    args = c["args"]
    for flag, value in (
        ("--metrics-port", "9400"),
        ("--metrics-host", "0.0.0.0"),
        ("--metrics-dir", "/var/run/fedcifar/metrics"),
        ("--host", "127.0.0.1"),
        ("--port", "9093"),
        ("--fleet-max-reply-bytes", "16777216"),  # the Fleet guard's ceiling for other apps' runs
        ("--fleet-max-reply-objects", "1024"),
        ("--fleet-site-held-bytes", "268435456"),
    ):
        assert args[args.index(flag) + 1] == value  # Flower on the loopback: the proxy is its public face
    assert "--behind-proxy" in args  # so fedcifar superlink refuses any other --host
    assert "--insecure" not in args and "--disable-runtime-dependency-installation" in args  # TLS by default
    assert "--database" not in args
    assert c["workingDir"] == "/var/lib/fedcifar"
    mounts = mounts_of(deploy, c)
    assert "emptyDir" in mounts["/var/lib/fedcifar"][1]
    for probe in ("startupProbe", "livenessProbe"):  # Flower itself, on the loopback, not through the proxy
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and '"https://127.0.0.1:9093/health"' in command[2]
        assert 'cafile="/etc/fedcifar/tls/ca.crt"' in command[2]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9400}
    proxy = container(deploy, "proxy")
    assert proxy["command"] == ["nginx", "-e", "stderr", "-c", "/etc/fedcifar/proxy/nginx.conf", "-g", "daemon off;"]
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"http": 8000}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    proxy_mounts = mounts_of(deploy, proxy)
    assert proxy_mounts["/etc/fedcifar/proxy"][1]["configMap"]["name"] == f"{FULLNAME}-superlink-proxy"
    assert proxy_mounts["/tmp"][1]["name"] == "proxy-tmp" and proxy_mounts["/etc/fedcifar/tls"][0]["readOnly"]
    assert "FEDCIFAR_DATA" not in env_of(c)  # hub by default
    svc = find(default_docs, "Service", f"{FULLNAME}-superlink")
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000}  # the public face alone
    metrics = find(default_docs, "Service", f"{FULLNAME}-superlink-metrics")["spec"]
    assert metrics["type"] == "ClusterIP" and metrics["selector"] == svc["spec"]["selector"]
    assert {p["name"]: p["port"] for p in metrics["ports"]} == {"metrics": 9400}
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "superlink"


def test_writable_paths_and_flower_env(default_docs: list[dict]) -> None:
    env_cm = find(default_docs, "ConfigMap", f"{FULLNAME}-env")["data"]
    assert env_cm["FLWR_HOME"] == "/var/run/fedcifar/flwr"
    assert env_cm["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env_cm["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env_cm["HF_HOME"].startswith("/var/cache/fedcifar/")
    for doc in workloads(default_docs):
        if doc["kind"] == "Pod":
            continue
        c = container(doc)
        assert c["envFrom"] == [{"configMapRef": {"name": f"{FULLNAME}-env"}}]
        mounts = mounts_of(doc, c)
        # /var/run/fedcifar holds FLWR_HOME and the metrics dir (with the node-id note); /tmp the private folders.
        for path in ("/tmp", "/var/run/fedcifar", "/var/cache/fedcifar"):
            assert "emptyDir" in mounts[path][1], (doc["kind"], path)
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_config_checksum_follows_the_env_configmap(default_docs: list[dict]) -> None:
    changed = render("--set", "extraEnv.HF_HUB_OFFLINE=1")
    assert find(changed, "ConfigMap", f"{FULLNAME}-env")["data"]["HF_HUB_OFFLINE"] == "1"
    for kind in ("Deployment", "StatefulSet", "Job"):
        before = find(default_docs, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        after = find(changed, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert before != after, kind


# ---------------------------------------------------------------------------------------------
# clients: partition mapping


def test_partition_mapping(default_docs: list[dict], run_docs: list[dict]) -> None:
    for docs, replicas in ((default_docs, 2), (run_docs, 4)):
        sts = find(docs, "StatefulSet", f"{FULLNAME}-clients")
        assert sts["spec"]["replicas"] == replicas
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["serviceName"] == f"{FULLNAME}-clients"
        c = container(sts, "supernode")
        assert c["command"] == ["fedcifar", "supernode"]
        args = c["args"]
        assert args[args.index("--partition-id") + 1] == "auto"
        assert args[args.index("--num-partitions") + 1] == str(replicas)
        assert args[args.index("--superlink") + 1] == f"{FULLNAME}-superlink:8000"
        assert args[args.index("--port") + 1] == "9094"
        assert args[args.index("--metrics-port") + 1] == "9400"
        assert args[args.index("--metrics-dir") + 1] == "/var/run/fedcifar/metrics"
        assert "--insecure" not in args and "--root-certificates" in args  # TLS by default
        assert env_of(c)["POD_INDEX"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert run_config_of(docs)["min-nodes"] == str(replicas)
    headless = find(default_docs, "Service", f"{FULLNAME}-clients")
    assert headless["spec"]["clusterIP"] == "None"
    sts = find(default_docs, "StatefulSet")
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------------------------------------
# data


def test_data_pvc(pvc_data_docs: list[dict]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        doc = find(pvc_data_docs, kind)
        c = container(doc)
        mount, volume = mounts_of(doc, c)["/data/cifar"]
        assert mount["readOnly"] is True and mount["subPath"] == "cifar10"
        assert volume["persistentVolumeClaim"] == {"claimName": "cifar10-parquet", "readOnly": True}
        assert env_of(c)["FEDCIFAR_DATA"] == "/data/cifar"
    args = container(find(pvc_data_docs, "StatefulSet"))["args"]
    assert args[args.index("--data") + 1] == "/data/cifar"
    assert "data" not in {v["name"] for v in pod_spec(find(pvc_data_docs, "Job"))["volumes"]}


def test_data_hostpath(hostpath_data_docs: list[dict]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        doc = find(hostpath_data_docs, kind)
        c = container(doc)
        mount, volume = mounts_of(doc, c)["/data/cifar10"]
        assert mount["readOnly"] is True and "subPath" not in mount
        assert volume["hostPath"] == {"path": "/srv/cifar10", "type": "Directory"}
        assert env_of(c)["FEDCIFAR_DATA"] == "/data/cifar10"
    args = container(find(hostpath_data_docs, "StatefulSet"))["args"]
    assert args[args.index("--data") + 1] == "/data/cifar10"


def test_data_hub_by_default(default_docs: list[dict]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        doc = find(default_docs, kind)
        assert "--data" not in container(doc)["args"]
        assert "data" not in {v["name"] for v in pod_spec(doc)["volumes"]}


# ---------------------------------------------------------------------------------------------
# persistence


def test_persistence_created_pvc(persistence_docs: list[dict]) -> None:
    deploy = find(persistence_docs, "Deployment")
    c = container(deploy)
    assert c["args"][c["args"].index("--database") + 1] == "/var/lib/fedcifar/state.db"
    _, volume = mounts_of(deploy, c)["/var/lib/fedcifar"]
    assert volume["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-superlink"}
    pvc = find(persistence_docs, "PersistentVolumeClaim", f"{FULLNAME}-superlink")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["storageClassName"] == "standard"


def test_persistence_existing_claim() -> None:
    docs = render("--set", "superlink.persistence.enabled=true", "--set", "superlink.persistence.existingClaim=state")
    assert "PersistentVolumeClaim" not in kinds(docs)
    deploy = find(docs, "Deployment")
    c = container(deploy)
    assert "--database" in c["args"]
    assert mounts_of(deploy, c)["/var/lib/fedcifar"][1]["persistentVolumeClaim"] == {"claimName": "state"}


# ---------------------------------------------------------------------------------------------
# kubernetes-validate


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


RENDERED_VALUE_SETS = (
    "default_docs",
    "gpu_docs",
    "monitoring_docs",
    "pvc_data_docs",
    "hostpath_data_docs",
    "persistence_docs",
    "mlflow_server_docs",
    "run_docs",
    "insecure_docs",
    "cert_manager_docs",
    "existing_secrets_docs",
    "server_docs",
    "site_docs",
)


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
def test_manifests_validate_strict(kubernetes_validate, version: str, request) -> None:
    checked = 0
    for docs in map(request.getfixturevalue, RENDERED_VALUE_SETS):
        for doc in docs:
            if doc["apiVersion"] in (MONITORING_API, CERT_MANAGER_API):
                # kubernetes-validate knows only built-in kinds, not the Prometheus Operator's or
                # cert-manager's CRDs; those are checked field by field in test_monitors_present_with_api
                # and test_cert_manager_certificate.
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {version}: {err}")
            checked += 1
    assert checked > 50


def test_polling_values_reach_the_supernodes_and_the_superlinks_guard(default_docs: list[dict]) -> None:
    def polling(docs: list[dict]) -> tuple[dict, str]:
        node = env_of(container(find(docs, "StatefulSet"), "supernode"))
        link = env_of(container(find(docs, "Deployment", f"{FULLNAME}-superlink"), "superlink"))
        keys = ("FEDCIFAR_POLL_INTERVAL", "FEDCIFAR_IDLE_POLL_INTERVAL", "FEDCIFAR_POLL_HOLD")
        return {key: node[key] for key in keys}, link["FEDCIFAR_POLL_INTERVAL"]

    # fast while busy, Flower's 3 s when idle; the guard budgets a node's requests by the fast interval
    assert polling(default_docs) == (
        {"FEDCIFAR_POLL_INTERVAL": "0.25", "FEDCIFAR_IDLE_POLL_INTERVAL": "3", "FEDCIFAR_POLL_HOLD": "10"},
        "0.25",
    )
    changed = render("--set-json", 'clients.polling={"busySeconds": 0.5, "idleSeconds": 10, "holdSeconds": 10}')
    assert polling(changed) == (
        {"FEDCIFAR_POLL_INTERVAL": "0.5", "FEDCIFAR_IDLE_POLL_INTERVAL": "10", "FEDCIFAR_POLL_HOLD": "10"},
        "0.5",
    )


def test_the_proxy_holds_the_connections_of_thousands_of_supernodes(default_docs: list[dict]) -> None:
    def conf(docs: list[dict]) -> str:
        return find(docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]

    assert "worker_connections 4096;" in conf(default_docs)  # nginx's 1,024: fewer than 1,000 SuperNodes keep open
    assert "worker_rlimit_nofile 8192;" in conf(default_docs)
    changed = conf(render("--set", "superlink.proxy.maxConnections=20000"))
    assert "worker_connections 20000;" in changed and "worker_rlimit_nofile 40000;" in changed
