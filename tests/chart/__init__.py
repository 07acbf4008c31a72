"""Tests for the Helm chart in charts/fedcifar and for skaffold.yaml.

Offline and fast: `helm lint` and `helm template` (no cluster), the rendered manifests parsed
with PyYAML and validated with kubernetes-validate for Kubernetes 1.28 and 1.33.

    PATH=/var/cache/local-k8s/bin:$PATH pytest -q tests/chart

Every module is skipped when helm is neither on PATH nor at /var/cache/local-k8s/bin/helm
(``pytestmark = needs_helm``). Helpers are in support.py, the rendered value sets in conftest.py.
"""
