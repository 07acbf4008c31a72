"""Reading Linux's ``/proc``: processes, their environments and command lines, their memory and CPU time."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def cpu_info() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def processes_with_env(name: str, value: str) -> list[int]:
    """Processes (but this one) whose environment holds ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for pid in pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def process_kind(pid: int) -> str | None:
    """What a process of a local federation is, by its name and command line (None: not one of them)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "flwr-clientapp":
            return "flwr-clientapp"  # forked by fedcifar's SuperExec (flower/)
    except OSError:
        return None
    text = b" ".join(cmdline).decode(errors="replace")
    if "multiprocessing.forkserver" in text:
        return "clientapp forkserver"
    if "fedcifar.flower.tuning" in text and "superexec" in text:
        return "flower-superexec"
    words = [Path(w.decode(errors="replace")).name for w in cmdline[:5]]
    flower = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
    for kind in flower:
        if kind in words:
            return kind
    if "fedcifar.flower.tuning" in words and words.index("fedcifar.flower.tuning") + 1 < len(words):
        return "flower-" + words[words.index("fedcifar.flower.tuning") + 1]  # flower-superlink, flower-supernode
    if "fedcifar.node.trainer" in words:
        return "fedcifar trainer"
    if "fedcifar" in words and words.index("fedcifar") + 1 < len(words):
        return "fedcifar " + words[words.index("fedcifar") + 1]  # the metrics wrapper
    return None


def process_memory(pid: int, field: str = "VmRSS") -> int:
    """Bytes of a memory figure of /proc/PID/status: VmRSS (resident now) or VmHWM (peak); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_pids(root: int, skip: str = "flwr-clientapp") -> list[int]:
    """``root`` and its descendants, but not the per-message ClientApp processes (Flower starts one
    per message; whether one is alive when sampled is chance)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        # The ClientApp fork server's children are ClientApps, also in the instant before one
        # renames itself: counted, it once added 89 MiB to a node for one round of a soak.
        if "multiprocessing.forkserver" not in cmdline:
            todo.extend(children.get(pid, []))
        if skip in cmdline or comm == skip:  # cold ClientApps, and forked ones once renamed
            continue
        found.append(pid)
    return found


def tree_rss(root: int, skip: str = "flwr-clientapp") -> int:
    """Resident bytes of ``root`` and its descendants (``tree_pids``)."""
    return sum(process_memory(pid) for pid in tree_pids(root, skip))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User and system CPU seconds the live processes ``pids`` have used (their waited-for children's too)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks
