"""End-to-end fixtures: the cluster in $KUBECONFIG, the image, a real Prometheus, namespaces.

In CI ``../shared/k8s/up`` starts the cluster first; without a reachable cluster every test skips.
On failure, every test prints describe/logs of every pod of the release.
"""

from __future__ import annotations

import os
import string
import subprocess
import tomllib

import pytest
from kube import ROOT, dump_namespace, port_forward, run, wait_for
from kubernetes import client, config

APP_NS = "fedcifar-e2e"
ALERTS_NS = "fedcifar-e2e-alerts"  # test_alerts.py: a release whose run is made to stall
MON_NS = "fedcifar-e2e-monitoring"
# a cross-silo federation (test_cross_silo.py): a server release and two site releases
SERVER_NS, SITE_NAMESPACES = "fedcifar-e2e-server", ("fedcifar-e2e-site-a", "fedcifar-e2e-site-b")
SHARED_K8S = ROOT.parent / "shared" / "k8s"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE_REPO, IMAGE_TAG = "local/fedcifar", f"{VERSION}-cpu"
MLFLOW_IMAGE_REPO = "local/fedcifar-mlflow"
MLFLOW_IMAGE_TAG = (ROOT / "images" / "requirements-mlflow.txt").read_text().split("mlflow==")[1].split()[0]


def pytest_runtest_makereport(item, call):
    if call.when in ("setup", "call") and call.excinfo is not None and "kube" in item.fixturenames:
        for ns in (APP_NS, *getattr(item.module, "EXTRA_NAMESPACES", ())):
            item.add_report_section("call", f"cluster state {ns}", dump_namespace(ns))


@pytest.fixture(scope="session")
def kube() -> client.CoreV1Api:
    try:
        config.load_kube_config()
        core = client.CoreV1Api()
        core.list_namespace(limit=1, _request_timeout=10)
    except Exception as err:  # no kubeconfig, or nothing answering
        pytest.skip(f"no Kubernetes cluster reachable ({type(err).__name__}); CI starts one with ../shared/k8s/up")
    return core


@pytest.fixture(scope="session")
def image(kube) -> tuple[str, str]:
    """Build the CPU image into the cluster's Docker engine (docker's layer cache makes a rebuild quick)."""
    if os.environ.get("FEDCIFAR_E2E_SKIP_BUILD") != "1":
        done = subprocess.run(
            ["bash", str(ROOT / "images" / "build"), "cpu"], capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, f"image build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    run("docker", "image", "inspect", f"{IMAGE_REPO}:{IMAGE_TAG}")
    return IMAGE_REPO, IMAGE_TAG


@pytest.fixture(scope="session")
def mlflow_image(kube) -> tuple[str, str]:
    """The chart's MLflow server image (tracking.mlflow.server), built as the CPU image is."""
    if os.environ.get("FEDCIFAR_E2E_SKIP_BUILD") != "1":
        done = subprocess.run(
            ["bash", str(ROOT / "images" / "build"), "mlflow"], capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, f"image build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    run("docker", "image", "inspect", f"{MLFLOW_IMAGE_REPO}:{MLFLOW_IMAGE_TAG}")
    return MLFLOW_IMAGE_REPO, MLFLOW_IMAGE_TAG


@pytest.fixture(scope="session")
def batch(kube) -> client.BatchV1Api:
    return client.BatchV1Api()


def recreate_namespace(core: client.CoreV1Api, name: str) -> None:
    try:
        core.delete_namespace(name)
    except client.ApiException as err:
        if err.status != 404:
            raise

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except client.ApiException as err:
            return err.status == 404
        return False

    wait_for(f"namespace {name} deleted", gone, 180)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))


@pytest.fixture(scope="session")
def namespaces(kube):
    for ns in (APP_NS, MON_NS):
        recreate_namespace(kube, ns)
    yield APP_NS, MON_NS
    for ns in (APP_NS, MON_NS):
        kube.delete_namespace(ns)


@pytest.fixture(scope="session")
def prometheus(kube, namespaces) -> str:
    """A real Prometheus in its own namespace, scraping the app namespace and the cross-silo ones by pod
    annotations; yields its URL on localhost."""
    manifest = string.Template((ROOT / "k8s-tests" / "manifests" / "prometheus.yaml").read_text()).safe_substitute(
        MONITORING_NS=MON_NS,
        SCRAPED_NAMESPACES=",".join((APP_NS, ALERTS_NS, SERVER_NS, *SITE_NAMESPACES)),
        PROMETHEUS_IMAGE=shared_image("prometheus-image"),
        ALERTMANAGER_IMAGE=shared_image("alertmanager-image"),
    )
    run("kubectl", "apply", "-f", "-", input=manifest)
    for deployment in ("prometheus", "alertmanager", "alert-receiver"):
        run("kubectl", "-n", MON_NS, "rollout", "status", f"deploy/{deployment}", "--timeout=180s", timeout=200)
    with port_forward(MON_NS, "deploy/prometheus", 9090) as port:
        yield f"http://127.0.0.1:{port}"
    run("kubectl", "delete", "clusterrole,clusterrolebinding", f"fedcifar-e2e-prometheus-{MON_NS}", check=False)


def shared_image(script: str) -> str:
    """An image ../shared/k8s builds (prometheus-image, alertmanager-image): its name."""
    built = subprocess.run(["bash", str(SHARED_K8S / script)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    return built.stdout.strip().splitlines()[-1]
