"""Fixtures of the chart tests: each value set rendered once for the whole folder, values.yaml, skaffold.yaml."""

from __future__ import annotations

import pytest
import yaml

from .support import (
    CERT_MANAGER_ARGS,
    CHART,
    EXISTING_SECRETS_ARGS,
    GPU_ARGS,
    HOSTPATH_DATA_ARGS,
    INSECURE_ARGS,
    MONITORING_API,
    MONITORING_ARGS,
    PVC_DATA_ARGS,
    RUN_ARGS,
    SERVER_ARGS,
    SITE_ARGS,
    SKAFFOLD,
    render,
)

# value sets, rendered once each


@pytest.fixture(scope="package")
def default_docs() -> list[dict]:
    return render()


@pytest.fixture(scope="package")
def gpu_docs() -> list[dict]:
    return render(*GPU_ARGS)


@pytest.fixture(scope="package")
def monitoring_docs() -> list[dict]:
    return render(*MONITORING_ARGS, "--api-versions", MONITORING_API)


@pytest.fixture(scope="package")
def monitoring_without_api_docs() -> list[dict]:
    return render(*MONITORING_ARGS)


@pytest.fixture(scope="package")
def pvc_data_docs() -> list[dict]:
    return render(*PVC_DATA_ARGS)


@pytest.fixture(scope="package")
def hostpath_data_docs() -> list[dict]:
    return render(*HOSTPATH_DATA_ARGS)


@pytest.fixture(scope="package")
def persistence_docs() -> list[dict]:
    return render(
        "--set",
        "superlink.persistence.enabled=true",
        "--set",
        "superlink.persistence.size=5Gi",
        "--set",
        "superlink.persistence.storageClassName=standard",
    )


@pytest.fixture(scope="package")
def mlflow_server_docs() -> list[dict]:
    """The release's own MLflow server, its store on the SuperLink's PVC."""
    return render("--set", "tracking.mlflow.server.enabled=true", "--set", "superlink.persistence.enabled=true")


@pytest.fixture(scope="package")
def run_docs() -> list[dict]:
    return render(*RUN_ARGS)


@pytest.fixture(scope="package")
def insecure_docs() -> list[dict]:
    return render(*INSECURE_ARGS)


@pytest.fixture(scope="package")
def cert_manager_docs() -> list[dict]:
    return render(*CERT_MANAGER_ARGS)


@pytest.fixture(scope="package")
def existing_secrets_docs() -> list[dict]:
    return render(*EXISTING_SECRETS_ARGS)


@pytest.fixture(scope="package")
def server_docs() -> list[dict]:
    return render(*SERVER_ARGS)


@pytest.fixture(scope="package")
def site_docs() -> list[dict]:
    return render(*SITE_ARGS)


@pytest.fixture(scope="package")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="package")
def skaffold() -> dict:
    return yaml.safe_load(SKAFFOLD.read_text())
