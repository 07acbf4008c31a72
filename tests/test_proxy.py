"""The SuperLink's public face, for real: the chart's nginx config in front of a real SuperLink.

``helm template`` renders the proxy ConfigMap; nginx (Debian's, as in the image) runs it in front of
``fedcifar superlink`` with TLS and SuperNode authentication, which listens on 127.0.0.1 only as in
the pod. Through the proxy: the Fleet API (POST) and ``/health`` (GET, HEAD) answer, every other path
gets 403 with a sentence (the ``flwr`` CLI included) and another method on those two 405; a
registered SuperNode joins through it and a run moves a 3 MiB array there and back (nginx's default
1 MiB body limit would refuse Flower's chunk); a body above ``superlink.proxy.maxBodySize`` gets
413; the access log holds no signature headers.

Skipped where nginx or helm is missing; CI installs nginx (``.ci/run``) and has helm.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from pathlib import Path

import pytest
from support import BIN, FLOWER_ENV, secure_superlink, wait

from fedcifar.deploy import flwr_cli, key_formats, registrar
from fedcifar.deploy.pki import write_pki
from fedcifar.deploy.proxy import HELM, NGINX, proxy_config
from fedcifar.local.federation import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO_APP = ROOT / "tests" / "apps" / "echo"
REFUSAL = "fedcifar: this port serves only Flower's Fleet API (/v1/fleet/) and /health"
METHOD_REFUSAL = "fedcifar: this port takes only POST on Flower's Fleet API (/v1/fleet/) and GET or HEAD on /health"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx); CI installs it"),
    pytest.mark.skipif(HELM is None, reason="helm renders the proxy config from the chart"),
]


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    """nginx on a public port in front of ``fedcifar superlink`` (TLS, SuperNode auth) on 127.0.0.1."""
    work = tmp_path_factory.mktemp("face")
    (work / "pki").mkdir()
    pki = write_pki(work / "pki", supernodes=1)
    keys = work / "keys"
    keys.mkdir()
    (keys / "supernode-0.pub").write_bytes((pki / "public" / "supernode-0.pub").read_bytes())
    public, control, ready = free_port(), free_port(), work / "ready"
    superlink = subprocess.Popen(
        secure_superlink(pki, control, free_port(), work / "metrics"),
        cwd=work,
        stdout=open(work / "superlink.log", "w"),
        stderr=subprocess.STDOUT,
        env={
            **FLOWER_ENV,
            registrar.PUBLIC_KEYS_ENV: str(keys),
            registrar.READY_FILE_ENV: str(ready),
            "FLWR_HOME": str(work / "flwr"),
        },
    )
    outputs = free_port()
    (work / "nginx.conf").write_text(proxy_config(public, control, pki, work, outputs))
    nginx = subprocess.Popen(
        [NGINX, "-e", "stderr", "-c", str(work / "nginx.conf"), "-g", "daemon off;"],
        stdout=open(work / "nginx.log", "w"),
        stderr=subprocess.STDOUT,
    )
    admin = work / "admin"  # an operator on the pod's loopback (what kubectl port-forward gives)
    flwr_cli.write_connection(admin, flwr_cli.CONNECTION, f"127.0.0.1:{control}", str(pki / "ca.crt"))
    try:
        wait("the SuperLink's keys registered", ready.exists, 90)
        assert nginx.poll() is None, (work / "nginx.log").read_text()
        yield {"public": public, "control": control, "pki": pki, "work": work, "admin": admin, "outputs": outputs}
    finally:
        for proc in (nginx, superlink):
            proc.terminate()
            proc.wait(30)


def exchange(face: dict, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], str]:
    """One HTTPS request to the public port, verified with the CA (a raw path: no client-side cleanup):
    status, headers (lower-case names) and body."""
    context = ssl.create_default_context(cafile=str(face["pki"] / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", face["public"], context=context, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/protobuf"})
        reply = conn.getresponse()
        headers = {name.lower(): value for name, value in reply.getheaders()}
        return reply.status, headers, reply.read().decode(errors="replace")
    finally:
        conn.close()


def request(face: dict, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    status, _, text = exchange(face, method, path, body)
    return status, text


def flwr(home: Path, *args: str) -> dict:
    return flwr_cli.flwr_json(*args, env=FLOWER_ENV, flwr_home=home)


def test_only_the_fleet_api_and_health_pass(face):
    assert request(face, "GET", "/health")[0] == 200
    refused = {
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-supernode"),
        ("POST", "/v1/runtime/acquire-task"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "/v1/fleet/x/..%2f..%2fcontrol/list-runs"),
        ("POST", "/v1/fleet"),
        ("POST", "/V1/control/list-runs"),
    }
    for method, path in refused:
        status, body = request(face, method, path)
        assert (status, body.startswith(REFUSAL)) == (403, True), (method, path, status, body)
    status, body = request(face, "POST", "/v1/fleet/pull-messages")  # Flower answers (an unsigned request)
    assert status != 403 and not body.startswith(REFUSAL), (status, body)


def test_health_takes_get_and_head_only_and_the_fleet_api_post_only(face):
    """The proxy itself answers 405 to any other method (Flower never sees the request): /health is
    GET and HEAD (probes, ``helm test``, ``fedcifar submit``), every Fleet call is a POST."""
    for method in ("GET", "HEAD"):
        status, _, body = exchange(face, method, "/health")
        assert status == 200 and not body.startswith(METHOD_REFUSAL), (method, status, body)
    refused = [(m, "/health") for m in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS")]
    refused += [(m, "/v1/fleet/pull-messages") for m in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")]
    for method, path in refused:
        status, headers, body = exchange(face, method, path, b"x" if method in ("POST", "PUT", "PATCH") else b"")
        allowed = "GET, HEAD" if path == "/health" else "POST"
        assert (status, headers.get("allow")) == (405, allowed), (method, path, status, headers, body)
        if method != "HEAD":  # a HEAD reply has no body
            assert body.startswith(METHOD_REFUSAL), (method, path, body)


def test_the_flwr_cli_is_refused_on_the_public_port(face, tmp_path):
    outsider = tmp_path / "outsider"  # holds the CA (it is public), as a site would
    flwr_cli.write_connection(outsider, flwr_cli.CONNECTION, f"127.0.0.1:{face['public']}", str(face["pki"] / "ca.crt"))
    for args in (("ls", flwr_cli.CONNECTION), ("supernode", "ls", flwr_cli.CONNECTION)):
        reply = flwr(outsider, *args)
        assert not reply.get("success"), reply
        assert "403" in json.dumps(reply), reply
    assert flwr(face["admin"], "ls", flwr_cli.CONNECTION)["success"]  # the loopback (operator) path works


def test_a_registered_supernode_moves_3_mib_through_the_proxy(face, tmp_path):
    key = key_formats.rewrite_private_key_arg(
        ["--auth-supernode-private-key", str(face["pki"] / "supernode-0.key")], tmp_path
    )
    node = subprocess.Popen(
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{face['public']}",
            "--port",
            str(free_port()),
            "--root-certificates",
            str(face["pki"] / "ca.crt"),
            *key,
        ],
        env={**FLOWER_ENV, "FLWR_HOME": str(tmp_path / "node")},
        stdout=open(tmp_path / "node.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        reply = flwr(face["admin"], "run", str(ECHO_APP), flwr_cli.CONNECTION, "--run-config", "size-mib=3")
        assert reply.get("success"), reply
        run_id = str(reply["run-id"])

        def finished() -> str | None:
            runs = flwr(face["admin"], "ls", flwr_cli.CONNECTION, "--run-id", run_id).get("runs", [])
            status = runs[0]["status"] if runs else ""
            return status if status.startswith("finished") else None

        status = wait("the echo run to finish", finished, 180)
        log = (tmp_path / "node.log").read_text()
        assert status == "finished:completed", f"{status}\n{log[-3000:]}"
    finally:
        node.terminate()
        node.wait(30)
    access = (face["work"] / "access.log").read_text()
    pushes = [line for line in access.splitlines() if "POST /v1/fleet/push-object" in line]
    assert any(int(line.split()[-3]) > 3 * 2**20 for line in pushes), access[-2000:]  # the 3 MiB chunk went through
    assert "flwr-signature" not in access.lower() and "flwr-timestamp" not in access.lower()


def test_a_body_above_the_limit_is_refused_by_the_proxy(face):
    status, _ = request(face, "POST", "/v1/fleet/push-object", b"\0" * (7 * 2**20))  # maxBodySize: 6m
    assert status == 413


# -- the run outputs, on the pod's loopback (fedcifar pull) ------------------------------------------


def test_the_outputs_port_serves_four_files_of_each_run_folder_and_nothing_else(face):
    state = face["work"] / "state"
    run = state / "runs" / "revision-3"
    run.mkdir(parents=True)
    for name in ("history.json", "history.png", "model.pt", "best-model.pt", "privacy-releases.json"):
        (run / name).write_bytes(name.encode())
    (run / "logs").mkdir()
    (run / "logs" / "superlink.log").write_text("log")
    (state / "state.db").write_text("db")
    elsewhere = state / "runs" / "revision-4"
    elsewhere.mkdir()
    (elsewhere / "history.json").symlink_to(state / "state.db")  # a link planted in a run folder

    def get(path: str, method: str = "GET") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", face["outputs"], timeout=30)
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.read()

    assert json.loads(get("/runs/")[1]) and {e["name"] for e in json.loads(get("/runs/")[1])} == {
        "revision-3",
        "revision-4",
    }
    for name in ("history.json", "history.png", "model.pt", "best-model.pt"):
        assert get(f"/runs/revision-3/{name}") == (200, name.encode())
    for path in (
        "/runs/revision-3/privacy-releases.json",
        "/runs/revision-3/logs/superlink.log",
        "/state.db",
        "/runs/revision-3/../../state.db",
        "/runs/%2e%2e/state.db",
        "/runs/revision-3/",
        "/",
    ):
        status, body = get(path)
        assert status in (400, 404) and b"db" not in body, path
    assert get("/runs/revision-4/history.json")[0] == 403  # disable_symlinks
    assert get("/runs/revision-3/model.pt", "POST")[0] == 403
    assert get("/runs/revision-3/model.pt", "DELETE")[0] in (403, 405)
    # not on the public port, and on the pod's loopback only
    assert exchange(face, "GET", "/runs/revision-3/model.pt")[0] == 403
    conf = (face["work"] / "nginx.conf").read_text()
    assert f"listen 127.0.0.1:{face['outputs']};" in conf
