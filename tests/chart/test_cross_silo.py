"""Cross-silo shapes: a server release holding the SuperLink and the run, site releases holding SuperNodes."""

from __future__ import annotations

import ipaddress
import json

from cryptography import x509

from .support import (
    FULLNAME,
    RELEASE,
    container,
    env_of,
    find,
    job_arg,
    kinds,
    mounts_of,
    needs_helm,
    pod_spec,
    render,
    run_config_of,
    secret_data,
    workloads,
)

pytestmark = needs_helm


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
