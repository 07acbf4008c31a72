"""The chart on a real cluster: install with 3 clients on real data, train 2 rounds, observe, upgrade,
schedule on (advertised) GPUs, run `helm test`, uninstall. The tests run in file order on one release.

The release runs with the chart's defaults for security: TLS between every component and the
SuperLink, SuperNode authentication (one registered key per client), NetworkPolicies, and a public
port that serves the Fleet API alone. The cluster (v1.20, Docker's bridge) does not enforce
NetworkPolicies, so what is tested for real is TLS, authentication, the proxy and RBAC: a plaintext
SuperNode and one with an unregistered key do not get in; from another namespace the Control and
runtime APIs and /docs get 403 through the Service; the Control API answers through kubectl
port-forward for an identity with the rights and not for one without.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import APP_NS, MON_NS, SHARED_K8S
from kube import (
    CHART,
    PUBLIC_FACE_PROBE,
    ROOT,
    assert_fleet_api_alone,
    free_port,
    helm,
    pod_logs,
    pods,
    port_forward,
    prom_query,
    run,
    wait_for,
)

RELEASE = "e2e"
GPU_NS, GPU_RELEASE = "fedcifar-e2e-gpu", "gpu"
EXTRA_NAMESPACES = (GPU_NS,)
DATA = ROOT / "tests" / "data" / "cifar10-mini"  # 500 train + 200 test real images
CLIENTS_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=clients"
RUN_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=run"
SUPERLINK_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=superlink"
pytestmark = pytest.mark.e2e


def chart_values(image: tuple[str, str], mlflow_image: tuple[str, str], clients: int) -> list[str]:
    """Small requests so 4 clients fit a 2-core node; real data from a hostPath volume; the release's
    own MLflow server."""
    repo, tag = image
    sets = {
        "image.repository": repo,
        "image.tag": tag,
        "tracking.mlflow.server.enabled": "true",
        "tracking.mlflow.server.image.repository": mlflow_image[0],
        "tracking.mlflow.server.image.tag": mlflow_image[1],
        "tracking.mlflow.server.resources.requests.cpu": "10m",
        "clients.replicas": clients,
        "run.rounds": 2,
        "run.fractionEvaluate": "1.0",
        "run.dp": "server-fixed",  # central DP: the privacy panels have data, the image has the accountant
        "run.noiseMultiplier": "0.1",
        "data.source": "volume",
        "data.volume.hostPath": str(DATA),
        "superlink.resources.requests.cpu": "100m",
        "clients.resources.requests.cpu": "100m",
        "run.resources.requests.cpu": "10m",
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def job_succeeded(kube_batch, revision: int) -> bool:
    for job in kube_batch.list_namespaced_job(APP_NS, label_selector=RUN_SELECTOR).items:
        if job.metadata.name.endswith(f"-{revision}"):
            if job.status.failed:
                raise AssertionError(f"run job {job.metadata.name} failed")
            return bool(job.status.succeeded)
    return False


def ordinal(pod_name: str) -> int:
    return int(re.search(r"-(\d+)$", pod_name).group(1))


def check_partitions(kube, prometheus: str, clients: int) -> None:
    """Every client pod trained on the partition equal to its ordinal, out of `clients`."""
    client_pods = [p for p in pods(kube, APP_NS, CLIENTS_SELECTOR) if p.metadata.deletion_timestamp is None]
    assert sorted(ordinal(p.metadata.name) for p in client_pods) == list(range(clients))
    for pod in client_pods:
        i = ordinal(pod.metadata.name)
        assert f"partition {i} of {clients}" in pod_logs(kube, APP_NS, pod.metadata.name)

    def scraped_all() -> list[dict] | None:
        series = prom_query(prometheus, f'fedcifar_client_info{{namespace="{APP_NS}",num_partitions="{clients}"}}')
        return series if len({s["metric"]["pod"] for s in series}) == clients else None

    series = wait_for(f"Prometheus to scrape fedcifar_client_info of {clients} clients", scraped_all, 120, 2)
    for s in series:
        assert ordinal(s["metric"]["pod"]) == int(s["metric"]["partition"]), s["metric"]
        assert s["metric"]["device"] == "cpu"  # no CUDA device here: the fallback is labelled


@pytest.fixture(scope="module")
def release(kube, image, mlflow_image, prometheus, batch):
    helm(
        "install", RELEASE, str(CHART), "-n", APP_NS, *chart_values(image, mlflow_image, 3), "--wait", "--timeout", "5m"
    )
    wait_for("the run job of revision 1 to succeed", lambda: job_succeeded(batch, 1), 900, 3)
    yield RELEASE
    helm("uninstall", RELEASE, "-n", APP_NS, check=False)


def test_training_ran_on_every_partition(kube, release, prometheus):
    check_partitions(kube, prometheus, 3)
    completed = wait_for(
        "the server's rounds_completed to reach 2",
        lambda: [
            s
            for s in prom_query(prometheus, f'fedcifar_rounds_completed_total{{namespace="{APP_NS}"}}')
            if float(s["value"][1]) == 2
        ],
        60,
        2,
    )
    assert completed
    trained = prom_query(prometheus, f'fedcifar_client_examples_trained_total{{namespace="{APP_NS}"}}')
    assert sorted(s["metric"]["partition"] for s in trained) == ["0", "1", "2"]
    assert sum(float(s["value"][1]) for s in trained) == 2 * 500  # 2 rounds over all 500 train images


def test_prometheus_scraped_the_server_and_every_client(release, prometheus):
    up = prom_query(prometheus, f'up{{namespace="{APP_NS}"}} == 1')
    components = sorted(s["metric"].get("component", "") for s in up)
    assert components == ["clients", "clients", "clients", "superlink"], up


def dashboard_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        panels = list(board["panels"])
        for panel in list(panels):
            panels.extend(panel.get("panels", []))  # panels inside collapsed rows
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((path.name, panel.get("title", "?"), target["expr"]))
    return found


def test_every_dashboard_query_returns_data(release, prometheus):
    queries = dashboard_queries()
    assert len(queries) >= 8
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "30s",
        "$__range": "1h",
        "${namespace}": APP_NS,
        "$namespace": APP_NS,
        "$site": RELEASE,
    }  # the site: the release name
    empty = []
    for board, title, expr in queries:
        query = expr
        for var, value in substitutions.items():
            query = query.replace(var, value)
        assert "$" not in query, f"{board} / {title}: unhandled variable in {expr}"
        if not prom_query(prometheus, query):
            empty.append(f"{board} / {title}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_helm_test_passes(release):
    done = helm("test", RELEASE, "-n", APP_NS, "--timeout", "5m")
    assert "Phase:          Succeeded" in done.stdout or "Succeeded" in done.stdout, done.stdout


SUPERLINK = f"{RELEASE}-fedcifar-superlink"
TLS_SECRET = f"{SUPERLINK}-tls"
CONTROL_PORT = 9093  # Flower on the SuperLink pod's loopback (superlink.controlPort)


@pytest.fixture(scope="module")
def ca_file(kube, release, tmp_path_factory) -> Path:
    """The release's CA certificate, from its TLS Secret."""
    secret = kube.read_namespaced_secret(TLS_SECRET, APP_NS)
    path = tmp_path_factory.mktemp("tls") / "ca.crt"
    path.write_bytes(base64.b64decode(secret.data["ca.crt"]))
    return path


def flwr_control(port: int, ca: Path, home: Path, *command: str) -> dict:
    """A ``flwr`` command's JSON reply from the SuperLink's Control API (port-forwarded, as the README
    says), over TLS."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *command, "e2e", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"},
    )
    reply = json.loads(done.stdout[done.stdout.index("{") :])
    assert reply["success"], reply
    return reply


def flwr_nodes(port: int, ca: Path, home: Path) -> list[dict]:
    return flwr_control(port, ca, home, "supernode", "ls")["nodes"]


def test_superlink_speaks_only_tls_and_knows_only_the_release_clients(kube, release, ca_file, tmp_path):
    with port_forward(APP_NS, f"svc/{SUPERLINK}", 8000) as port:
        context = ssl.create_default_context(cafile=str(ca_file))  # the certificate is valid for 127.0.0.1
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=10, context=context) as reply:
            assert reply.status == 200
        with pytest.raises(urllib.error.HTTPError, match="400"):  # plain HTTP on the same port is refused
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # nor does a client that trusts another CA
            urllib.request.urlopen(
                f"https://127.0.0.1:{port}/health", timeout=10, context=ssl.create_default_context()
            ).read()
    with port_forward(APP_NS, f"deploy/{SUPERLINK}", CONTROL_PORT) as port:
        nodes = flwr_nodes(port, ca_file, tmp_path / "flwr")
    assert len(nodes) == 3 and {n["status"] for n in nodes} == {"online"}, nodes  # the 3 registered clients
    log = run("kubectl", "-n", APP_NS, "logs", f"deploy/{SUPERLINK}", "-c", "superlink").stdout
    assert "3 SuperNode keys registered; ready" in log
    client = pods(kube, APP_NS, CLIENTS_SELECTOR)[0].metadata.name
    listing = run("kubectl", "-n", APP_NS, "exec", client, "--", "ls", "/etc/fedcifar/supernode").stdout.split()
    assert listing == ["supernode.key"]  # its own key only (subPathExpr), not the other clients'


def intruder_pod(name: str, image: tuple[str, str], args: list[str], key_secret: str | None = None) -> dict:
    """A bare flower-supernode pod, locked down like the chart's pods, pointed at the release's SuperLink."""
    repo, tag = image
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "ca", "mountPath": "/etc/fedcifar/tls", "readOnly": True}]
    volumes = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "ca", "secret": {"secretName": TLS_SECRET, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]
    if key_secret:
        mounts.append({"name": "key", "mountPath": "/etc/intruder", "readOnly": True})
        volumes.append({"name": "key", "secret": {"secretName": key_secret, "defaultMode": 0o440}})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": APP_NS, "labels": {"fedcifar-e2e": "intruder"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "supernode",
                    "image": f"{repo}:{tag}",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["flower-supernode", "--superlink", f"{SUPERLINK}:8000", *args],
                    "env": [
                        {"name": "FLWR_HOME", "value": "/tmp/flwr"},
                        {"name": "FLWR_TELEMETRY_ENABLED", "value": "0"},
                    ],
                    "resources": {"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def test_unregistered_and_plaintext_supernodes_are_refused(kube, release, image, ca_file, tmp_path):
    """Two SuperNodes from inside the namespace: one with TLS but a key the SuperLink never registered,
    one speaking plaintext. Neither gets in; the 3 registered clients stay the only nodes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "supernode.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    run(
        "kubectl",
        "-n",
        APP_NS,
        "create",
        "secret",
        "generic",
        "intruder-key",
        f"--from-file=supernode.key={tmp_path / 'supernode.key'}",
    )
    manifests = [
        intruder_pod(
            "unregistered-supernode",
            image,
            [
                "--root-certificates",
                "/etc/fedcifar/tls/ca.crt",
                "--auth-supernode-private-key",
                "/etc/intruder/supernode.key",
            ],
            "intruder-key",
        ),
        intruder_pod("plaintext-supernode", image, ["--insecure", "--max-wait-time", "15"]),
    ]
    try:
        run("kubectl", "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

        def finished() -> list | None:
            found = [kube.read_namespaced_pod(m["metadata"]["name"], APP_NS) for m in manifests]
            return found if all(p.status.phase in ("Succeeded", "Failed") for p in found) else None

        unregistered, plaintext = wait_for("both intruders to give up", finished, 180, 2)
        assert unregistered.status.phase == "Failed" and plaintext.status.phase == "Failed"
        log = pod_logs(kube, APP_NS, "unregistered-supernode")
        assert "[code: 2004] Failed to activate SuperNode." in log, log  # the SuperLink does not know its key
        log = pod_logs(kube, APP_NS, "plaintext-supernode")
        # the proxy's TLS port answers plaintext with 400: Flower gives up at once (exit code 305)
        assert "400 Bad Request" in log and "SuperNode ID" not in log, log
        with port_forward(APP_NS, f"deploy/{SUPERLINK}", CONTROL_PORT) as port:
            nodes = flwr_nodes(port, ca_file, tmp_path / "flwr")
        assert len(nodes) == 3 and {n["status"] for n in nodes} == {"online"}, nodes
    finally:
        run("kubectl", "-n", APP_NS, "delete", "pod,secret", "-l", "fedcifar-e2e=intruder", "--wait=false", check=False)
        run("kubectl", "-n", APP_NS, "delete", "secret", "intruder-key", "--wait=false", check=False)


# What anyone who reaches the public port gets, run from a pod in another namespace: the CA (it is
# public) and no key. Raw requests verify nothing; the flwr CLI verifies the SuperLink with the CA.
def test_public_port_serves_the_fleet_api_alone(kube, release, image, ca_file):
    """From another namespace, through the SuperLink's Service: the Control and runtime APIs and the docs
    get 403 with a sentence, whoever asks; flwr run, flwr ls and key registration fail."""
    repo, tag = image
    run("kubectl", "-n", MON_NS, "create", "configmap", "superlink-ca", f"--from-file=ca.crt={ca_file}")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "outsider", "namespace": MON_NS},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "outsider",
                    "image": f"{repo}:{tag}",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", PUBLIC_FACE_PROBE],
                    "env": [
                        {"name": "SUPERLINK", "value": f"{SUPERLINK}.{APP_NS}:8000"},
                        {"name": "SUPERLINK_CA", "value": "/etc/ca/ca.crt"},
                        {"name": "FLWR_TELEMETRY_ENABLED", "value": "0"},
                    ],
                    "resources": {"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "ca", "mountPath": "/etc/ca"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "ca", "configMap": {"name": "superlink-ca"}}],
        },
    }
    try:
        run("kubectl", "apply", "-f", "-", input=json.dumps(pod))
        done = wait_for(
            "the outsider pod to finish",
            lambda: kube.read_namespaced_pod("outsider", MON_NS).status.phase in ("Succeeded", "Failed"),
            180,
            2,
        )
        log = pod_logs(kube, MON_NS, "outsider")
        assert done and "RESULT " in log, log
        out = json.loads(log.split("RESULT ", 1)[1])
    finally:
        run("kubectl", "-n", MON_NS, "delete", "pod/outsider", "configmap/superlink-ca", "--wait=false", check=False)
    assert_fleet_api_alone(out)


def test_control_api_answers_through_port_forward_only_with_the_rights(kube, release, ca_file, tmp_path):
    """The README's operator path: kubectl port-forward + flwr, guarded by RBAC (pods/portforward)."""
    with port_forward(APP_NS, f"deploy/{SUPERLINK}", CONTROL_PORT) as port:  # the admin here
        runs = flwr_control(port, ca_file, tmp_path / "flwr", "ls")["runs"]
    assert "finished:completed" in [r["status"] for r in runs], runs  # the run Job's, through the same path
    run("kubectl", "-n", APP_NS, "create", "serviceaccount", "viewer")
    run(
        "kubectl",
        "-n",
        APP_NS,
        "create",
        "rolebinding",
        "viewer",
        "--clusterrole=view",
        f"--serviceaccount={APP_NS}:viewer",
    )
    try:  # Kubernetes' built-in `view`: may read the pods, may not forward to them
        denied = run(
            "kubectl",
            "-n",
            APP_NS,
            "--as",
            f"system:serviceaccount:{APP_NS}:viewer",
            "port-forward",
            f"deploy/{SUPERLINK}",
            f"{free_port()}:{CONTROL_PORT}",
            check=False,
            timeout=30,
        )
    finally:
        run("kubectl", "-n", APP_NS, "delete", "rolebinding/viewer", "serviceaccount/viewer", check=False)
    assert denied.returncode != 0 and 'cannot create resource "pods/portforward"' in denied.stderr, denied.stderr
    job_account = f"system:serviceaccount:{APP_NS}:{RELEASE}-fedcifar-run"
    for question, allowed in (
        (["create", "pods", "--subresource=portforward"], "yes"),
        (["list", "pods"], "yes"),
        (["get", "secrets"], "no"),
        (["create", "pods", "--subresource=exec"], "no"),
        (["create", "pods"], "no"),
    ):
        answer = run("kubectl", "-n", APP_NS, "auth", "can-i", *question, "--as", job_account, check=False)
        assert answer.stdout.strip() == allowed, (question, answer.stdout, answer.stderr)


def pull(kubeconfig: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedcifar", "pull", RELEASE, "-n", APP_NS, "--out", str(out), *args]
    return run(*command, check=False, timeout=120, env={**os.environ, "KUBECONFIG": kubeconfig})


def viewer_kubeconfig(kube, folder: Path) -> Path:
    """A kubeconfig that acts as ServiceAccount ``viewer`` (its token; Kubernetes 1.20 makes one)."""
    name = wait_for(
        "viewer's token",
        lambda: [s.name for s in kube.read_namespaced_service_account("viewer", APP_NS).secrets or []],
        30,
    )[0]
    token = base64.b64decode(kube.read_namespaced_secret(name, APP_NS).data["token"]).decode()
    config = json.loads(run("kubectl", "config", "view", "--raw", "--minify", "-o", "json").stdout)
    config["users"] = [{"name": "viewer", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "viewer"
    path = folder / "viewer.kubeconfig"
    path.write_text(json.dumps(config))
    return path


def test_fedcifar_pull_fetches_a_runs_outputs_with_the_port_forward_right_alone(kube, release, tmp_path):
    """The operator fetches the run's four files through the outputs port on the pod's loopback; the
    built-in `view` role, which may read the pods but not forward to them, is refused."""
    admin = pull(os.environ["KUBECONFIG"], tmp_path / "admin", "--revision", "1")
    assert admin.returncode == 0, admin.stderr
    fetched = tmp_path / "admin"
    assert sorted(p.name for p in fetched.iterdir()) == ["best-model.pt", "history.json", "history.png", "model.pt"]
    history = json.loads((fetched / "history.json").read_text())
    assert history["status"] == "completed"
    assert torch_load(fetched / "best-model.pt")["round"] == history["best"]["round"]
    run("kubectl", "-n", APP_NS, "create", "serviceaccount", "viewer")
    run(
        "kubectl",
        "-n",
        APP_NS,
        "create",
        "rolebinding",
        "viewer",
        "--clusterrole=view",
        f"--serviceaccount={APP_NS}:viewer",
    )
    try:
        denied = pull(str(viewer_kubeconfig(kube, tmp_path)), tmp_path / "viewer")
    finally:
        run("kubectl", "-n", APP_NS, "delete", "rolebinding/viewer", "serviceaccount/viewer", check=False)
    assert denied.returncode == 1 and "refused a port-forward" in " ".join(
        denied.stdout.split() + denied.stderr.split()
    )
    assert not (tmp_path / "viewer").exists()


MLFLOW_PORT = 5000  # the release's MLflow server, on the SuperLink pod's loopback (tracking.mlflow.server.port)
# what a pod of the namespace tries: write to the MLflow server at the SuperLink pod's address
MLFLOW_WRITE_PROBE = r"""
import json, os, urllib.error, urllib.request
out = {}
for host in (os.environ["POD_IP"], os.environ["SERVICE"]):
    request = urllib.request.Request(f"http://{host}:5000/api/2.0/mlflow/experiments/create", method="POST",
                                     data=b'{"name": "intruder"}', headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            out[host] = f"HTTP {reply.status}"
    except urllib.error.HTTPError as err:
        out[host] = f"HTTP {err.code}"
    except OSError as err:
        out[host] = f"unreachable: {getattr(err, 'reason', err)}"
print("RESULT " + json.dumps(out))
"""


def mlflow_api(port: int, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_the_releases_mlflow_server_holds_the_run_and_takes_no_write_from_a_pod(kube, release, mlflow_image):
    """Through the admin's port-forward, MLflow's REST API shows the run of revision 1 with a step per round
    of every figure and both registered models; a pod of the namespace cannot reach it to write."""
    with port_forward(APP_NS, f"deploy/{SUPERLINK}", MLFLOW_PORT) as port:
        experiment = mlflow_api(port, "experiments/get-by-name?experiment_name=fedcifar")["experiment"]
        runs = mlflow_api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        (tracked,) = [r for r in runs if {"key": "fedcifar.revision", "value": "1"} in r["data"]["tags"]]
        assert tracked["info"]["status"] == "FINISHED", tracked["info"]
        tags = {t["key"]: t["value"] for t in tracked["data"]["tags"]}
        assert tags["fedcifar.release"] == RELEASE and tags["fedcifar.image"].startswith("local/fedcifar:"), tags
        run_id = tracked["info"]["run_id"]
        for key in ("eval_accuracy", "eval_loss", "train_loss", "round_seconds", "participating_clients", "epsilon"):
            history = mlflow_api(port, f"metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]
            assert sorted(m["step"] for m in history) == [1, 2], (key, history)
        model = mlflow_api(port, "registered-models/get?name=fedcifar-cifar10")["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model["aliases"]}
        versions = mlflow_api(port, "model-versions/search?filter=name%3D%27fedcifar-cifar10%27")["model_versions"]
        mine = {v["version"] for v in versions if v["run_id"] == run_id}
        assert len(mine) == 2 and {aliases["best"], aliases["last"]} <= mine, (aliases, mine)  # the only run yet
    superlink = [p for p in pods(kube, APP_NS, SUPERLINK_SELECTOR) if p.metadata.deletion_timestamp is None][0]
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mlflow-writer", "namespace": APP_NS},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "writer",
                    "image": ":".join(mlflow_image),
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", MLFLOW_WRITE_PROBE],
                    "env": [
                        {"name": "POD_IP", "value": superlink.status.pod_ip},
                        {"name": "SERVICE", "value": SUPERLINK},
                    ],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    try:
        run("kubectl", "apply", "-f", "-", input=json.dumps(probe))
        wait_for(
            "the writer pod to finish",
            lambda: kube.read_namespaced_pod("mlflow-writer", APP_NS).status.phase in ("Succeeded", "Failed"),
            120,
            2,
        )
        log = pod_logs(kube, APP_NS, "mlflow-writer")
    finally:
        run("kubectl", "-n", APP_NS, "delete", "pod/mlflow-writer", "--wait=false", check=False)
    assert "RESULT " in log, log
    out = json.loads(log.split("RESULT ", 1)[1])
    # nothing listens on the pod's address (refused), and the Service has no such port: no HTTP answer at all
    assert len(out) == 2 and all(v.startswith("unreachable: ") for v in out.values()), out
    assert "Connection refused" in out[superlink.status.pod_ip], out


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def test_network_policies_exist(release):
    names = run(
        "kubectl", "-n", APP_NS, "get", "networkpolicy", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    ).stdout.split()
    assert sorted(names) == [
        f"networkpolicy.networking.k8s.io/{RELEASE}-fedcifar-{n}" for n in ("clients", "run", "superlink")
    ]


def test_gpu_clients_schedule_only_where_gpus_are_free(kube, image):
    """2 advertised nvidia.com/gpu, 3 clients asking 1 each: 2 scheduled, 1 Pending for the scheduler's reason."""
    run("bash", str(SHARED_K8S / "advertise-gpus"), "2")
    run("kubectl", "create", "namespace", GPU_NS, check=False)
    repo, tag = image
    try:
        helm(
            "install",
            GPU_RELEASE,
            str(CHART),
            "-n",
            GPU_NS,
            "--set",
            "clients.replicas=3",
            "--set",
            "clients.gpu.enabled=true",
            "--set",
            "clients.gpu.count=1",
            "--set",
            f"clients.gpu.image.repository={repo}",
            "--set",
            f"clients.gpu.image.tag={tag}",
            "--set",
            f"image.repository={repo}",
            "--set",
            f"image.tag={tag}",
            "--set",
            "run.enabled=false",
            "--set",
            "clients.resources.requests.cpu=50m",
            "--set",
            "superlink.resources.requests.cpu=50m",
        )
        selector = f"app.kubernetes.io/instance={GPU_RELEASE},app.kubernetes.io/component=clients"

        def settled():
            found = pods(kube, GPU_NS, selector)
            if len(found) != 3:
                return None
            scheduled = [p for p in found if _condition(p, "PodScheduled") == "True"]
            pending = [p for p in found if _condition(p, "PodScheduled") == "False"]
            return (scheduled, pending) if len(scheduled) == 2 and len(pending) == 1 else None

        scheduled, pending = wait_for("2 GPU clients scheduled and 1 pending", settled, 120, 2)
        for pod in scheduled:
            limits = pod.spec.containers[0].resources.limits
            assert limits["nvidia.com/gpu"] == "1"
        reason = next(c for c in pending[0].status.conditions if c.type == "PodScheduled")
        assert reason.reason == "Unschedulable"
        assert "Insufficient nvidia.com/gpu" in reason.message, reason.message
        assert pending[0].status.phase == "Pending"
    finally:
        helm("uninstall", GPU_RELEASE, "-n", GPU_NS, "--wait", check=False)
        run("kubectl", "delete", "namespace", GPU_NS, "--wait=false", check=False)
        run("bash", str(SHARED_K8S / "advertise-gpus"), "0", check=False)


def _condition(pod, kind: str) -> str | None:
    for cond in pod.status.conditions or []:
        if cond.type == kind:
            return cond.status
    return None


KEYS_AT_INSTALL: dict = {}
TLS_AT_INSTALL: dict = {}


def test_upgrade_to_four_clients_repartitions(kube, release, prometheus, image, mlflow_image, batch):
    KEYS_AT_INSTALL.update(kube.read_namespaced_secret(f"{RELEASE}-fedcifar-supernode-keys", APP_NS).data)
    TLS_AT_INSTALL.update(kube.read_namespaced_secret(TLS_SECRET, APP_NS).data)
    helm(
        "upgrade", RELEASE, str(CHART), "-n", APP_NS, *chart_values(image, mlflow_image, 4), "--wait", "--timeout", "5m"
    )
    wait_for("the run job of revision 2 to succeed", lambda: job_succeeded(batch, 2), 900, 3)
    check_partitions(kube, prometheus, 4)
    # every re-created pod trained its new partition in both rounds of the new run, nothing twice
    query = f'fedcifar_client_examples_trained_total{{namespace="{APP_NS}"}}'

    def all_trained() -> list[dict] | None:
        series = prom_query(prometheus, query)
        total = sum(float(s["value"][1]) for s in series)
        return series if len(series) == 4 and total == 2 * 500 else None

    series = wait_for("4 partitions trained 2 rounds over all 500 images", all_trained, 60, 2)
    assert sorted(int(s["metric"]["partition"]) for s in series) == [0, 1, 2, 3]
    # the upgrade kept the 3 existing SuperNode keys and the TLS certificate, and added one key
    keys = kube.read_namespaced_secret(f"{RELEASE}-fedcifar-supernode-keys", APP_NS).data
    assert sorted(keys) == [f"supernode-{i}.key" for i in range(4)]
    assert {k: keys[k] for k in sorted(keys)[:3]} == KEYS_AT_INSTALL
    assert kube.read_namespaced_secret(TLS_SECRET, APP_NS).data == TLS_AT_INSTALL


def test_uninstall_leaves_nothing_behind(kube, release):
    helm("uninstall", RELEASE, "-n", APP_NS, "--wait", "--timeout", "3m")
    kinds = "all,configmap,secret,pvc,serviceaccount,role,rolebinding,job"

    def nothing_left() -> bool:
        listed = run(
            "kubectl", "-n", APP_NS, "get", kinds, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
        ).stdout.split()
        releases = run("kubectl", "-n", APP_NS, "get", "secret", "-l", f"owner=helm,name={RELEASE}", "-o", "name")
        return not listed and not releases.stdout.split()

    wait_for("every object of the release to be deleted", nothing_left, 180, 2)
    assert not pods(kube, APP_NS, f"app.kubernetes.io/instance={RELEASE}")
