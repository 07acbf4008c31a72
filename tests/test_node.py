"""Node processes: ordinal detection for StatefulSet pods and the node config they pass to Flower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcifar.config import ConfigError
from fedcifar.node.process import node_config, resolve_ordinal


def test_explicit_partition_id():
    assert resolve_ordinal("3") == 3
    with pytest.raises(ValueError, match="integer or 'auto'"):
        resolve_ordinal("three")


def test_pod_index_label_wins(monkeypatch):
    monkeypatch.setenv("POD_INDEX", "5")
    monkeypatch.setenv("HOSTNAME", "fedcifar-clients-2")
    assert resolve_ordinal("auto") == 5


def test_hostname_ordinal_when_the_label_is_missing(monkeypatch):
    monkeypatch.setenv("POD_INDEX", "")  # Kubernetes < 1.28: the downward API yields ""
    monkeypatch.setenv("HOSTNAME", "my-release-fedcifar-clients-12")
    assert resolve_ordinal("auto") == 12


def test_no_ordinal_anywhere(monkeypatch):
    monkeypatch.delenv("POD_INDEX", raising=False)
    monkeypatch.setenv("HOSTNAME", "laptop")
    with pytest.raises(ValueError, match="pass --partition-id N"):
        resolve_ordinal("auto")


def test_node_config(tmp_path):
    assert node_config(1, 3, None) == "partition-id=1 num-partitions=3"
    assert node_config(0, 1, str(tmp_path)) == f'partition-id=0 num-partitions=1 data-path="{tmp_path}"'
    with pytest.raises(ConfigError, match="partition-id must be an integer in"):
        node_config(3, 3, None)
    # slot 5 of the federation's 6, training slice 1 of 2 of the site's own data (split=site)
    assert node_config(5, 6, None, (1, 2)) == (
        "partition-id=5 num-partitions=6 data-partition-id=1 data-num-partitions=2"
    )
    with pytest.raises(ConfigError, match="partition-id must be an integer in"):
        node_config(5, 6, None, (2, 2))


def pem_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return path


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_a_metrics_dir_loses_only_stale_metrics_files_and_nothing_is_written_beside_it(tmp_path):
    """``--metrics-dir DIR`` used to empty DIR (rmtree) and put the converted private key and the trainer's
    socket in DIR/..: ``--metrics-dir ~`` erased a home folder, ``--metrics-dir /tmp/m`` left a key in /tmp.
    Now only prometheus_client's files of dead processes go; the key and the socket live in a private
    folder (0700, under $TMPDIR) that goes at the end."""
    parent, scratch = tmp_path / "parent", tmp_path / "scratch"
    metrics_dir = parent / "metrics"
    (metrics_dir / "sub").mkdir(parents=True)
    scratch.mkdir()
    (metrics_dir / "notes.txt").write_text("mine")
    (metrics_dir / "sub" / "keep.txt").write_text("mine too")
    (metrics_dir / "photos.db").write_text("not prometheus_client's")
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # a dead process's metrics: they would linger
    (metrics_dir / "gauge_mostrecent_999999.db").write_bytes(b"stale")
    (parent / "sibling.txt").write_text("a neighbour")
    (parent / "metrics.trainer.sock").write_text("what an older fedcifar left")
    key = pem_key(tmp_path / "supernode.key")
    kept, beside = listing(metrics_dir), listing(parent)
    show = (
        "import os, sys; k = sys.argv[sys.argv.index('--auth-supernode-private-key') + 1]; "
        "print('KEY', k, oct(os.stat(os.path.dirname(k)).st_mode & 0o777)); "
        "print('SOCKET', os.environ['FEDCIFAR_TRAINER'])"
    )
    code = (
        "import sys; from fedcifar.node.process import run_node; "
        f"sys.exit(run_node([sys.executable, '-c', {show!r}, '--auth-supernode-private-key', {str(key)!r}], 0, "
        f"'127.0.0.1', {str(metrics_dir)!r}, "
        "[sys.executable, '-m', 'fedcifar.node.trainer', '--partition-id', '0', '--num-partitions', '1']))"
    )
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr  # the trainer listened, the node ran and ended
    assert "trainer for partition 0 of 1" in done.stdout
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("KEY ", "SOCKET ")))
    key_path, mode = said["KEY"].split()
    assert mode == "0o700" and Path(key_path).parent.parent == scratch  # a private folder under $TMPDIR
    assert Path(said["SOCKET"]).parent == Path(key_path).parent
    assert list(scratch.iterdir()) == []  # removed at the end
    after = listing(metrics_dir)
    assert "counter_999999.db" not in after and "gauge_mostrecent_999999.db" not in after
    del kept["counter_999999.db"], kept["gauge_mostrecent_999999.db"]
    assert {name: after.get(name) for name in kept} == kept  # every other file, as it was
    assert outside(listing(parent)) == outside(beside)  # nothing new beside the metrics folder


def outside(files: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {name: data for name, data in files.items() if name != "metrics" and not name.startswith("metrics/")}


def test_a_superlinks_registrar_home_and_reply_layouts_are_not_written_beside_its_metrics_dir(tmp_path):
    from fedcifar.deploy.pki import write_pki
    from fedcifar.local.federation import free_port

    pki = write_pki(tmp_path / "pki", supernodes=0)
    parent, scratch, keys = tmp_path / "parent", tmp_path / "scratch", tmp_path / "keys"
    for folder in (parent / "metrics", scratch, keys):
        folder.mkdir(parents=True)
    (parent / "sibling.txt").write_text("a neighbour")
    # the guard's layouts folder, and the registrar's flwr home beside it once the registrar thread wrote it
    show = (
        "import os, time; from pathlib import Path; layouts = Path(os.environ['FEDCIFAR_FLEET_LAYOUTS']); "
        "home = layouts.parent / 'registrar-flwr'; deadline = time.monotonic() + 20\n"
        "while not (home / 'config.toml').exists() and time.monotonic() < deadline: time.sleep(0.05)\n"
        "print('LAYOUTS', layouts, oct(layouts.parent.stat().st_mode & 0o777), (home / 'config.toml').exists())"
    )
    command = [sys.executable, "-c", show, "--enable-supernode-auth", "--ssl-ca-certfile", str(pki / "ca.crt")]
    command += ["--port", str(free_port())]  # nothing listens there: the registrar waits, and stops with the node
    code = (
        "import sys; from fedcifar.node.process import run_node; "
        "from fedcifar.superlink.fleet_budgets import GuardSettings; "
        f"sys.exit(run_node({command!r}, 0, '127.0.0.1', {str(parent / 'metrics')!r}, guard=GuardSettings()))"
    )
    env = {**os.environ, "TMPDIR": str(scratch), "FEDCIFAR_SUPERNODE_PUBLIC_KEYS": str(keys)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    layouts, mode, home_written = done.stdout.split("LAYOUTS ", 1)[1].split()
    assert home_written == "True" and mode == "0o700" and Path(layouts).parent.parent == scratch
    assert sorted(p.name for p in parent.iterdir()) == ["metrics", "sibling.txt"]
    assert list(scratch.iterdir()) == []


def test_superlink_registers_keys_only_with_auth_and_a_key_folder(tmp_path, monkeypatch):
    from fedcifar.deploy.registrar import PUBLIC_KEYS_ENV, READY_FILE_ENV, superlink_registrar

    tls = ["--ssl-ca-certfile", "/tls/ca.crt", "--ssl-certfile", "/tls/tls.crt", "--ssl-keyfile", "/tls/tls.key"]
    monkeypatch.delenv(PUBLIC_KEYS_ENV, raising=False)
    assert superlink_registrar(["flower-superlink", *tls, "--enable-supernode-auth"], tmp_path) is None  # by hand
    monkeypatch.setenv(PUBLIC_KEYS_ENV, str(tmp_path / "keys"))
    monkeypatch.setenv(READY_FILE_ENV, str(tmp_path / "ready"))
    assert superlink_registrar(["flower-superlink", *tls], tmp_path) is None  # no authentication
    (tmp_path / "ready").write_text("left by the previous container")
    registrar = superlink_registrar(["flower-superlink", *tls, "--enable-supernode-auth", "--port", "8443"], tmp_path)
    assert registrar.address == "127.0.0.1:8443" and registrar.root_certificates == "/tls/ca.crt"
    assert not (tmp_path / "ready").exists()  # not ready before this SuperLink registered the keys
    with pytest.raises(ValueError, match="--enable-supernode-auth needs TLS"):
        superlink_registrar(["flower-superlink", "--insecure", "--enable-supernode-auth"], tmp_path)


def test_supernode_pem_key_is_handed_to_flower_as_openssh(tmp_path):
    """run_node converts the chart's PEM key before it starts flower-supernode."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "supernode.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    show = "import sys; print(open(sys.argv[sys.argv.index('--auth-supernode-private-key') + 1]).read())"
    code = (
        "import sys; from fedcifar.node.process import run_node; "
        f"sys.exit(run_node([sys.executable, '-c', {show!r}, '--auth-supernode-private-key', "
        f"{str(tmp_path / 'supernode.key')!r}], 0, '127.0.0.1', {str(tmp_path / 'run' / 'metrics')!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "BEGIN OPENSSH PRIVATE KEY" in done.stdout
    assert not (tmp_path / "run" / "supernode-auth.key").exists()  # not beside the metrics folder


def test_without_a_metrics_dir_keys_and_state_live_in_a_private_folder_removed_at_the_end(tmp_path):
    """Local mode: two nodes never share a converted key path, and another user cannot create it first."""
    import os
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "supernode.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    show = (
        "import os, sys; p = sys.argv[sys.argv.index('--auth-supernode-private-key') + 1]; "
        "print(p, oct(os.stat(os.path.dirname(p)).st_mode & 0o777))"
    )
    code = (
        "import sys; from fedcifar.node.process import run_node; "
        f"sys.exit(run_node([sys.executable, '-c', {show!r}, '--auth-supernode-private-key', "
        f"{str(tmp_path / 'supernode.key')!r}], 0, '127.0.0.1', None))"
    )
    paths = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        path, mode = done.stdout.split()[-2:]
        assert mode == "0o700" and os.path.basename(os.path.dirname(path)).startswith("fedcifar-node-")
        assert not os.path.exists(os.path.dirname(path))  # removed at the end
        paths.append(path)
    assert paths[0] != paths[1]
