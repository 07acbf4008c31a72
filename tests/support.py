"""Helpers shared by the tests that run real Flower processes: certificates and keys (a CA, a
SuperLink certificate for localhost/127.0.0.1, SuperNode keys), Flower's environment, bounded waits."""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from fedcifar.checkpoint import Checkpoint
from fedcifar.config import RunConfig
from fedcifar.history import History, RoundRecord
from fedcifar.task import initial_model

BIN = Path(sys.executable).parent
# no telemetry; Flower starts flower-superexec and the app processes by name, from beside this interpreter
FLOWER_ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
}


def secure_superlink(pki: Path, port: int, metrics_port: int, metrics_dir: Path | None = None) -> list[str]:
    """``fedcifar superlink`` on 127.0.0.1:``port``, TLS from ``pki`` (``write_pki``), SuperNode auth on."""
    metrics = ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    if metrics_dir is not None:
        metrics += ["--metrics-dir", str(metrics_dir)]
    tls = ["--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "tls.crt")]
    return [
        str(BIN / "fedcifar"),
        "superlink",
        *metrics,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *tls,
        "--ssl-keyfile",
        str(pki / "tls.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]


def wait(what: str, probe, timeout: float = 60):
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def certificate(
    subject: str,
    key,
    issuer_key=None,
    issuer: str | None = None,
    ca: bool = False,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def write_pki(out: Path, supernodes: int = 3) -> Path:
    """``ca.crt``, ``tls.crt`` / ``tls.key`` (localhost, 127.0.0.1) and ``supernode-<i>.key`` / ``.pub``
    (PEM; the public half as a certificate made from the key, as the chart stores it) in ``out``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("superlink", key, ca_key, "test CA", dns=("localhost",), ips=("127.0.0.1",))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "tls.key").write_bytes(pem_private(key))
    for i in range(supernodes):
        node_key = ec.generate_private_key(ec.SECP256R1())
        (out / f"supernode-{i}.key").write_bytes(pem_private(node_key))
        (out / f"supernode-{i}.pub").write_bytes(
            certificate(f"n{i}", node_key).public_bytes(serialization.Encoding.PEM)
        )
    return out


# -- metrics endpoints


def scrape(port: int) -> dict[tuple, float] | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot[(name, tuple(sorted(labels.items())))]


# -- checkpoints


def checkpoint_of(round_: int, config: RunConfig) -> Checkpoint:
    history = History(run_id=7, config=config.to_flower(), data="test", device="cpu")
    history.rounds.append(
        RoundRecord(
            round=1,
            train_loss=1.0,
            eval_loss=1.0,
            eval_accuracy=0.3,
            round_seconds=2.0,
            participating_clients=2,
            partitions=[0, 1],
            examples_trained=10,
            sent_bytes=1,
            received_bytes=1,
        )
    )

    return Checkpoint(
        model=initial_model(1).state_dict(),
        round=round_,
        history=asdict(history),
        fingerprint=config.training_fingerprint(),
        rng_state=random.getstate(),
        numpy_rng_state=np.random.get_state(),
        strategy_state={},
        privacy_state=None,
    )
