"""Helpers for the end-to-end tests: deadline-bounded waits, helm/kubectl/docker calls, diagnostics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedcifar"
SAMPLE = ROOT / "tests" / "data" / "cifar10-mini"  # 500 train + 200 test real images


def small_release(image: tuple[str, str], values: dict) -> list[str]:
    """``--set`` flags of a release with 2 clients on the test sample (hostPath) and small CPU requests,
    so that it fits the 2-core node beside the others; ``values`` added or overriding."""
    repo, tag = image
    sets = {
        "image.repository": repo,
        "image.tag": tag,
        "clients.replicas": 2,
        "data.source": "volume",
        "data.volume.hostPath": str(SAMPLE),
        "superlink.resources.requests.cpu": "100m",
        "clients.resources.requests.cpu": "100m",
        "run.resources.requests.cpu": "10m",
        **values,
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 1.0) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except Exception as err:  # a probe may race object creation; keep polling until the deadline
            last = err
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def binary(name: str) -> str:
    found = shutil.which(name) or (
        f"/var/cache/local-k8s/bin/{name}" if os.path.exists(f"/var/cache/local-k8s/bin/{name}") else None
    )
    if not found:
        raise FileNotFoundError(f"{name} not found on PATH")
    return found


def run(*cmd: str, timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run([binary(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def helm(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return run("helm", *args, timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def port_forward(namespace: str, target: str, remote_port: int) -> Iterator[int]:
    """``kubectl port-forward`` to 127.0.0.1:<free port>; yields the local port."""
    local = free_port()
    proc = subprocess.Popen(
        [
            binary("kubectl"),
            "-n",
            namespace,
            "port-forward",
            target,
            f"{local}:{remote_port}",
            "--address",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"port-forward to {target} exited: {proc.stderr.read()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", local)) == 0

        wait_for(f"port-forward to {namespace}/{target}:{remote_port}", ready, 30, 0.2)
        yield local
    finally:
        proc.terminate()
        proc.wait(10)


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def prom_query(base_url: str, query: str) -> list[dict]:
    """Instant query; returns the result vector (raises on a PromQL error)."""
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(http_get(url))
    if reply.get("status") != "success":
        raise AssertionError(f"query {query!r} failed: {reply}")
    return reply["data"]["result"]


def pods(core: client.CoreV1Api, namespace: str, selector: str = "") -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def run_history(namespace: str, superlink: str, revision: int) -> dict:
    """The ``history.json`` of the run of Helm revision ``revision``, read in the SuperLink container of
    ``superlink`` (a pod's name, or ``deploy/<name>``)."""
    path = f"/var/lib/fedcifar/runs/revision-{revision}/history.json"
    return json.loads(run("kubectl", "-n", namespace, "exec", superlink, "-c", "superlink", "--", "cat", path).stdout)


def pod_logs(
    core: client.CoreV1Api, namespace: str, name: str, container: str | None = None, previous: bool = False
) -> str:
    try:
        return core.read_namespaced_pod_log(name, namespace, container=container, previous=previous)
    except client.ApiException as err:
        return f"(no log: {err.reason})"


def dump_namespace(namespace: str) -> str:
    """Describe every pod and print its logs: what a failing end-to-end test shows."""
    parts = [f"===== namespace {namespace}"]
    for cmd in (["get", "all,pvc,configmap,events", "-o", "wide"], ["describe", "pods"]):
        done = run("kubectl", "-n", namespace, *cmd, check=False, timeout=60)
        parts.append(f"$ kubectl -n {namespace} {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    names = run("kubectl", "-n", namespace, "get", "pods", "-o", "name", check=False).stdout.split()
    for name in names:
        done = run("kubectl", "-n", namespace, "logs", name, "--all-containers", "--tail", "80", check=False)
        parts.append(f"----- logs {name}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


# Run inside a pod (python3 -c): what the SuperLink's public face answers to anyone holding its CA
# ($SUPERLINK host:port, $SUPERLINK_CA) but no registered key; prints "RESULT <json>".
PUBLIC_FACE_PROBE = r"""
import json, os, ssl, subprocess, urllib.error, urllib.request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
base, out = os.environ["SUPERLINK"], {}
for method, path in [("GET", "/health"), ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/list-nodes"),
                     ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/openapi.json")]:
    request = urllib.request.Request(f"https://{base}{path}", data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context()) as reply:
            out[path] = [reply.status, reply.read().decode()[:300]]
    except urllib.error.HTTPError as err:
        out[path] = [err.code, err.read().decode()[:300]]
home = "/tmp/flwr"
os.makedirs(home, exist_ok=True)
ca = os.environ["SUPERLINK_CA"]
open(f"{home}/config.toml", "w").write(f'[superlink.site]\naddress = "{base}"\nroot-certificates = "{ca}"\n')
key = ec.generate_private_key(ec.SECP256R1()).public_key()
open("/tmp/probe.pub", "wb").write(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
for name, args in [("flwr ls", ["ls", "site"]),
                   ("flwr supernode register", ["supernode", "register", "/tmp/probe.pub", "site"]),
                   ("flwr run", ["run", "/app", "site"])]:
    done = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FLWR_HOME": home})
    out[name] = done.stdout[done.stdout.find("{"):] or done.stderr[-500:]
print("RESULT " + json.dumps(out))
"""


# Run inside a site's SuperNode pod (python3 -c): that site, holding its node's registered key
# ($KEY, its node id in $NODE_ID_FILE), tries to act for another site's node ($VICTIM) through the
# public face ($SUPERLINK, $SUPERLINK_CA) with Flower's own Fleet client and signer: an instruction
# injected to the victim, and a reply in the victim's name; prints "RESULT <json>" (status, Flower error).
FLEET_ATTACK_PROBE = r"""
import json, os, time
from pathlib import Path
import httpx
from flwr.app import MetricRecord, RecordDict
from flwr.app.message.message import make_message, remove_content_from_message
from flwr.app.metadata import Metadata
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from fedcifar.deploy.key_formats import load_private_key
key = load_private_key(Path(os.environ["KEY"]).read_bytes())
own, victim = int(Path(os.environ["NODE_ID_FILE"]).read_text()), int(os.environ["VICTIM"])
client = FleetHttpClient.from_server_address(
    os.environ["SUPERLINK"], False, Path(os.environ["SUPERLINK_CA"]).read_bytes(),
    [NodeAuthHttpInterceptor(key, key.public_key())]
)
def push(src, dst, reply_to=""):
    meta = Metadata(1, "", src, dst, reply_to, "1", time.time(), 3600.0, "train")
    message = make_message(meta, RecordDict({"metrics": MetricRecord({"partition-id": 2})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    request = PushMessagesRequest(node=Node(node_id=own), messages_list=[message_to_proto(
        remove_content_from_message(message))], message_object_trees=[get_object_tree(message)])
    try:
        client.PushMessages(request)
        return [200, "stored"]
    except httpx.HTTPStatusError as err:
        return [err.response.status_code, err.response.json()]
out = {"instruction to the victim": push(1, victim), "reply in the victim's name": push(victim, 1, "0" * 64)}
print("RESULT " + json.dumps(out))
"""


def assert_fleet_api_alone(out: dict) -> None:
    """PUBLIC_FACE_PROBE's result: /health answers, everything but the Fleet API gets 403 with a sentence."""
    assert out["/health"][0] == 200, out
    for path in (
        "/v1/control/list-runs",
        "/v1/control/list-nodes",
        "/v1/runtime/acquire-task",
        "/docs",
        "/openapi.json",
    ):
        status, body = out[path]
        assert status == 403 and body.startswith("fedcifar: this port serves only Flower's Fleet API"), (
            path,
            out[path],
        )
    for command in ("flwr ls", "flwr supernode register", "flwr run"):
        assert '"success": false' in out[command] and "403" in out[command], (command, out[command])
