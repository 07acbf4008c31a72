"""``fedcifar pull``: a release's run outputs, to the operator's machine, without ``kubectl cp``.

The SuperLink pod's proxy serves each run folder's ``history.json``, ``history.png``, ``model.pt`` and
``best-model.pt`` (and the folders' names) on the pod's loopback only (``superlink.outputsPort``). They
are fetched through the Kubernetes API server's port-forward with the operator's kubeconfig, so the
right to fetch them is the right to port-forward in the release's namespace (RBAC ``pods/portforward``),
as for the Control API; no ``pods/exec``. Files are written whole (``atomic.py``).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from fedcifar.common import atomic
from fedcifar.deploy.portforward import PortForward
from fedcifar.server.history import OUTPUT_FILES

OUTPUTS_PORT = 9095  # the chart's superlink.outputsPort
REVISION = re.compile(r"revision-(\d+)")


class PullError(RuntimeError):
    """Nothing to fetch, or the release's outputs could not be reached; the message says what to do."""


def pull(
    release: str,
    out_dir: Path,
    namespace: str | None = None,
    revision: int | None = None,
    port: int = OUTPUTS_PORT,
    context: str | None = None,
) -> list[Path]:
    """Fetch the run of ``revision`` (default: the latest) of ``release`` into ``out_dir``; returns the files."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except config.ConfigException as err:
        raise PullError(f"no usable kubeconfig ({err}): set KUBECONFIG, or pass --context") from None
    if namespace is None:
        _, active = config.list_kube_config_contexts()
        namespace = active["context"].get("namespace", "default")
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=superlink"
    forward = PortForward(selector, port, namespace, client.CoreV1Api())
    forward.check()  # a refusal says so now, not as a reset connection
    with forward as address:
        folder = _run_folder(_get(address, "/runs/", release), revision, release)
        fetched = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            try:
                body = _get(address, f"/runs/{folder}/{name}", release)
            except FileNotFoundError:
                continue  # e.g. history.png before the run's end
            fetched.append(atomic.write_bytes(out_dir / name, body))
    if not fetched:
        raise PullError(f"{release}: runs/{folder}/ holds none of {', '.join(OUTPUT_FILES)} yet")
    return fetched


def _run_folder(listing: bytes, revision: int | None, release: str) -> str:
    revisions = sorted(
        int(m[1])
        for entry in json.loads(listing)
        if entry.get("type") == "directory" and (m := REVISION.fullmatch(entry["name"]))
    )
    if not revisions:
        raise PullError(f"{release} has no run outputs yet (no runs/revision-<N>/ on its SuperLink)")
    if revision is None:
        return f"revision-{revisions[-1]}"
    if revision not in revisions:
        raise PullError(
            f"{release} has no run of revision {revision}; it has revisions {', '.join(map(str, revisions))}"
        )
    return f"revision-{revision}"


def _get(address: str, path: str, release: str) -> bytes:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=60) as reply:
            return reply.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise FileNotFoundError(path) from None
        raise PullError(f"{release}: GET {path} answered {err.code}") from None
    except OSError as err:
        raise PullError(
            f"{release}: the outputs port did not answer through the port-forward ({err}); "
            "is superlink.outputsPort the chart's default (--port)?"
        ) from None
