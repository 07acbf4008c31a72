"""SuperNode keys in the formats a Kubernetes Secret can hold, for Flower's SuperNode authentication.

Flower 1.42 serves Fleet, Control and runtime APIs on one HTTPS port (``flower-superlink
--ssl-ca-certfile --ssl-certfile --ssl-keyfile``); clients verify it with ``--root-certificates``
(SuperNodes) or ``root-certificates`` in ``$FLWR_HOME/config.toml`` (the ``flwr`` CLI). With
``--enable-supernode-auth`` a SuperNode must sign its requests with an ECDSA key (NIST curve) whose
public key a ``flwr`` user registered first through the Control API (``flwr supernode register``).
``--auth-supernode-private-key`` may name a PEM key (``genPrivateKey "ecdsa"`` in Helm); it is
converted to the OpenSSH format Flower reads; public keys may be OpenSSH lines, PEM public keys or
PEM certificates.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def load_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """An ECDSA private key from OpenSSH or PEM (SEC1 ``EC PRIVATE KEY`` or PKCS#8) bytes."""
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"not an unencrypted OpenSSH or PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"SuperNode keys must be ECDSA (a NIST curve), got {type(key).__name__}")
    return key


def openssh_private_key(source: Path, target: Path) -> Path:
    """``source`` as the OpenSSH private key Flower reads, written to ``target`` (mode 0600)."""
    key = load_private_key(source.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    return target


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """An ECDSA public key from an OpenSSH line, a PEM public key or a PEM certificate."""
    text = data.strip()
    try:
        if text.startswith(b"ecdsa-sha2-"):
            key = serialization.load_ssh_public_key(text)
        elif b"BEGIN CERTIFICATE" in text:
            key = x509.load_pem_x509_certificate(text).public_key()
        else:
            key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as err:
        raise ValueError(f"not an OpenSSH public key, PEM public key or PEM certificate: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"SuperNode keys must be ECDSA (a NIST curve), got {type(key).__name__}")
    return key


def openssh_public_key(data: bytes) -> bytes:
    return load_public_key(data).public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def public_key_files(folder: Path) -> list[Path]:
    """The key files of a folder, sorted; Kubernetes' ``..data`` links and hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def rewrite_private_key_arg(command: list[str], workdir: Path) -> list[str]:
    """``--auth-supernode-private-key PATH`` of a SuperNode command, pointing to an OpenSSH copy in
    ``workdir``, a folder private to this process (``node.run_node``'s ``tempfile.mkdtemp()``)."""
    flag = "--auth-supernode-private-key"
    command = list(command)
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            source, at = Path(command[i + 1]), i + 1
        elif arg.startswith(flag + "="):
            source, at = Path(arg.split("=", 1)[1]), i
        else:
            continue
        if b"OPENSSH PRIVATE KEY" in source.read_bytes():
            return command
        target = openssh_private_key(source, workdir / "supernode-auth.key")
        command[at] = str(target) if at == i + 1 else f"{flag}={target}"
        return command
    return command
