"""Helpers for the chart tests: where helm and the chart are, `helm template` and lookups in its output,
the value sets the fixtures of conftest.py render."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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
needs_helm = pytest.mark.skipif(
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


def secret_data(doc: dict) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in doc["data"].items()}
