"""Node processes: ordinal detection for StatefulSet pods and the node config they pass to Flower."""

from __future__ import annotations

import pytest

from fedcifar.config import ConfigError
from fedcifar.node import node_config, resolve_ordinal


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


def test_a_stale_trainer_socket_does_not_stop_a_restarted_node(tmp_path):
    """A container restart keeps the pod's emptyDir, so the old socket file is still there."""
    import subprocess
    import sys

    metrics_dir = tmp_path / "metrics"
    (tmp_path / "metrics.trainer.sock").write_text("stale")
    code = (
        "import sys; from fedcifar.node import run_node; "
        "sys.exit(run_node([sys.executable, '-c', 'import time; time.sleep(1)'], 0, '127.0.0.1', "
        f"{str(metrics_dir)!r}, "
        "[sys.executable, '-m', 'fedcifar.trainer', '--partition-id', '0', '--num-partitions', '1']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # the trainer listened, the node ran and ended
    assert "trainer for partition 0 of 1" in done.stdout


def test_superlink_registers_keys_only_with_auth_and_a_key_folder(tmp_path, monkeypatch):
    from fedcifar.security import PUBLIC_KEYS_ENV, READY_FILE_ENV, superlink_registrar

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
        "import sys; from fedcifar.node import run_node; "
        f"sys.exit(run_node([sys.executable, '-c', {show!r}, '--auth-supernode-private-key', "
        f"{str(tmp_path / 'supernode.key')!r}], 0, '127.0.0.1', {str(tmp_path / 'run' / 'metrics')!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "BEGIN OPENSSH PRIVATE KEY" in done.stdout
    assert (tmp_path / "run" / "supernode-auth.key").stat().st_mode & 0o777 == 0o600


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
        "import sys; from fedcifar.node import run_node; "
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
