"""TLS and SuperNode authentication: generated and cert-manager certificates, keys, existing Secrets."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .support import (
    CERT_MANAGER_API,
    CERT_MANAGER_ARGS,
    FULLNAME,
    container,
    env_of,
    find,
    mounts_of,
    needs_helm,
    pod_spec,
    render,
    render_error,
    secret_data,
    workloads,
)

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# TLS, SuperNode authentication and NetworkPolicies


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
    from fedcifar.deploy import key_formats

    private = secret_data(find(run_docs, "Secret", f"{FULLNAME}-supernode-keys"))
    public = secret_data(find(run_docs, "Secret", f"{FULLNAME}-supernode-public-keys"))
    assert sorted(private) == [f"supernode-{i}.key" for i in range(4)]
    assert sorted(public) == [f"supernode-{i}.pub" for i in range(4)]
    seen = set()
    for i in range(4):
        (tmp_path / "k").write_bytes(private[f"supernode-{i}.key"])
        converted = key_formats.openssh_private_key(tmp_path / "k", tmp_path / f"{i}.openssh")  # what the pod does
        key = serialization.load_ssh_private_key(converted.read_bytes(), None)  # what Flower does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        ssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert key_formats.openssh_public_key(public[f"supernode-{i}.pub"]) == ssh_public
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
