"""Flower's command line as fedcifar drives it: one way to find Flower's console scripts, to run
``flwr`` against a ``$FLWR_HOME``, to read its JSON replies, and to write the connection it reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CONNECTION = "fedcifar"  # the ``[superlink.<name>]`` entry fedcifar writes and uses


def flower_binary(name: str) -> str:
    """The Flower console script installed beside this interpreter (else from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install fedcifar's dependencies (pip install -e .)")
    return found


def flwr(
    *args: str,
    env: dict[str, str] | None = None,
    flwr_home: Path | None = None,
    timeout: float | None = 120,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """``flwr ARGS`` to its end (``subprocess.TimeoutExpired`` after ``timeout`` seconds), in ``env``
    (default: this process's), with ``$FLWR_HOME`` set to ``flwr_home`` when given."""
    env = dict(os.environ if env is None else env)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return subprocess.run(
        [flower_binary("flwr"), *args],
        env=env,
        capture_output=capture,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def flwr_json(*args: str, **kwargs) -> dict:
    """``flwr ARGS --format json``'s reply; when it printed none (the SuperLink gone, a crash),
    ``{"success": False, "error-message": what it printed}``."""
    done = flwr(*args, "--format", "json", **kwargs)
    try:
        return json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        return {"success": False, "error-message": (done.stdout + done.stderr).strip()}


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: str | None = None) -> Path:
    """The ``[superlink.<name>]`` entry of the flwr CLI, as the default connection: TLS verified
    with ``root_certificates`` when given, plaintext (``insecure = true``) otherwise."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    tls = f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates else "insecure = true\n"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in a command line."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
