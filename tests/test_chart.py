"""Tests for the Helm chart in charts/fedcifar and for skaffold.yaml.

Offline and fast: `helm lint` and `helm template` (no cluster), the rendered manifests parsed
with PyYAML and validated with kubernetes-validate for Kubernetes 1.28 and 1.33.

    PATH=/var/cache/local-k8s/bin:$PATH pytest -q tests/test_chart.py

The whole module is skipped when helm is neither on PATH nor at /var/cache/local-k8s/bin/helm.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from fedcifar.metrics import ClientMetrics, ServerMetrics, SuperLinkMetrics

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedcifar"
SKAFFOLD = ROOT / "skaffold.yaml"
LOCAL_HELM = Path("/var/cache/local-k8s/bin/helm")
RELEASE = "demo"
FULLNAME = "demo-fedcifar"
MONITORING_API = "monitoring.coreos.com/v1"
CERT_MANAGER_API = "cert-manager.io/v1"
# The only API groups the chart may use: all served by Kubernetes 1.20 and by 1.28-1.33 (the CRDs
# of the Prometheus Operator and cert-manager only where the cluster has them).
ALLOWED_API_VERSIONS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "networking.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
    MONITORING_API,
    CERT_MANAGER_API,
}
VALIDATE_VERSIONS = ("1.28.0", "1.33.0")


def find_helm() -> str | None:
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    return str(LOCAL_HELM) if LOCAL_HELM.is_file() else None


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason=f"helm is not installed (neither on PATH nor at {LOCAL_HELM}): chart tests need it"
)


# ---------------------------------------------------------------------------------------------
# helpers


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


def render(*args: str) -> list[dict]:
    """`helm template` with extra flags; the parsed documents (empty ones dropped)."""
    result = helm("template", RELEASE, str(CHART), "--namespace", "fl", *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(*args: str) -> str:
    """`helm template` that must fail; its error text."""
    result = helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed but rendered"
    return result.stderr


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def kinds(docs: list[dict]) -> list[str]:
    return [d["kind"] for d in docs]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def container(doc: dict, name: str | None = None) -> dict:
    containers = pod_spec(doc)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mounts_of(doc: dict, c: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in c.get("volumeMounts", [])}


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]


def job_arg(docs: list[dict], flag: str) -> str:
    args = container(find(docs, "Job"))["args"]
    return args[args.index(flag) + 1]


def run_config_of(docs: list[dict]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in job_arg(docs, "--run-config").split(" "))


# ---------------------------------------------------------------------------------------------
# value sets, rendered once each

GPU_ARGS = (
    "--set",
    "clients.gpu.enabled=true",
    "--set",
    "clients.gpu.count=2",
    "--set",
    "clients.gpu.runtimeClassName=nvidia",
)
MONITORING_ARGS = (
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.serviceMonitor.additionalLabels.release=kube-prometheus-stack",
    "--set",
    "metrics.podMonitor.additionalLabels.release=kube-prometheus-stack",
    "--set",
    "metrics.podMonitor.interval=15s",
)
PVC_DATA_ARGS = (
    "--set",
    "data.source=volume",
    "--set",
    "data.volume.existingClaim=cifar10-parquet",
    "--set",
    "data.volume.subPath=cifar10",
    "--set",
    "data.mountPath=/data/cifar",
)
HOSTPATH_DATA_ARGS = ("--set", "data.source=volume", "--set", "data.volume.hostPath=/srv/cifar10")
RUN_ARGS = (
    "--set",
    "clients.replicas=4",
    "--set",
    "run.rounds=7",
    "--set",
    "run.localEpochs=2",
    "--set",
    "run.batchSize=64",
    "--set",
    "run.learningRate=0.05",
    "--set",
    "run.momentum=0",
    "--set",
    "run.partitioner=dirichlet",
    "--set",
    "run.dirichletAlpha=0.1",
    "--set",
    "run.fractionEvaluate=0.5",
    "--set",
    "run.roundTimeout=120",
    "--set",
    "run.seed=7",
    "--set",
    "run.device=cpu",
    "--set-string",
    "run.extraConfig.out-dir=/var/lib/fedcifar/out",
    "--set",
    "run.strategy=fedtrimmedavg",
    "--set",
    "run.trimBeta=0.25",
    "--set",
    "run.maxExamples=12000",
)


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict]:
    return render(*GPU_ARGS)


@pytest.fixture(scope="module")
def monitoring_docs() -> list[dict]:
    return render(*MONITORING_ARGS, "--api-versions", MONITORING_API)


@pytest.fixture(scope="module")
def monitoring_without_api_docs() -> list[dict]:
    return render(*MONITORING_ARGS)


@pytest.fixture(scope="module")
def pvc_data_docs() -> list[dict]:
    return render(*PVC_DATA_ARGS)


@pytest.fixture(scope="module")
def hostpath_data_docs() -> list[dict]:
    return render(*HOSTPATH_DATA_ARGS)


@pytest.fixture(scope="module")
def persistence_docs() -> list[dict]:
    return render(
        "--set",
        "superlink.persistence.enabled=true",
        "--set",
        "superlink.persistence.size=5Gi",
        "--set",
        "superlink.persistence.storageClassName=standard",
    )


@pytest.fixture(scope="module")
def run_docs() -> list[dict]:
    return render(*RUN_ARGS)


INSECURE_ARGS = (
    "--set",
    "tls.enabled=false",
    "--set",
    "supernodeAuth.enabled=false",
    "--set",
    "networkPolicy.enabled=false",
)
CERT_MANAGER_ARGS = ("--api-versions", CERT_MANAGER_API, "--set", "tls.extraDnsNames[0]=flower.example.org")
EXISTING_SECRETS_ARGS = (
    "--set",
    "tls.existingSecret=my-tls",
    "--set",
    "supernodeAuth.existingSecret=my-keys",
    "--set",
    "supernodeAuth.existingPublicKeysSecret=my-public-keys",
    "--set",
    "clients.replicas=3",
    "--set",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
    "--set",
    "networkPolicy.extraApiFrom[0].namespaceSelector.matchLabels.team=flower-admins",
)


@pytest.fixture(scope="module")
def insecure_docs() -> list[dict]:
    return render(*INSECURE_ARGS)


@pytest.fixture(scope="module")
def cert_manager_docs() -> list[dict]:
    return render(*CERT_MANAGER_ARGS)


@pytest.fixture(scope="module")
def existing_secrets_docs() -> list[dict]:
    return render(*EXISTING_SECRETS_ARGS)


SERVER_ARGS = (
    "--set",
    "clients.enabled=false",
    "--set",
    "run.numPartitions=4",
    "--set",
    "superlink.service.type=NodePort",
    "--set",
    "superlink.service.nodePort=30800",
    "--set",
    "tls.extraIpAddresses[0]=10.0.0.5",
    "--set",
    "superlink.ingress.enabled=true",
    "--set",
    "superlink.ingress.host=fl.example.org",
    "--set",
    "superlink.ingress.className=nginx",
)
SITE_ARGS = (
    "--set",
    "superlink.enabled=false",
    "--set",
    "clients.superlink.address=10.0.0.5:30800",
    "--set",
    "clients.superlink.caSecret=federation-ca",
    "--set",
    "clients.site=hospital-a",
    "--set",
    "clients.partitions.offset=2",
    "--set",
    "clients.partitions.total=4",
    "--set",
    "clients.partitions.split=site",
    *HOSTPATH_DATA_ARGS,
)


@pytest.fixture(scope="module")
def server_docs() -> list[dict]:
    return render(*SERVER_ARGS)


@pytest.fixture(scope="module")
def site_docs() -> list[dict]:
    return render(*SITE_ARGS)


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load(SKAFFOLD.read_text())


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
# GPU


def test_gpu_off_by_default(default_docs: list[dict]) -> None:
    sts = find(default_docs, "StatefulSet")
    c = container(sts)
    assert c["image"] == "local/fedcifar:0.1.0-cpu"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert not pod_spec(sts).get("tolerations")
    assert "runtimeClassName" not in pod_spec(sts)


def test_gpu_on(gpu_docs: list[dict]) -> None:
    sts = find(gpu_docs, "StatefulSet")
    spec = pod_spec(sts)
    c = container(sts)
    assert c["image"] == "local/fedcifar:0.1.0-cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "4Gi"  # the configured limits stay
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    # the SuperLink and the run Job stay on the CPU image without GPUs
    for kind in ("Deployment", "Job"):
        other = container(find(gpu_docs, kind))
        assert other["image"] == "local/fedcifar:0.1.0-cpu"
        assert "nvidia.com/gpu" not in other.get("resources", {}).get("limits", {})


def test_gpu_image_override_and_extra_tolerations() -> None:
    docs = render(
        "--set",
        "clients.gpu.enabled=true",
        "--set",
        "clients.gpu.image.repository=reg.example/fedcifar",
        "--set",
        "clients.gpu.image.tag=9.9-cuda",
        "--set",
        "clients.tolerations[0].key=dedicated",
        "--set",
        "clients.tolerations[0].operator=Exists",
    )
    sts = find(docs, "StatefulSet")
    assert container(sts)["image"] == "reg.example/fedcifar:9.9-cuda"
    assert [t["key"] for t in pod_spec(sts)["tolerations"]] == ["dedicated", "nvidia.com/gpu"]


def test_scheduling_values_per_component() -> None:
    args = []
    for comp in ("superlink", "clients", "run"):
        args += [
            "--set",
            f"{comp}.nodeSelector.pool={comp}",
            "--set",
            f"{comp}.tolerations[0].key={comp}",
            "--set",
            f"{comp}.tolerations[0].operator=Exists",
            "--set",
            f"{comp}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            f".nodeSelectorTerms[0].matchExpressions[0].key={comp}",
            "--set",
            f"{comp}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            f".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "--set",
            f"{comp}.resources.limits.cpu=3",
        ]
    docs = render(*args)
    for kind, comp in (("Deployment", "superlink"), ("StatefulSet", "clients"), ("Job", "run")):
        spec = pod_spec(find(docs, kind))
        assert spec["nodeSelector"] == {"pool": comp}
        assert spec["tolerations"][0]["key"] == comp
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == comp
        assert container(find(docs, kind))["resources"]["limits"]["cpu"] == 3


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
    assert pm["spec"]["podMetricsEndpoints"][0] == {"port": "metrics", "path": "/metrics", "interval": "15s"}


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
# the run Job


def test_run_job_defaults(default_docs: list[dict]) -> None:
    job = find(default_docs, "Job", f"{FULLNAME}-run-1")  # the release revision is part of the name
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})  # install must not wait on training
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    c = container(job)
    assert c["command"] == ["fedcifar", "submit"]
    assert job_arg(default_docs, "--superlink") == f"{FULLNAME}-superlink:8000"
    assert job_arg(default_docs, "--app") == "/app"
    assert job_arg(default_docs, "--num-partitions") == "2"
    assert job_arg(default_docs, "--timeout") == "600"
    # it waits for every client's metrics endpoint (the pod DNS names of the headless Service)
    urls = c["args"][c["args"].index("--client-metrics") + 1 :]
    assert urls == [f"http://{FULLNAME}-clients-{i}.{FULLNAME}-clients:9400/metrics" for i in range(2)]
    assert run_config_of(default_docs) == {
        "num-server-rounds": "3",
        "local-epochs": "1",
        "batch-size": "32",
        "learning-rate": "0.01",
        "momentum": "0.9",
        "partitioner": '"iid"',
        "dirichlet-alpha": "0.5",
        "fraction-train": "1.0",
        "fraction-evaluate": "0.0",
        "min-nodes": "2",
        "num-partitions": "2",
        "round-timeout": "3600.0",
        "seed": "42",
        "device": '"auto"',
        "round-retries": "2",
        "resume": "true",
        "strategy": '"fedavg"',
        "trim-beta": "0.2",
        "num-malicious-nodes": "0",
        "num-nodes-to-select": "1",
        "max-examples": "0",
        "proximal-mu": "0.01",
        "eta": "0.1",
        "server-momentum": "0.9",
        "dp": '"none"',
        "noise-multiplier": "1.0",
        "clipping-norm": "10.0",
        "dp-delta": "1e-05",
        "out-dir": '"/var/lib/fedcifar/runs/revision-1"',  # per revision: a Job retry resumes the run
    }
    assert job["spec"]["backoffLimit"] == 3


def test_run_job_reaches_the_control_api_through_a_port_forward(default_docs: list[dict]) -> None:
    """The public port refuses the Control API; the Job port-forwards to Flower on the SuperLink's loopback."""
    deploy = find(default_docs, "Deployment", f"{FULLNAME}-superlink")
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert job_arg(default_docs, "--control-pod-selector") == ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    assert job_arg(default_docs, "--control-port") == "9093"
    role = find(default_docs, "Role", f"{FULLNAME}-run")
    assert role["rules"] == [  # as narrow as RBAC allows: no exec, no secrets, nothing cluster-wide
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
    ]
    binding = find(default_docs, "RoleBinding", f"{FULLNAME}-run")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{FULLNAME}-run"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-run", "namespace": "fl"}]
    assert not [d for d in render("--set", "run.enabled=false") if d["kind"] in ("Role", "RoleBinding")]


def test_the_public_face_passes_only_the_fleet_api(default_docs: list[dict]) -> None:
    """What nginx is told (tests/test_proxy.py runs this config in front of a real SuperLink)."""
    conf = find(default_docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    assert re.findall(r"location (.+?) \{", conf) == ["/v1/fleet/", "= /health", "= /v1/fleet", "/"]
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


def test_run_job_values(run_docs: list[dict]) -> None:
    config = run_config_of(run_docs)
    assert config["num-server-rounds"] == "7"
    assert config["local-epochs"] == "2"
    assert config["batch-size"] == "64"
    assert config["learning-rate"] == "0.05"
    assert config["momentum"] == "0.0"  # floats stay TOML floats
    assert config["partitioner"] == '"dirichlet"'
    assert config["dirichlet-alpha"] == "0.1"
    assert config["fraction-evaluate"] == "0.5"
    assert config["round-timeout"] == "120.0"
    assert config["seed"] == "7"
    assert config["device"] == '"cpu"'
    assert config["min-nodes"] == "4"
    assert config["out-dir"] == '"/var/lib/fedcifar/out"'
    assert (config["strategy"], config["trim-beta"], config["max-examples"]) == ('"fedtrimmedavg"', "0.25", "12000")


def test_run_config_is_valid_toml(run_docs: list[dict]) -> None:
    import tomllib

    parsed = tomllib.loads(job_arg(run_docs, "--run-config").replace(" ", "\n"))
    assert parsed["learning-rate"] == 0.05 and isinstance(parsed["momentum"], float)
    assert parsed["num-server-rounds"] == 7 and parsed["partitioner"] == "dirichlet"


def test_run_min_nodes_and_disable() -> None:
    docs = render(
        "--set",
        "clients.replicas=3",
        "--set",
        "run.minNodes=2",
        "--set",
        "run.activeDeadlineSeconds=7200",
        "--set",
        "run.ttlSecondsAfterFinished=600",
    )
    assert run_config_of(docs)["min-nodes"] == "2"
    job = find(docs, "Job")
    assert job["spec"]["activeDeadlineSeconds"] == 7200 and job["spec"]["ttlSecondsAfterFinished"] == 600
    assert "Job" not in kinds(render("--set", "run.enabled=false"))


def test_the_run_job_is_bounded_by_default(default_docs: list[dict]) -> None:
    """3 rounds x 3600 s x (2 retries + 3) per attempt; 4 attempts of 600 s wait + that."""
    assert find(default_docs, "Job")["spec"]["activeDeadlineSeconds"] == 4 * (600 + 3 * 3600 * 5)
    assert job_arg(default_docs, "--run-timeout") == str(3 * 3600 * 5)
    fractional = render("--set", "run.roundTimeout=90.5")  # 3 x 90.5 x 5 = 1357.5, rounded up
    assert job_arg(fractional, "--run-timeout") == "1358"
    assert find(fractional, "Job")["spec"]["activeDeadlineSeconds"] == 4 * (600 + 1358)


def test_a_site_name_that_yaml_would_read_as_a_number_stays_a_string() -> None:
    docs = render(
        "--set",
        "superlink.enabled=false",
        "--set",
        "clients.superlink.address=link:30800",
        "--set",
        "clients.superlink.caSecret=ca",
        "--set-string",
        "clients.site=123",
    )
    args = container(find(docs, "StatefulSet"))["args"]
    assert args[args.index("--site") + 1] == "123"


# ---------------------------------------------------------------------------------------------
# security


def test_security_contexts_everywhere(
    default_docs: list[dict], gpu_docs: list[dict], persistence_docs: list[dict]
) -> None:
    for docs in (default_docs, gpu_docs, persistence_docs):
        pods = workloads(docs)
        assert {d["kind"] for d in pods} == {"Deployment", "StatefulSet", "Job", "Pod"}
        for doc in pods:
            spec = pod_spec(doc)
            where = f"{doc['kind']} {doc['metadata']['name']}"
            if doc["kind"] == "Job":  # the only token: the port-forward to the Control API
                assert spec["automountServiceAccountToken"] is True, where
                assert spec["serviceAccountName"] == f"{FULLNAME}-run", where
            else:
                assert spec["automountServiceAccountToken"] is False, where
                assert spec["serviceAccountName"] == FULLNAME, where
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001, where
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for c in spec["containers"] + spec.get("initContainers", []):
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False, where
                assert csc["readOnlyRootFilesystem"] is True, where
                assert csc["capabilities"] == {"drop": ["ALL"]}, where
                assert csc["runAsNonRoot"] is True, where
                assert c["imagePullPolicy"] == "IfNotPresent", where
                assert not c["image"].endswith(":latest") and ":" in c["image"], where
                assert c.get("resources"), where
    for sa in (d for d in default_docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_security_contexts_with_every_security_option(insecure_docs, cert_manager_docs, existing_secrets_docs) -> None:
    """The pods that mount certificates and keys keep the locked-down pod and container contexts."""
    for docs in (insecure_docs, cert_manager_docs, existing_secrets_docs):
        for doc in workloads(docs):
            spec, where = pod_spec(doc), f"{doc['kind']} {doc['metadata']['name']}"
            assert spec["automountServiceAccountToken"] is (doc["kind"] == "Job"), where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            for c in spec["containers"]:
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True, where
                assert csc["capabilities"] == {"drop": ["ALL"]}, where


def test_helm_test_pod(default_docs: list[dict]) -> None:
    pod = find(default_docs, "Pod", f"{FULLNAME}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = container(pod)
    assert c["command"][0] == "python3" and "urllib.request" in c["command"][-1]
    env = env_of(c)
    assert env["SUPERLINK_HEALTH_URL"] == f"https://{FULLNAME}-superlink:8000/health"
    assert env["SUPERLINK_CA"] == "/etc/fedcifar/tls/ca.crt"
    assert "ssl.create_default_context(cafile=ca)" in c["command"][-1]
    mount, volume = mounts_of(pod, c)["/etc/fedcifar/tls"]
    assert volume["secret"] == {
        "secretName": f"{FULLNAME}-superlink-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert env["CLIENT_METRICS_URLS"] == " ".join(
        f"http://{FULLNAME}-clients-{i}.{FULLNAME}-clients:9400/metrics" for i in (0, 1)
    )


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it: `helm template` never prints NOTES.txt, so a copy of
    the chart renders it inside an ordinary template."""
    chart = tmp_path / "fedcifar"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        notes_tpl = (CHART / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "notes-render.yaml").write_text(
            '{{- define "notes-render" }}' + notes_tpl + '{{- end }}\nnotes: {{ include "notes-render" . | toJson }}\n'
        )
    result = subprocess.run(
        [
            HELM,
            "template",
            RELEASE,
            str(chart),
            "--namespace",
            "fl",
            "--show-only",
            "templates/notes-render.yaml",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_render(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, "--set", "run.partitioner=dirichlet")
    assert f"kubectl --namespace fl port-forward deploy/{FULLNAME}-superlink 9093:9093" in notes  # the Control API
    assert "flwr run . fedcifar --stream --run-config" in notes and 'partitioner="dirichlet"' in notes
    assert 'address = "127.0.0.1:9093"' in notes
    assert (
        f"get secret {FULLNAME}-superlink-tls -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > \"$FLWR_HOME/ca.crt\""
        in notes
    )
    assert 'root-certificates = "$FLWR_HOME/ca.crt"' in notes and "insecure = true" not in notes
    assert 'cat > "$FLWR_HOME/config.toml" <<TOML' in notes  # unquoted: the shell writes the absolute path
    assert f"port-forward pod/{FULLNAME}-clients-0 9401:9400" in notes
    assert f"logs -f job/{FULLNAME}-run-1" in notes


HISTORY_WARNING = "Helm keeps a copy of them in every revision of this release it records"


def test_notes_say_helm_keeps_generated_keys_in_the_release_history(tmp_path: Path) -> None:
    """Where Helm generates the CA key or the SuperNode private keys, NOTES.txt says that they stay in
    the release history and what to set instead; where the keys come from elsewhere, it says nothing."""
    notes = " ".join(render_notes(tmp_path).split())  # the default: Helm generates both
    assert HISTORY_WARNING in notes, notes
    assert "sh.helm.release.v1.demo.v<revision>" in notes and "helm get manifest" in notes
    assert f"{FULLNAME}-superlink-ca" in notes and f"{FULLNAME}-supernode-keys" in notes
    for remedy in (
        "tls.existingSecret",
        "cert-manager",
        "supernodeAuth.existingSecret",
        "allowHelmGeneratedKeys=false",
    ):
        assert remedy in notes, remedy
    site = " ".join(render_notes(tmp_path, *SITE_ARGS).split())  # a site release: its SuperNode keys only
    assert HISTORY_WARNING in site and f"{FULLNAME}-supernode-keys" in site and "-superlink-ca" not in site
    for args in (EXISTING_SECRETS_ARGS, INSECURE_ARGS):
        assert HISTORY_WARNING not in " ".join(render_notes(tmp_path, *args).split()), args


# ---------------------------------------------------------------------------------------------
# dashboards

DASHBOARD_FILES = sorted((CHART / "dashboards").glob("*.json"))
# Labels a Prometheus with the standard kubernetes pod relabeling adds, plus the series' own labels.
ALLOWED_LABELS = {"namespace", "pod", "site", "partition", "num_partitions", "device", "kind", "le", "reason"}
# series that carry the site (client metrics; the server's per-node failures, refused updates, Fleet refusals)
SITE_SERIES = ("fedcifar_client_", "fedcifar_rejected_updates", "fedcifar_fleet_refused")


def exported_series() -> set[str]:
    """Every series name fedcifar exports, read from its own metric definitions."""
    registry = CollectorRegistry()
    ServerMetrics(registry), SuperLinkMetrics(registry), ClientMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


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
        assert "fedcifar_connected_clients" in joined and "fedcifar_participating_clients" in joined
        assert "rate(fedcifar_client_examples_trained_total" in joined
        assert "throughput" in titles
    bysite = [e for _, e in exprs if re.search(r"\bby \(site(, reason)?\)", e)]
    assert bysite, "no per-site panel"


# ---------------------------------------------------------------------------------------------
# TLS, SuperNode authentication and NetworkPolicies


def secret_data(doc: dict) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in doc["data"].items()}


def test_superlink_serves_tls_and_requires_registered_supernodes(default_docs: list[dict]) -> None:
    deploy = find(default_docs, "Deployment", f"{FULLNAME}-superlink")
    c = container(deploy, "superlink")
    args = c["args"]
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "tls.crt"), ("--ssl-keyfile", "tls.key")):
        assert args[args.index(flag) + 1] == f"/etc/fedcifar/tls/{name}"
    assert "--enable-supernode-auth" in args and "--insecure" not in args
    mount, volume = mounts_of(deploy, c)["/etc/fedcifar/tls"]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == f"{FULLNAME}-superlink-tls"
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    mount, volume = mounts_of(deploy, c)["/etc/fedcifar/supernode-public-keys"]
    assert volume["secret"] == {"secretName": f"{FULLNAME}-supernode-public-keys"}  # no items: new keys show up
    env = env_of(c)
    assert env["FEDCIFAR_SUPERNODE_PUBLIC_KEYS"] == "/etc/fedcifar/supernode-public-keys"
    assert env["FEDCIFAR_READY_FILE"] == "/var/run/fedcifar/superlink-ready"  # on the writable run emptyDir
    # in the Service only once the keys are registered; alive as long as /health answers over HTTPS
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-e", "/var/run/fedcifar/superlink-ready"]
    assert "https://127.0.0.1:9093/health" in c["livenessProbe"]["exec"]["command"][2]
    assert all("supernode-keys" not in str(v) for v in pod_spec(deploy)["volumes"])  # no private key here


def test_generated_certificate_covers_the_service_names(default_docs: list[dict]) -> None:
    secret = find(default_docs, "Secret", f"{FULLNAME}-superlink-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = secret_data(secret)
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(ca)  # signed by the CA the clients get
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    svc = f"{FULLNAME}-superlink"
    assert sans.get_values_for_type(x509.DNSName) == [
        svc,
        f"{svc}.fl",
        f"{svc}.fl.svc",
        f"{svc}.fl.svc.cluster.local",
        "localhost",
    ]
    # the SuperLink's own SuperExec and ServerApp reach it on 127.0.0.1 (flwr's bind address)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key(data["tls.key"], None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_extra_ip_addresses_for_supernodes_outside_the_cluster() -> None:
    extra = ("--set", "tls.extraIpAddresses[0]=192.0.2.10", "--set", "tls.extraIpAddresses[1]=2001:db8::1")
    data = secret_data(find(render(*extra), "Secret", f"{FULLNAME}-superlink-tls"))
    sans = x509.load_pem_x509_certificate(data["tls.crt"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "192.0.2.10",
        "2001:db8::1",
    ]
    issued = find(render(*CERT_MANAGER_ARGS, *extra), "Certificate", f"{FULLNAME}-superlink-tls")
    assert issued["spec"]["ipAddresses"] == ["127.0.0.1", "192.0.2.10", "2001:db8::1"]
    assert "tls.extraIpAddresses.0" in render_error("--set", "tls.extraIpAddresses[0]=node-1")


def test_clients_verify_the_ca_and_each_mounts_only_its_own_key(run_docs: list[dict]) -> None:
    sts = find(run_docs, "StatefulSet")
    c = container(sts, "supernode")
    args = c["args"]
    assert args[args.index("--root-certificates") + 1] == "/etc/fedcifar/tls/ca.crt" and "--insecure" not in args
    assert args[args.index("--auth-supernode-private-key") + 1] == "/etc/fedcifar/supernode/supernode.key"
    assert env_of(c)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    mount, volume = mounts_of(sts, c)["/etc/fedcifar/supernode"]
    assert mount["subPathExpr"] == "$(POD_NAME)" and mount["readOnly"] is True  # <pod name>/ only
    assert volume["secret"]["secretName"] == f"{FULLNAME}-supernode-keys"
    assert volume["secret"]["defaultMode"] == 0o440
    assert volume["secret"]["items"] == [
        {"key": f"supernode-{i}.key", "path": f"{FULLNAME}-clients-{i}/supernode.key"} for i in range(4)
    ]
    _, ca = mounts_of(sts, c)["/etc/fedcifar/tls"]
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # not the server's key


def test_generated_supernode_keys_pair_up(run_docs: list[dict], tmp_path: Path) -> None:
    from fedcifar import security

    private = secret_data(find(run_docs, "Secret", f"{FULLNAME}-supernode-keys"))
    public = secret_data(find(run_docs, "Secret", f"{FULLNAME}-supernode-public-keys"))
    assert sorted(private) == [f"supernode-{i}.key" for i in range(4)]
    assert sorted(public) == [f"supernode-{i}.pub" for i in range(4)]
    seen = set()
    for i in range(4):
        (tmp_path / "k").write_bytes(private[f"supernode-{i}.key"])
        converted = security.openssh_private_key(tmp_path / "k", tmp_path / f"{i}.openssh")  # what the pod does
        key = serialization.load_ssh_private_key(converted.read_bytes(), None)  # what Flower does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        ssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert security.openssh_public_key(public[f"supernode-{i}.pub"]) == ssh_public
        seen.add(ssh_public)
    assert len(seen) == 4  # one key pair per ordinal


def test_run_job_uses_tls_and_registers_keys(default_docs: list[dict]) -> None:
    job = find(default_docs, "Job")
    c = container(job)
    env = env_of(c)
    assert env["FEDCIFAR_ROOT_CERTIFICATES"] == "/etc/fedcifar/tls/ca.crt"
    assert env["FEDCIFAR_SUPERNODE_PUBLIC_KEYS"] == "/etc/fedcifar/supernode-public-keys"
    mounts = mounts_of(job, c)
    assert mounts["/etc/fedcifar/tls"][1]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert (
        mounts["/etc/fedcifar/supernode-public-keys"][1]["secret"]["secretName"] == f"{FULLNAME}-supernode-public-keys"
    )


def test_plaintext_when_tls_is_off(insecure_docs: list[dict]) -> None:
    assert {d["kind"] for d in insecure_docs}.isdisjoint({"Secret", "NetworkPolicy"})
    superlink = container(find(insecure_docs, "Deployment"))
    assert "--insecure" in superlink["args"] and "--enable-supernode-auth" not in superlink["args"]
    assert not any(a.startswith("--ssl") for a in superlink["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = superlink[probe]["exec"]["command"][2]
        assert '"http://127.0.0.1:9093/health"' in command and "context=None" in command
    proxy = container(find(insecure_docs, "Deployment"), "proxy")
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    conf = find(insecure_docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    assert "listen 8000;" in conf and "ssl" not in conf and "proxy_pass http://flower;" in conf
    supernode = container(find(insecure_docs, "StatefulSet"))
    assert "--insecure" in supernode["args"] and "--root-certificates" not in supernode["args"]
    assert "--auth-supernode-private-key" not in supernode["args"]
    assert "FEDCIFAR_ROOT_CERTIFICATES" not in env_of(container(find(insecure_docs, "Job")))
    assert env_of(container(find(insecure_docs, "Pod")))["SUPERLINK_HEALTH_URL"].startswith("http://")
    for doc in workloads(insecure_docs):
        assert not any("secret" in v for v in pod_spec(doc).get("volumes", [])), doc["metadata"]["name"]


def test_cert_manager_issues_the_certificate_where_installed(cert_manager_docs: list[dict]) -> None:
    assert not [d for d in cert_manager_docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-tls")]
    cm = {(d["kind"], d["metadata"]["name"]): d for d in cert_manager_docs if d["apiVersion"] == CERT_MANAGER_API}
    assert set(cm) == {
        ("Issuer", f"{FULLNAME}-selfsigned"),
        ("Certificate", f"{FULLNAME}-ca"),
        ("Issuer", f"{FULLNAME}-ca"),
        ("Certificate", f"{FULLNAME}-superlink-tls"),
    }
    ca = cm[("Certificate", f"{FULLNAME}-ca")]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert cm[("Issuer", f"{FULLNAME}-ca")]["spec"] == {"ca": {"secretName": ca["secretName"]}}
    server = cm[("Certificate", f"{FULLNAME}-superlink-tls")]["spec"]
    assert server["secretName"] == f"{FULLNAME}-superlink-tls"  # what the pods mount
    svc = f"{FULLNAME}-superlink"
    assert server["dnsNames"] == [
        svc,
        f"{svc}.fl",
        f"{svc}.fl.svc",
        f"{svc}.fl.svc.cluster.local",
        "localhost",
        "flower.example.org",
    ]
    assert server["ipAddresses"] == ["127.0.0.1"] and "server auth" in server["usages"]
    assert server["issuerRef"] == {"name": f"{FULLNAME}-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert server["duration"] == "8760h" and server["renewBefore"] == "720h"
    # the cluster's own issuer instead of the release's CA
    docs = render(
        "--api-versions",
        CERT_MANAGER_API,
        "--set",
        "tls.certManager.issuerRef.name=corp-ca",
        "--set",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    )
    certs = [d for d in docs if d["apiVersion"] == CERT_MANAGER_API]
    assert [d["kind"] for d in certs] == ["Certificate"]
    assert certs[0]["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    # cert-manager installed but not wanted: Helm generates the Secret
    docs = render("--api-versions", CERT_MANAGER_API, "--set", "tls.certManager.enabled=false")
    assert not [d for d in docs if d["apiVersion"] == CERT_MANAGER_API]
    find(docs, "Secret", f"{FULLNAME}-superlink-tls")


def test_existing_secrets_are_used_as_they_are(existing_secrets_docs: list[dict]) -> None:
    assert not [d for d in existing_secrets_docs if d["kind"] == "Secret"]
    deploy = find(existing_secrets_docs, "Deployment")
    volumes = {v["name"]: v for v in pod_spec(deploy)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-tls"
    assert volumes["supernode-public-keys"]["secret"]["secretName"] == "my-public-keys"
    sts = find(existing_secrets_docs, "StatefulSet")
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    assert volumes["tls-ca"]["secret"]["secretName"] == "my-tls"
    assert volumes["supernode-key"]["secret"]["secretName"] == "my-keys"
    assert [i["key"] for i in volumes["supernode-key"]["secret"]["items"]] == [f"supernode-{i}.key" for i in range(3)]


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


# ---------------------------------------------------------------------------------------------
# cross-silo shapes: a server release and site releases


def test_server_release_holds_the_superlink_and_the_run(server_docs: list[dict]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in server_docs}
    assert ("Deployment", f"{FULLNAME}-superlink") in names and ("Job", f"{FULLNAME}-run-1") in names
    assert ("Ingress", f"{FULLNAME}-superlink") in names
    assert {k for k, _ in names} >= {"ConfigMap", "Secret", "Role", "RoleBinding", "NetworkPolicy", "Pod"}
    assert "StatefulSet" not in kinds(server_docs) and not [n for _, n in names if "supernode" in n]
    assert len([n for _, n in names if "-dashboard-" in n]) == 2  # one set of dashboards, for the whole federation
    # the run states the federation and waits for its SuperNodes in Flower's node list
    args = container(find(server_docs, "Job"))["args"]
    assert "--client-metrics" not in args
    assert job_arg(server_docs, "--min-nodes") == "4" and job_arg(server_docs, "--num-partitions") == "4"
    assert run_config_of(server_docs)["num-partitions"] == "4" and run_config_of(server_docs)["min-nodes"] == "4"
    assert "FEDCIFAR_SUPERNODE_PUBLIC_KEYS" not in env_of(container(find(server_docs, "Job")))
    # the SuperLink keeps registering other sites' keys from an optional Secret, mounted whole
    deploy = find(server_docs, "Deployment")
    env = env_of(container(deploy, "superlink"))
    assert env["FEDCIFAR_SITE_PUBLIC_KEYS"] == "/etc/fedcifar/site-public-keys"
    assert "FEDCIFAR_SUPERNODE_PUBLIC_KEYS" not in env
    mount, volume = mounts_of(deploy, container(deploy, "superlink"))["/etc/fedcifar/site-public-keys"]
    assert volume["secret"] == {"secretName": f"{FULLNAME}-site-keys", "optional": True} and "subPath" not in mount
    # sites reach the public face from anywhere, on the node port or through the Ingress (TLS passed through)
    service = find(server_docs, "Service", f"{FULLNAME}-superlink")["spec"]
    assert service["type"] == "NodePort" and [(p["name"], p["nodePort"]) for p in service["ports"]] == [("http", 30800)]
    assert find(server_docs, "Service", f"{FULLNAME}-superlink-metrics")["spec"]["type"] == "ClusterIP"
    public = find(server_docs, "NetworkPolicy", f"{FULLNAME}-superlink")["spec"]["ingress"][0]
    assert "from" not in public and public["ports"] == [{"port": 8000, "protocol": "TCP"}]
    ingress = find(server_docs, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/v1/fleet/", "Prefix"), ("/health", "Exact")]
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["rules"][0]["host"] == "fl.example.org"
    tls = find(server_docs, "Secret", f"{FULLNAME}-superlink-tls")
    cert = x509.load_pem_x509_certificate(secret_data(tls)["tls.crt"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.0.0.5") in sans.get_values_for_type(x509.IPAddress)


def test_the_helm_ca_is_kept_apart_and_new_names_roll_the_superlink(default_docs, server_docs) -> None:
    ca = find(default_docs, "Secret", f"{FULLNAME}-superlink-ca")
    assert "annotations" not in ca["metadata"]  # `helm uninstall` leaves nothing behind, the CA included
    assert set(secret_data(ca)) == {"ca.crt", "ca.key"}
    tls = find(default_docs, "Secret", f"{FULLNAME}-superlink-tls")
    assert secret_data(tls)["ca.crt"] == secret_data(ca)["ca.crt"] and "ca.key" not in tls["data"]
    names = json.loads(tls["metadata"]["annotations"]["fedcifar/certificate-names"])
    assert "127.0.0.1" in names and f"{FULLNAME}-superlink" in names
    for docs in (default_docs, server_docs):  # no pod mounts the CA key
        for workload in workloads(docs):
            assert f"{FULLNAME}-superlink-ca" not in json.dumps(pod_spec(workload))

    def rollout(docs):
        return find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/tls-names"]

    assert rollout(default_docs) != rollout(server_docs)  # the names changed: the SuperLink restarts with them


def test_site_release_holds_its_supernodes_and_their_keys(site_docs: list[dict]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in site_docs}
    assert not {"Deployment", "Job", "Role", "Ingress"} & set(kinds(site_docs))
    assert not [n for _, n in names if "-dashboard-" in n or "superlink" in n]
    assert {
        ("Secret", f"{FULLNAME}-supernode-keys"),
        ("Secret", f"{FULLNAME}-supernode-public-keys"),
        ("StatefulSet", f"{FULLNAME}-clients"),
        ("Pod", f"{FULLNAME}-test"),
    } <= names
    sts = find(site_docs, "StatefulSet")
    c = container(sts)
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert args["--superlink"] == "10.0.0.5:30800" and args["--root-certificates"] == "/etc/fedcifar/tls/ca.crt"
    assert (
        args["--partition-offset"],
        args["--num-partitions"],
        args["--split"],
        args["--site-partitions"],
        args["--site"],
    ) == ("2", "4", "site", "2", "hospital-a")
    _, volume = mounts_of(sts, c)["/etc/fedcifar/tls"]
    assert volume["secret"]["secretName"] == "federation-ca"  # the remote SuperLink's CA, created by the operator
    assert mounts_of(sts, c)["/data/cifar10"][1]["hostPath"]["path"] == "/srv/cifar10"  # the site's own data
    test = container(find(site_docs, "Pod", f"{FULLNAME}-test"))
    env = env_of(test)
    assert env["SUPERLINK_HEALTH_URL"] == "https://10.0.0.5:30800/health"
    assert env["CLIENT_METRICS_URLS"].split() == [
        f"http://{FULLNAME}-clients-{i}.{FULLNAME}-clients:9400/metrics" for i in (0, 1)
    ]
    assert "activated" in test["command"][-1]
    assert [d["metadata"]["name"] for d in site_docs if d["kind"] == "NetworkPolicy"] == [
        f"{FULLNAME}-clients",
        f"{FULLNAME}-run",
    ]


def test_the_default_release_is_one_site_holding_every_slot(default_docs: list[dict]) -> None:
    args = container(find(default_docs, "StatefulSet"))["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert (pairs["--partition-offset"], pairs["--num-partitions"], pairs["--split"], pairs["--site"]) == (
        "0",
        "2",
        "global",
        RELEASE,
    )
    assert "--min-nodes" not in container(find(default_docs, "Job"))["args"]
    env = env_of(container(find(default_docs, "Deployment"), "superlink"))
    assert (env["FEDCIFAR_SITE"], env["FEDCIFAR_PARTITION_OFFSET"]) == (RELEASE, "0")  # keys named <site>/slot-<k>


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


# ---------------------------------------------------------------------------------------------
# values that must be rejected, with a message that names the problem


def test_schema_is_closed() -> None:
    """Every object the chart defines rejects unknown keys (Kubernetes pass-through objects aside)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    open_objects = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "")
    assert not open_objects
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: dict, prefix: str = ""):
        for key, child in node.items():
            yield f"{prefix}{key}", child
            if isinstance(child, dict) and f"{prefix}{key}" not in PASS_THROUGH:
                yield from leaves(child, f"{prefix}{key}.")

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    for path, _ in leaves(values):  # every value has a schema entry
        node = schema
        for part in path.split("."):
            properties = resolve(node).get("properties", {})
            assert part in properties, f"values.yaml key {path} is missing from values.schema.json"
            node = properties[part]


PASS_THROUGH = {
    "podSecurityContext",
    "securityContext",
    "extraEnv",
    *(
        f"{c}.{k}"
        for c in ("superlink", "clients", "run")
        for k in ("resources", "nodeSelector", "affinity", "podAnnotations", "podLabels", "extraEnv")
    ),
    "superlink.proxy.resources",
    "superlink.service.annotations",
    "superlink.persistence.annotations",
    "serviceAccount.annotations",
    "run.extraConfig",
    "metrics.serviceMonitor.additionalLabels",
    "metrics.podMonitor.additionalLabels",
    "dashboards.annotations",
    "tests.resources",
    "tls.certManager.issuerRef",
    "superlink.ingress.annotations",
}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "clients.replica=3"), r"clients: Additional property replica is not allowed"),  # unknown key
        (("--set", "superlink.bogus=1"), r"superlink: Additional property bogus is not allowed"),
        (("--set", "nope=1"), r"Additional property nope is not allowed"),
        (("--set", "run.rounds=three"), r"run\.rounds: Invalid type\. Expected: integer, given: string"),  # wrong type
        (("--set-string", "clients.replicas=2"), r"clients\.replicas: Invalid type\. Expected: integer"),
        (("--set", "clients.gpu.enabled=yes"), r"clients\.gpu\.enabled: Invalid type\. Expected: boolean"),
        (("--set", "superlink.nodeSelector.disk=1"), r"superlink\.nodeSelector\.disk: Invalid type\. Expected: string"),
        (("--set", "run.learningRate=fast"), r"run\.learningRate: Does not match pattern"),
        (("--set", "clients.replicas=0"), r"clients\.replicas: Must be greater than or equal to 1"),
        (("--set", "run.partitioner=shards"), r'run\.partitioner must be one of the following: "iid", "dirichlet"'),
        (("--set", "data.source=s3"), r'data\.source must be one of the following: "hub", "volume"'),
        (("--set", "run.device=tpu"), r"run\.device must be one of the following"),
        (("--set", "run.learningRate=0"), r"run\.learningRate: Must be greater than 0"),
        (("--set", "tls.enabled=yes"), r"tls\.enabled: Invalid type\. Expected: boolean"),
        (("--set", "tls.certManager.issuerRef.kind=Vault"), r"kind must be one of the following"),
        (("--set", "tls.extraDnsNames[0]=Not A Name"), r"tls\.extraDnsNames\.0: Does not match pattern"),
        (("--set", "networkPolicy.ingress=1"), r"networkPolicy: Additional property ingress is not allowed"),
        (("--set", "supernodeAuth.keys=1"), r"supernodeAuth: Additional property keys is not allowed"),
        (("--set", "clients.site=Hospital_A"), r"clients\.site: Does not match pattern"),
        (("--set", "clients.superlink.address=https://link"), r"clients\.superlink\.address: Does not match pattern"),
        (
            ("--set", "clients.partitions.split=random"),
            r'clients\.partitions\.split must be one of the following: "global", "site"',
        ),
        (("--set", "clients.partitions.offset=-1"), r"clients\.partitions\.offset: Must be greater than or equal to 0"),
        (("--set", "run.numPartitions=0"), r"run\.numPartitions: Must be greater than or equal to 1"),
        (("--set", "run.strategy=fedsgd"), r'run\.strategy must be one of the following: "fedavg", "fedprox"'),
        (("--set", "run.dp=central"), r'run\.dp must be one of the following: "none", "server-fixed"'),
        (("--set", "run.noiseMultiplier=0"), r"run\.noiseMultiplier: Must be greater than 0"),
        (("--set", "run.dpDelta=1"), r"run\.dpDelta: Must be less than 1"),
        (("--set", "run.serverMomentum=1"), r"run\.serverMomentum: Must be less than 1"),
        (("--set", "run.proximalMu=-0.1"), r"run\.proximalMu: Must validate at least one schema"),
        (("--set", "run.numMaliciousNodes=-1"), r"run\.numMaliciousNodes: Must be greater than or equal to 0"),
        (("--set", "run.maxExamples=-1"), r"run\.maxExamples: Must be greater than or equal to 0"),
        # what would open Flower's APIs beside the proxy and the Fleet guard
        (("--set", "superlink.extraArgs[0]=--host", "--set", "superlink.extraArgs[1]=0.0.0.0"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--fleet-api-address=0.0.0.0:9092"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--control-api-address"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--ho=0.0.0.0"), r"extraArgs\.0"),  # Flower's parser takes abbreviations
        (("--set", "superlink.extraEnv.FLWR_INTERNAL_GRPC_FLEET_API=1"), r"FLWR_INTERNAL_GRPC_FLEET_API"),
        (("--set", "extraEnv.FLWR_INTERNAL_GRPC_CONTROL_API=1"), r"FLWR_INTERNAL_GRPC_CONTROL_API"),
        (("--set", "superlink.fleetGuard.maxReplyBytes=0"), r"maxReplyBytes: Must be greater than or equal to 1"),
        # names, labels, annotations and quantities the chart renders (more in test_free_strings_are_refused_or_inert)
        (("--set", "imagePullSecrets[0].name=Reg Cred"), r"imagePullSecrets\.0\.name: Does not match pattern"),
        (("--set", "superlink.podLabels.team=a b"), r"superlink\.podLabels\.team: Does not match pattern"),
        (("--set", "superlink.podAnnotations.bad key=x"), r'superlink\.podAnnotations: Property name of "bad key"'),
        (("--set", "clients.resources.limits.memory=4 GiB"), r"clients\.resources\.limits\.memory: Does not match"),
        (("--set", "tls.certManager.issuerRef.group=x_y"), r"tls\.certManager\.issuerRef\.group: Does not match"),
        (("--set", "clients.gpu.resourceName=a/b/c"), r"clients\.gpu\.resourceName: Does not match pattern"),
        (("--set", "superlink.proxy.maxBodySize=6m;x"), r"superlink\.proxy\.maxBodySize: Does not match pattern"),
    ],
)
def test_schema_rejects(args: tuple[str, ...], expected: str) -> None:
    error = render_error(*args)
    assert "values don't meet the specifications of the schema" in error, error
    assert re.search(expected, error, re.IGNORECASE | re.DOTALL), error


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "data.source=volume"), "neither data.volume.existingClaim nor data.volume.hostPath is set"),
        (
            ("--set", "data.source=volume", "--set", "data.volume.existingClaim=a", "--set", "data.volume.hostPath=/b"),
            "data.volume.existingClaim and data.volume.hostPath are both set",
        ),
        (("--set", "run.minNodes=3"), "run.minNodes (3) is larger than the federation's node slots (2)"),
        (("--set", "run.extraConfig.seed=1"), "run.extraConfig.seed repeats a run-config key"),
        (("--set", "run.extraConfig.resume=false"), "run.extraConfig.resume repeats a run-config key"),
        (("--set", "run.extraConfig.round-retries=5"), "run.extraConfig.round-retries repeats a run-config key"),
        (("--set", "run.extraConfig.strategy=krum"), "run.extraConfig.strategy repeats a run-config key"),
        (("--set", "run.extraConfig.noise-multiplier=2"), "run.extraConfig.noise-multiplier repeats a run-config key"),
        (("--set", "run.trimBeta=0.5"), "run.trimBeta is the fraction strategy fedtrimmedavg cuts at each end"),
        (("--set", "metrics.port=9094"), "clients.port and metrics.port are both 9094"),
        (("--set", "superlink.persistence.existingClaim=x"), "superlink.persistence.enabled is false"),
        (("--set", "image.tag=latest"), 'image.tag and clients.gpu.image.tag must be fixed versions, not "latest"'),
        (("--set", "run.fractionTrain=1.5"), "run.fractionTrain is a fraction of the clients and must lie between 0"),
        (("--set", "run.dirichletAlpha=0.0"), "run.dirichletAlpha must be greater than 0"),
        (("--set", "tls.enabled=false"), "supernodeAuth.enabled needs tls.enabled"),
        (
            ("--set", "supernodeAuth.existingSecret=keys"),
            "supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret go together",
        ),
        (("--set", "metrics.port=9093"), "metrics.port and superlink.controlPort are both 9093"),
        (("--set", "superlink.controlPort=8000"), "superlink.controlPort and superlink.port are both 8000"),
        # the cross-silo shapes
        (
            ("--set", "superlink.enabled=false", "--set", "clients.enabled=false"),
            "superlink.enabled and clients.enabled are both false: this release would hold nothing",
        ),
        (
            ("--set", "superlink.enabled=false"),
            "a site release dials a remote SuperLink; set clients.superlink.address",
        ),
        (
            ("--set", "superlink.enabled=false", "--set", "clients.superlink.address=link:30800"),
            "clients.superlink.caSecret is empty: create a Secret holding the remote SuperLink's ca.crt",
        ),
        (("--set", "clients.superlink.address=link:30800"), "set superlink.enabled=false for a site release"),
        (("--set", "clients.enabled=false"), "a server release states the federation's node slots"),
        (
            ("--set", "clients.partitions.offset=1"),
            "clients.partitions.offset (1) + clients.replicas (2) is beyond clients.partitions.total (2)",
        ),
        (
            ("--set", "clients.partitions.total=4", "--set", "run.numPartitions=3"),
            "run.numPartitions (3) differs from clients.partitions.total (4)",
        ),
        (("--set", "superlink.ingress.enabled=true"), "superlink.ingress.enabled needs superlink.ingress.host"),
        # the same as the schema refuses, for a helm run without it
        (
            ("--skip-schema-validation", "--set", "superlink.extraArgs[0]=--host=0.0.0.0"),
            "superlink.extraArgs holds --host=0.0.0.0: Flower would serve its APIs beside the proxy",
        ),
        (
            ("--skip-schema-validation", "--set", "extraEnv.FLWR_INTERNAL_GRPC_FLEET_API=1"),
            "extraEnv sets FLWR_INTERNAL_GRPC_FLEET_API: Flower would open its legacy gRPC API",
        ),
        (
            ("--skip-schema-validation", "--set", "superlink.extraEnv.FLWR_INTERNAL_GRPC_CONTROL_API=1"),
            "superlink.extraEnv sets FLWR_INTERNAL_GRPC_CONTROL_API",
        ),
        (  # written into nginx.conf, where quoting would not help
            ("--skip-schema-validation", "--set", "superlink.proxy.maxBodySize=6m;\n  evil on"),
            'superlink.proxy.maxBodySize must be an nginx size (bytes, or a number with k or m, e.g. 6m), got "6m;\\n',
        ),
        (
            (
                "--set",
                "superlink.ingress.enabled=true",
                "--set",
                "superlink.ingress.host=fl.example.org",
                "--set",
                "tls.enabled=false",
                "--set",
                "supernodeAuth.enabled=false",
            ),
            "superlink.ingress.enabled needs tls.enabled",
        ),
    ],
)
def test_contradictory_values_fail(args: tuple[str, ...], expected: str) -> None:
    error = render_error(*args)
    assert expected in error, error


def test_helm_generated_keys_can_be_refused() -> None:
    """allowHelmGeneratedKeys=false: a release for which Helm would generate the CA key or SuperNode
    private keys (and keep them in every release revision) fails, naming what to set instead; keys
    from Secrets of their own or from cert-manager pass."""
    refuse = ("--set", "allowHelmGeneratedKeys=false")
    error = render_error(*refuse)
    assert "allowHelmGeneratedKeys is false" in error and "sh.helm.release.v1." in error, error
    assert "set tls.existingSecret" in error and "cert-manager" in error, error
    assert "set supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret" in error, error
    error = render_error(*refuse, "--set", "tls.existingSecret=my-tls")  # the SuperNode keys alone
    assert "supernodeAuth.existingSecret" in error and "set tls.existingSecret" not in error, error
    own_keys = ("--set", "supernodeAuth.existingSecret=k", "--set", "supernodeAuth.existingPublicKeysSecret=p")
    error = render_error(*refuse, *own_keys)  # the CA alone
    assert "set tls.existingSecret" in error and "supernodeAuth.existingSecret" not in error, error
    for args in (
        ("--set", "tls.existingSecret=my-tls", *own_keys),
        ("--api-versions", CERT_MANAGER_API, *own_keys),  # cert-manager keeps the CA key in its own Secret
        INSECURE_ARGS,
        ("--set", "clients.enabled=false", "--set", "run.numPartitions=2", "--set", "tls.existingSecret=my-tls"),
        tuple(a for a in SITE_ARGS) + own_keys,
    ):
        docs = render(*refuse, *args)
        secrets = [d for d in docs if d["kind"] == "Secret"]
        assert not secrets, (args, [d["metadata"]["name"] for d in secrets])


# ---------------------------------------------------------------------------------------------
# free strings: refused by the schema where their field cannot hold them, inert where rendered

# Three release shapes that between them render every free string of the chart, each value set to a
# benign placeholder of its own (found verbatim in the render, and in no other placeholder).
SHAPES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "release": (
        (
            *("--api-versions", MONITORING_API, "--api-versions", CERT_MANAGER_API),
            *("--set", "data.source=volume", "--set", "clients.gpu.enabled=true"),
            *("--set", "superlink.ingress.enabled=true", "--set", "superlink.persistence.enabled=true"),
            *("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"),
            *("--set", "tls.certManager.issuerRef.kind=Issuer"),
        ),
        {
            "nameOverride": "zq-name",
            "fullnameOverride": "zq-full",
            "image.repository": "zq/image",
            "image.tag": "zq-tag",
            "serviceAccount.name": "zq-account",
            "superlink.priorityClassName": "zq-slprio",
            "superlink.podLabels.zqlabel": "zq-labelvalue",
            "superlink.ingress.className": "zq-ingclass",
            "superlink.ingress.host": "zq-host.example",
            "superlink.persistence.storageClassName": "zq-storage",
            "tls.clusterDomain": "zq-domain.local",
            "tls.certManager.issuerRef.name": "zq-issuer",
            "tls.certManager.duration": "4217h",
            "supernodeAuth.existingSecret": "zq-privkeys",
            "supernodeAuth.existingPublicKeysSecret": "zq-pubkeys",
            "supernodeAuth.siteKeysSecret": "zq-sitekeys",
            "clients.priorityClassName": "zq-clprio",
            "clients.gpu.resourceName": "zq.example/res",
            "clients.gpu.runtimeClassName": "zq-runtime",
            "clients.gpu.image.repository": "zq/gpuimage",
            "clients.gpu.image.tag": "zq-gputag",
            "data.mountPath": "/zq/mountpath",
            "data.volume.existingClaim": "zq-dataclaim",
            "data.volume.subPath": "zq/subpath",
            "metrics.serviceMonitor.interval": "417s",
            "metrics.podMonitor.scrapeTimeout": "413s",
            "dashboards.label": "zq-dlabel",
            "dashboards.labelValue": "zq-dvalue",
            "dashboards.namespace": "zq-dashns",
        },
    ),
    "existing": (
        ("--set", "data.source=volume", "--set", "superlink.persistence.enabled=true"),
        {
            "tls.existingSecret": "zq-tlssecret",
            "superlink.persistence.existingClaim": "zq-stateclaim",
            "data.volume.hostPath": "/zq/hostpath",
        },
    ),
    "site": (
        ("--set", "superlink.enabled=false"),
        {"clients.superlink.address": "zq-link:30800", "clients.superlink.caSecret": "zq-casecret"},
    ),
}
# (what is odd, {value: odd value}, refused by the schema). Without the schema (--skip-schema-validation)
# every odd value must still land verbatim, as a string, where its placeholder did, and add nothing.
ODD_VALUES = [
    (
        "newline injection",  # a key beside the value; the issue's own: readOnly: false on the data mount
        {
            "data.volume.subPath": "x\n  readOnly: false",
            "data.mountPath": "/data\n  readOnly: false",
            "data.volume.existingClaim": "c\n    readOnly: false",
            "data.volume.hostPath": "/srv\n    type: ''",
            "superlink.priorityClassName": "high\n      hostNetwork: true",
            "clients.priorityClassName": "high\n      hostIPC: true",
            "clients.gpu.runtimeClassName": "nvidia\n      hostPID: true",
            "serviceAccount.name": "sa\n      automountServiceAccountToken: true",
            "supernodeAuth.existingSecret": "keys\n            defaultMode: 511",
            "supernodeAuth.existingPublicKeysSecret": "pub\n            defaultMode: 511",
            "supernodeAuth.siteKeysSecret": "site\n            optional: false",
            "tls.existingSecret": "tls\n            defaultMode: 511",
            "clients.superlink.caSecret": "ca\n            defaultMode: 511",
            "clients.superlink.address": "link:30800\n            - --insecure",
            "nameOverride": "x\n    evil: label",
            "fullnameOverride": "x\n  namespace: kube-system",
            "image.repository": "repo\n          command: [sh]",
            "image.tag": "1.0\n#",
            "clients.gpu.image.repository": "repo\nx",
            "clients.gpu.image.tag": "1.0\nx",
            "clients.gpu.resourceName": "nvidia.com/gpu\nx",
            "superlink.podLabels.zqlabel": "v\n    evil: x",
            "superlink.ingress.className": "nginx\n  evil: x",
            "superlink.ingress.host": "fl.example.org\n  evil: x",
            "superlink.persistence.storageClassName": "fast\n  volumeMode: Block",
            "superlink.persistence.existingClaim": "state\n            readOnly: true",
            "tls.clusterDomain": "cluster.local\nevil",
            "tls.certManager.issuerRef.name": "issuer\n    evil: x",
            "tls.certManager.duration": "1h\n  isCA: true",
            "metrics.serviceMonitor.interval": "30s\n      honorLabels: true",
            "metrics.podMonitor.scrapeTimeout": "10s\n      honorLabels: true",
            "dashboards.label": "grafana\n    evil: x",
            "dashboards.labelValue": "1\n    evil: x",
            "dashboards.namespace": "ns\n  evil: x",
        },
        True,
    ),
    (
        "a .. component",
        {"data.volume.subPath": "a/../../b", "data.mountPath": "/data/..", "data.volume.hostPath": "/srv/../../etc"},
        True,
    ),
    (
        "absolute where relative is meant, and the other way round",
        {"data.volume.subPath": "/abs", "data.mountPath": "data", "data.volume.hostPath": "srv"},
        True,
    ),
    (
        "control characters",
        {
            "data.volume.subPath": "a\x1bb",
            "data.mountPath": "/data/a\rb",
            "data.volume.hostPath": "/srv\x08",
            "clients.superlink.caSecret": "ca\t",
            "clients.superlink.address": "link\x0b:30800",
            "superlink.priorityClassName": "a\x07b",
            "image.tag": "1.0\x0b",
            "dashboards.labelValue": "a\tb",
        },
        True,
    ),
    (
        "YAML's own syntax where a name or an image is meant",
        {
            "clients.priorityClassName": "x: y",
            "superlink.priorityClassName": "|",
            "superlink.ingress.className": "nginx #x",
            "superlink.persistence.existingClaim": "*alias",
            "supernodeAuth.siteKeysSecret": "&anchor",
            "tls.existingSecret": "!tls",
            "clients.superlink.caSecret": '"ca"',
            "clients.superlink.address": "{a}:80",
            "serviceAccount.name": "'sa'",
            "clients.gpu.runtimeClassName": "%x",
            "data.volume.existingClaim": "@c",
            "superlink.persistence.storageClassName": "fast, slow",
            "nameOverride": "a: b",
            "fullnameOverride": "[x]",
            "image.repository": "reg/repo name",
            "image.tag": ">x",
            "clients.gpu.image.repository": "{x}",
            "dashboards.label": "a: b",
            "dashboards.namespace": "kube system",
        },
        True,
    ),
    (
        "valid names that YAML would read as a bool, null or number",
        {
            "superlink.priorityClassName": "true",
            "clients.priorityClassName": "null",
            "clients.gpu.runtimeClassName": "123",
            "superlink.ingress.className": "yes",
            "serviceAccount.name": "on",
            "data.volume.existingClaim": "1.5",
            "supernodeAuth.existingSecret": "off",
            "supernodeAuth.existingPublicKeysSecret": "no",
            "supernodeAuth.siteKeysSecret": "y",
            "superlink.persistence.storageClassName": "false",
            "tls.existingSecret": "on",
            "superlink.persistence.existingClaim": "123",
            "clients.superlink.caSecret": "null",
            "clients.superlink.address": "10:30",  # YAML 1.1 reads 630
            "nameOverride": "123",
            "fullnameOverride": "0x1f",
            "image.tag": "1.10",
            "dashboards.label": "123",
            "dashboards.namespace": "false",
        },
        False,
    ),
    (
        "valid paths that hold YAML's own syntax",
        {
            "data.mountPath": "/data/a: b #c {d}",
            "data.volume.subPath": "a: b/#c/{d}/[e]",
            "data.volume.hostPath": "/srv/*x &y !z",
        },
        False,
    ),
]


def values_file(path: Path, settings: dict[str, str]) -> str:
    """A values file setting dotted keys to exact strings (no --set parsing of commas or escapes)."""
    top: dict = {}
    for dotted, value in settings.items():
        node = top
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(top, default_style='"'))  # quoted: Helm's YAML reads `y` as true
    return str(path)


def comparable(docs: list[dict]) -> list[dict]:
    """The documents without what differs from one render to the next or only digests other text:
    generated keys and certificates, checksums, the certificate's names (JSON in an annotation)."""
    out = []
    for doc in copy.deepcopy(docs):
        if doc["kind"] == "Secret":
            doc.pop("data", None)
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        for meta in (doc["metadata"], (spec.get("template") or {}).get("metadata") or {}):
            annotations = meta.get("annotations") or {}
            for key in [k for k in annotations if k.startswith("checksum/") or k == "fedcifar/certificate-names"]:
                del annotations[key]
        out.append(doc)
    return out


def ordered(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: (d["kind"], str(d["metadata"]["name"])))


def swapped(node: object, old: str, new: str) -> object:
    if isinstance(node, dict):
        return {swapped(k, old, new): swapped(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [swapped(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def benign_renders(tmp_path_factory) -> dict[str, list[dict]]:
    placeholders = [v for _, values in SHAPES.values() for v in values.values()]
    for a in placeholders:  # a swap touches its own value only
        assert [b for b in placeholders if a in b] == [a], a
    renders = {}
    for shape, (flags, values) in SHAPES.items():
        docs = render(*flags, "-f", values_file(tmp_path_factory.mktemp("benign") / f"{shape}.yaml", values))
        text = json.dumps(docs)
        assert not [v for v in values.values() if v not in text], f"{shape}: placeholders not rendered"
        renders[shape] = comparable(docs)
    return renders


def test_odd_values_cover_every_placeholder() -> None:
    """Every value of SHAPES meets at least one odd value, and every odd value has a placeholder."""
    placed = {key for _, values in SHAPES.values() for key in values}
    odd = {key for _, values, _ in ODD_VALUES for key in values}
    assert odd == placed, (odd - placed, placed - odd)


@pytest.mark.parametrize(
    ("odd", "refused"),
    [(values, refused) for _, values, refused in ODD_VALUES],
    ids=[what for what, _, _ in ODD_VALUES],
)
def test_free_strings_are_refused_or_inert(odd: dict[str, str], refused: bool, benign_renders, tmp_path) -> None:
    """A newline, a `..`, a control character or YAML's own syntax in a value is refused by the schema
    where its field cannot hold it; and the chart quotes every free string it renders, so even without
    the schema the value is one string in its place and the manifests hold nothing else."""
    for shape, (flags, benign) in SHAPES.items():
        mine = {key: value for key, value in odd.items() if key in benign}
        if not mine:
            continue
        odd_values = values_file(tmp_path / f"{shape}.yaml", {**benign, **mine})
        if refused:
            error = render_error(*flags, "-f", odd_values)
            assert "values don't meet the specifications of the schema" in error, error
            missed = [key for key in mine if not re.search(rf"^- {re.escape(key)}: ", error, re.MULTILINE)]
            assert not missed, f"{shape}: the schema accepts {missed}:\n{error}"
            docs = render("--skip-schema-validation", *flags, "-f", odd_values)
        else:
            docs = render(*flags, "-f", odd_values)
        expected = benign_renders[shape]
        for key, value in mine.items():
            expected = swapped(expected, benign[key], value)
        assert ordered(comparable(docs)) == ordered(expected), f"{shape}: {mine}"


# ---------------------------------------------------------------------------------------------
# skaffold.yaml


def values_path_exists(values: dict, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def releases(skaffold: dict) -> list[tuple[str, dict]]:
    found = [("(default)", r) for r in skaffold["deploy"]["helm"]["releases"]]
    for profile in skaffold.get("profiles", []):
        for release in profile.get("deploy", {}).get("helm", {}).get("releases", []):
            found.append((profile["name"], release))
    return found


def test_skaffold_structure(skaffold: dict) -> None:
    match = re.fullmatch(r"skaffold/v(\d+)(?:beta(\d+))?", skaffold["apiVersion"])
    assert match, skaffold["apiVersion"]
    major, beta = int(match.group(1)), int(match.group(2) or 10**6)
    assert (major, beta) >= (4, 13), skaffold["apiVersion"]
    assert skaffold["kind"] == "Config"
    assert "manifests" not in skaffold or not skaffold["manifests"].get("rawYaml")
    (artifact,) = skaffold["build"]["artifacts"]
    assert artifact["image"] == "local/fedcifar"
    assert artifact["context"] == "."
    assert artifact["docker"]["dockerfile"] == "images/Dockerfile"
    assert artifact["docker"]["buildArgs"]["REQUIREMENTS"] == "images/requirements-cpu.txt"
    assert "BASE_IMAGE" in artifact["docker"]["buildArgs"]
    for where, release in releases(skaffold):
        assert Path(ROOT, release["chartPath"]).resolve() == CHART, where
        templates = release["setValueTemplates"]
        assert templates["image.repository"] == "{{.IMAGE_REPO_local_fedcifar}}", where
        assert templates["image.tag"] == "{{.IMAGE_TAG_local_fedcifar}}", where
    forwards = {(f["resourceType"], f["resourceName"], f["port"]) for f in skaffold["portForward"]}
    superlink = f"{skaffold['deploy']['helm']['releases'][0]['name']}-superlink"  # release "fedcifar"
    assert {
        ("service", superlink, 8000),
        ("service", f"{superlink}-metrics", 9400),
        ("deployment", superlink, 9093),
    } <= forwards
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert {"kind", "minikube", "gpu"} <= set(profiles)
    for name in ("kind", "minikube"):
        (release,) = profiles[name]["deploy"]["helm"]["releases"]
        assert release["setValues"].get("clients.gpu.enabled", False) is False
        assert any(key.endswith("resources.requests.cpu") for key in release["setValues"]), name
    gpu = profiles["gpu"]
    cuda = [a for a in gpu["build"]["artifacts"] if a["docker"]["buildArgs"]["REQUIREMENTS"].endswith("cuda.txt")]
    assert len(cuda) == 1 and cuda[0]["docker"]["dockerfile"] == "images/Dockerfile"
    sanitized = re.sub(r"[^A-Za-z0-9]", "_", cuda[0]["image"])
    (release,) = gpu["deploy"]["helm"]["releases"]
    assert release["setValues"]["clients.gpu.enabled"] is True
    assert release["setValueTemplates"]["clients.gpu.image.repository"] == f"{{{{.IMAGE_REPO_{sanitized}}}}}"
    assert release["setValueTemplates"]["clients.gpu.image.tag"] == f"{{{{.IMAGE_TAG_{sanitized}}}}}"


def test_skaffold_values_exist_and_render(skaffold: dict, values: dict) -> None:
    for where, release in releases(skaffold):
        args = []
        for section in ("setValues", "setValueTemplates"):
            for key, value in release.get(section, {}).items():
                assert values_path_exists(values, key), f"{where}: {section} {key} is not in values.yaml"
                if section == "setValueTemplates":  # what skaffold substitutes, roughly
                    value = "skaffold/fedcifar" if "IMAGE_REPO" in value else "dev-1234"
                args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        docs = render(*args)  # the schema accepts every profile's values
        assert find(docs, "StatefulSet")
