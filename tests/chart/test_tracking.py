"""Experiment tracking in the chart: the tracking settings reach the SuperLink container alone, and the
release's own MLflow server listens on the SuperLink pod's loopback, seeing only its folder of the state."""

from __future__ import annotations

import pytest

from .support import (
    FULLNAME,
    SITE_ARGS,
    container,
    env_of,
    find,
    mounts_of,
    needs_helm,
    pod_spec,
    render,
    render_error,
    run_config_of,
)

pytestmark = needs_helm
SUPERLINK = f"{FULLNAME}-superlink"
TRACKING_ENV = {
    "MLFLOW_TRACKING_URI",
    "FEDCIFAR_MLFLOW_EXPERIMENT",
    "FEDCIFAR_MLFLOW_MODEL",
    "FEDCIFAR_MLFLOW_PER_SLOT",
}


def test_tracking_settings_reach_the_superlink_container_alone() -> None:
    docs = render(
        "--set", "tracking.mlflow.uri=https://mlflow.example.org",
        "--set", "tracking.mlflow.existingSecret=mlflow-credentials",
        "--set", "tracking.mlflow.experiment=cifar",
    )  # fmt: skip
    deploy = find(docs, "Deployment", SUPERLINK)
    superlink = container(deploy, "superlink")
    env = env_of(superlink)
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org" and env["FEDCIFAR_MLFLOW_EXPERIMENT"] == "cifar"
    assert {"secretRef": {"name": "mlflow-credentials"}} in superlink["envFrom"]
    others = [c for d in docs if d["kind"] in ("StatefulSet", "Job", "Pod") for c in pod_spec(d)["containers"]]
    others += [c for c in pod_spec(deploy)["containers"] if c["name"] != "superlink"]
    for c in others:
        assert not TRACKING_ENV & set(env_of(c)), c["name"]
        assert "mlflow-credentials" not in str(c.get("envFrom")), c["name"]
    assert not any("mlflow" in key or "mlflow" in value for key, value in run_config_of(docs).items())
    assert "mlflow" not in str(find(docs, "ConfigMap", f"{FULLNAME}-env"))


def test_the_releases_mlflow_server_listens_on_the_pods_loopback_alone(mlflow_server_docs) -> None:
    deploy = find(mlflow_server_docs, "Deployment", SUPERLINK)
    mlflow = container(deploy, "mlflow")
    args = mlflow["args"]
    assert mlflow["command"] == ["mlflow", "server"] and args[args.index("--host") + 1] == "127.0.0.1"
    assert "ports" not in mlflow  # nothing to publish: no Service, no probe from outside the pod
    assert "5000" not in str(find(mlflow_server_docs, "Service", SUPERLINK)["spec"]["ports"])
    assert env_of(container(deploy, "superlink"))["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    # its store and artifacts in the mlflow/ folder of the state volume (here the PVC), and nothing else of it
    state = "/var/lib/fedcifar"
    assert args[args.index("--backend-store-uri") + 1] == f"sqlite:///{state}/mlflow/mlflow.db"
    assert args[args.index("--artifacts-destination") + 1] == f"{state}/mlflow/artifacts"
    mounts = mounts_of(deploy, mlflow)
    mount, volume = mounts[f"{state}/mlflow"]
    assert mount["subPath"] == "mlflow" and "persistentVolumeClaim" in volume
    assert set(mounts) == {f"{state}/mlflow", "/tmp"}
    assert mlflow["securityContext"] == container(deploy, "superlink")["securityContext"]
    assert mlflow["readinessProbe"]["exec"]["command"][0] == "python3"


def test_without_the_server_the_pod_has_no_mlflow_container(default_docs) -> None:
    deploy = find(default_docs, "Deployment", SUPERLINK)
    assert [c["name"] for c in pod_spec(deploy)["containers"]] == ["superlink", "proxy"]
    assert "MLFLOW_TRACKING_URI" not in env_of(container(deploy, "superlink"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--set", "tracking.mlflow.server.enabled=true", "--set", "tracking.mlflow.uri=http://mlflow:5000"),
            "tracking.mlflow.uri (http://mlflow:5000) names another: set one of them",
        ),
        (
            ("--set", "tracking.mlflow.server.enabled=true", "--set", "tracking.mlflow.server.port=9095"),
            "superlink.outputsPort and tracking.mlflow.server.port are both 9095",
        ),
        (
            ("--set", "tracking.mlflow.server.enabled=true", *SITE_ARGS),
            "tracking.mlflow.server.enabled runs the MLflow server in the SuperLink pod",
        ),
        (
            ("--set", "tracking.mlflow.perSlot=true", "--set", "run.dp=server-fixed"),
            "tracking.mlflow.perSlot is refused under central DP",
        ),
    ],
)  # fmt: skip
def test_tracking_values_that_cannot_work_fail(args, expected) -> None:
    error = render_error(*args)
    assert expected in error, error
