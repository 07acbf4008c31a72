"""A local federation in a network of its own, out of reach of the machine's other users.

Flower checks no account on its Control and runtime APIs (the open-source SuperLink accepts anyone)
and SuperNode authentication covers only the Fleet API: whoever reaches the SuperLink's port on
127.0.0.1 can ``flwr run`` code as you, stop your run or register a node. On a shared machine (a
university server) that is every other user. So the commands that start a local federation
(``fedcifar run``, ``bench``, ``soak``, ``niid-bench``) execute themselves again in a private network
namespace, ``unshare --user --map-root-user --net`` (util-linux; unprivileged where the kernel allows
user namespaces): every Flower port is on a loopback interface no other process shares, the same
protection the chart gets from a pod's own loopback. The namespace has no route out, so data from the
Hugging Face Hub is fetched before it is entered, and ``fedcifar run``'s metrics endpoints, the one
thing meant for outside, are sockets bound here first and inherited (``serve_multiprocess``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
from typing import NoReturn

PRIVATE_ENV = "FEDCIFAR_PRIVATE_NETWORK"  # "1" inside the namespace
METRICS_FDS_ENV = "FEDCIFAR_METRICS_FDS"  # inherited listening sockets: server, client 0, client 1, ...
HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no route out: the cache, fetched before
# unprivileged first (what users get, and what CI runs as root too); a root whose user namespaces are
# blocked (a container's seccomp profile) can still have a network namespace alone
UNSHARE_OPTIONS = (("--user", "--map-root-user", "--net"), ("--net",))
IFREQ = "16sH22x"  # struct ifreq: the name, ifr_flags, the rest of its 24-byte union


class IsolationError(RuntimeError):
    pass


def inside() -> bool:
    return os.environ.get(PRIVATE_ENV) == "1"


def reexecute(argv: list[str], metrics_ports: list[int] | None = None) -> NoReturn:
    """Run ``fedcifar <argv>`` again, in this process, in a private network namespace.

    ``metrics_ports`` (0: any free port) are bound on 127.0.0.1 here, before, and handed in as
    listening sockets (``$FEDCIFAR_METRICS_FDS``). Raises IsolationError, saying what to do, where the
    machine cannot make a namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise IsolationError(_refusal("util-linux's unshare is not on PATH"))
    options = _working_options(unshare)
    env = {**os.environ, PRIVATE_ENV: "1", **HUB_OFFLINE}
    if metrics_ports is not None:
        env[METRICS_FDS_ENV] = ",".join(str(_listen(port).detach()) for port in metrics_ports)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(unshare, [unshare, *options, "--", sys.executable, "-m", "fedcifar", *argv], env)


def enter_loopback() -> None:
    """Bring the namespace's loopback interface up (a new namespace's may start down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(IFREQ, b"lo", 0)
        flags = struct.unpack(IFREQ, fcntl.ioctl(sock, siocgifflags, request))[1]
        if not flags & iff_up:
            fcntl.ioctl(sock, siocsifflags, struct.pack(IFREQ, b"lo", flags | iff_up))


def inherited_metrics_sockets() -> list[int] | None:
    """The listening sockets ``reexecute`` handed in, as file descriptors; None outside."""
    value = os.environ.get(METRICS_FDS_ENV) if inside() else None
    return [int(fd) for fd in value.split(",")] if value else None


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as err:
        sock.close()
        why = f"cannot listen on metrics port {port} ({err.strerror}): pick another --metrics-port"
        raise IsolationError(why) from err
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def _working_options(unshare: str) -> tuple[str, ...]:
    errors = []
    for options in UNSHARE_OPTIONS if os.geteuid() == 0 else UNSHARE_OPTIONS[:1]:
        probe = subprocess.run([unshare, *options, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return options
        errors.append(probe.stderr.strip() or f"exit {probe.returncode}")
    raise IsolationError(_refusal(f"unshare {' '.join(UNSHARE_OPTIONS[0])} failed: {errors[0]}"))


def _refusal(why: str) -> str:
    return (
        f"cannot give the local federation a private network ({why}). Without one, every user of this machine "
        "can reach its SuperLink on 127.0.0.1 and run code as you (Flower checks no account on its Control API). "
        "Install util-linux and allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
        "user.max_user_namespaces > 0, kernel.apparmor_restrict_unprivileged_userns=0), or, on a machine only "
        "you use, pass --shared-network"
    )
