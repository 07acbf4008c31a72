"""A throwaway public-key infrastructure for a local federation: a CA, the SuperLink's certificate
(``localhost``, ``127.0.0.1``) and one ECDSA P-256 key pair per SuperNode, as the chart holds them.

``fedcifar run`` makes one in its private folder, so that a local federation runs signed, as a
cluster does: TLS on the SuperLink's port, and SuperNode authentication, which lets the SuperLink's
Fleet guard know which node sent a request (without it a node is whoever it claims to be).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PUBLIC = "public"  # the subfolder of public keys (what the SuperLink registers)


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
    days: int = 1,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def write_pki(out: Path, supernodes: int = 3, days: int = 1) -> Path:
    """``ca.crt``, ``tls.crt`` / ``tls.key`` (localhost, 127.0.0.1), ``supernode-<i>.key`` (PEM) in
    ``out`` and ``public/supernode-<i>.pub`` (the public half as a certificate made from the key, as
    the chart stores it); private keys owner-only. The CA's key is not kept."""
    (out / PUBLIC).mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("fedcifar local CA", ca_key, ca=True, days=days)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("superlink", key, ca_key, "fedcifar local CA", dns=("localhost",), ips=("127.0.0.1",), days=days)
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(out / "tls.key", pem_private(key))
    for i in range(supernodes):
        node_key = ec.generate_private_key(ec.SECP256R1())
        write_private(out / f"supernode-{i}.key", pem_private(node_key))
        (out / PUBLIC / f"supernode-{i}.pub").write_bytes(
            certificate(f"supernode-{i}", node_key, days=days).public_bytes(serialization.Encoding.PEM)
        )
    return out
