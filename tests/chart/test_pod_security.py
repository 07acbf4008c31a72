"""Pod and container security contexts, service account tokens, the Helm test pod."""

from __future__ import annotations

from .support import FULLNAME, container, env_of, find, mounts_of, needs_helm, pod_spec, workloads

pytestmark = needs_helm


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
