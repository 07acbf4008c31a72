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
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from kubernetes import client

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedcifar"
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
    found = shutil.which(name) or (f"/var/cache/local-k8s/bin/{name}" if os.path.exists(f"/var/cache/local-k8s/bin/{name}") else None)
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
        [binary("kubectl"), "-n", namespace, "port-forward", target, f"{local}:{remote_port}",
         "--address", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
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


def pod_logs(core: client.CoreV1Api, namespace: str, name: str, container: str | None = None) -> str:
    try:
        return core.read_namespaced_pod_log(name, namespace, container=container)
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
