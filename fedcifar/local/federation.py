"""A real Flower federation on this machine: one SuperLink and N SuperNodes as local processes.

This is Flower's deployment engine, exactly as on a cluster, with ``localhost`` for the
network: ``fedcifar superlink`` and ``fedcifar supernode`` processes (each with its metrics
endpoint), and the app submitted with ``flwr run`` through a private ``FLWR_HOME``. Every
process started here carries a token in its environment, so shutdown can find and stop all
of them, Flower's own detached helpers included: no orphans after the end, an error or Ctrl-C.

A SuperNode that dies while a run is followed is started again with the same partition, as
Kubernetes restarts a client pod; the run goes on (see the ServerApp's fault handling).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcifar.common.procfs import process_kind, process_memory, processes_with_env
from fedcifar.deploy.flwr_cli import CONNECTION, flower_binary, flwr, flwr_json, write_connection
from fedcifar.deploy.pki import PUBLIC, write_pki
from fedcifar.deploy.registrar import OFFSET_ENV, PUBLIC_KEYS_ENV, READY_FILE_ENV
from fedcifar.flower.polling import DEFAULT_POLL_SECONDS, POLL_ENV
from fedcifar.metrics import DEFAULT_SITE, SITE_ENV
from fedcifar.node.process import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS, node_config
from fedcifar.server.history import load_history

TOKEN_ENV = "FEDCIFAR_LOCAL_TOKEN"
FEDCIFAR = [sys.executable, "-m", "fedcifar"]
PKI_DAYS = 30  # a local federation's certificates outlive any run it holds


class FederationError(RuntimeError):
    """The local federation failed; the message includes the relevant log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_of(listening_fd: int) -> int:
    with socket.socket(fileno=os.dup(listening_fd)) as sock:
        return sock.getsockname()[1]


def wait_for_port(port: int, deadline: float, node: NodeProcess) -> None:
    while time.monotonic() < deadline:
        if not node.alive():
            raise FederationError(f"{node.name} exited before listening on port {port}:\n{node.log_tail()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise FederationError(f"{node.name} did not listen on port {port} in time:\n{node.log_tail()}")


def wait_for_file(path: Path, deadline: float, node: NodeProcess) -> None:
    while not path.exists():
        if not node.alive():
            raise FederationError(f"{node.name} exited before it was ready:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise FederationError(f"{node.name} was not ready in time:\n{node.log_tail()}")
        time.sleep(0.1)


@dataclass
class NodeProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    metrics_port: int | None
    command: list[str]
    env: dict[str, str]
    inherited: tuple[int, ...] = ()  # file descriptors it is handed (its metrics socket)
    restarts: int = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


# the most a completed run's ServerApp is awaited (it bounds its own end: FEDCIFAR_MLFLOW_FLUSH_SECONDS)
SERVERAPP_EXIT_SECONDS = 600.0
SERVER_ONLY_ENV = ("MLFLOW_", "FEDCIFAR_MLFLOW_")  # experiment tracking: the ServerApp's, never a node's


@dataclass
class LocalFederation:
    """Start with ``with LocalFederation(...) as fed:``; everything stops when the block ends."""

    clients: int
    app_dir: Path
    work_dir: Path
    data: str | None = None
    metrics_ports: list[int] | None = None  # [server, client 0, client 1, ...]; None: free ports
    # or listening sockets (fds) to serve them on, in that order: fedcifar run binds them outside its
    # private network (isolation.py), where 127.0.0.1:port is another interface than the nodes'
    metrics_sockets: list[int] | None = None
    superlink_port: int | None = None
    stock: bool = False  # plain flower-superlink/-supernode, no fedcifar wrappers (benchmark baseline)
    # TLS (a throwaway CA in the private folder) and SuperNode authentication, so that the SuperLink's
    # Fleet guard knows which node sent a request; the stock baseline runs as Flower's quickstart does
    signed: bool = True
    # the SuperLink's (and so the ServerApp's) alone, e.g. MLflow's URI and credentials: every other
    # process gets this process's environment without any MLFLOW_* or FEDCIFAR_MLFLOW_* variable
    server_env: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    nodes: list[NodeProcess] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)  # bytes per kind of process

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {self.clients}")
        if self.metrics_sockets is not None:
            if self.metrics_ports is not None or len(self.metrics_sockets) != self.clients + 1:
                raise ValueError("metrics_sockets needs one socket for the server and one per client, and no ports")
            self.metrics_ports = [_port_of(fd) for fd in self.metrics_sockets]
        if self.metrics_ports is not None and len(self.metrics_ports) != self.clients + 1:
            raise ValueError("metrics_ports needs one port for the server and one per client")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.work_dir / "flwr-home"
        self.superlink_port = self.superlink_port or free_port()
        self.metrics_ports = self.metrics_ports or [free_port() for _ in range(self.clients + 1)]
        self.nodes_dir = Path(tempfile.mkdtemp(prefix="fedcifar-nodes-"))  # 0700

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ONLY_ENV)}
        # Flower starts flower-superexec & co. by name: find them beside this interpreter
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            FLWR_HOME=str(self.flwr_home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        env[TOKEN_ENV] = self.token
        if self.data:
            env["FEDCIFAR_DATA"] = str(Path(self.data).expanduser().resolve())
        return env

    @property
    def secure(self) -> bool:
        return self.signed and not self.stock

    @property
    def pki(self) -> Path:
        return self.nodes_dir / "pki"

    def start(self, timeout: float = 60) -> None:
        for i in range(self.clients):
            self.metrics_dir(i).parent.mkdir(exist_ok=True)
        link = ["--host", "127.0.0.1", "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"]
        ready, keys = self.nodes_dir / "superlink-ready", {}
        if self.secure:
            write_pki(self.pki, self.clients, days=PKI_DAYS)
            link += [f"--ssl-ca-certfile={self.pki / 'ca.crt'}", f"--ssl-certfile={self.pki / 'tls.crt'}"]
            link += [f"--ssl-keyfile={self.pki / 'tls.key'}", "--enable-supernode-auth"]
            # fedcifar superlink registers node i's key as local/slot-<i>: that key holds slot i, no other
            keys = {PUBLIC_KEYS_ENV: str(self.pki / PUBLIC), SITE_ENV: DEFAULT_SITE, OFFSET_ENV: "0"}
            keys[READY_FILE_ENV] = str(ready)
        else:
            link.append("--insecure")
        ca = str(self.pki / "ca.crt") if self.secure else None
        write_connection(self.flwr_home, CONNECTION, f"127.0.0.1:{self.superlink_port}", ca)
        if self.stock:
            server = self._spawn("superlink", [flower_binary("flower-superlink"), *link], None)
        else:
            server = self._spawn(
                "superlink", [*FEDCIFAR, "superlink", *self._metrics(0), *link], 0, keys | self.server_env
            )
        deadline = time.monotonic() + timeout
        wait_for_port(self.superlink_port, deadline, server)
        if self.secure:  # a SuperNode whose key is not registered yet is refused, and exits
            wait_for_file(ready, deadline, server)
        for i in range(self.clients):
            node = ["--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(free_port())]
            if self.secure:
                node += [f"--root-certificates={ca}", f"--auth-supernode-private-key={self.pki / f'supernode-{i}.key'}"]
            else:
                node.append("--insecure")
            if self.stock:
                config = node_config(i, self.clients, self.data)
                self._spawn(f"supernode-{i}", [flower_binary("flower-supernode"), *node, "--node-config", config], None)
                continue
            args = [
                *FEDCIFAR,
                "supernode",
                *self._metrics(i + 1),
                "--metrics-dir",
                str(self.metrics_dir(i)),
                "--partition-id",
                str(i),
                "--num-partitions",
                str(self.clients),
                *node,
            ]
            if self.data:
                args += ["--data", str(self.data)]
            self._spawn(f"supernode-{i}", args, i + 1)
        for node in self.nodes:
            if node.metrics_port is not None and not self.metrics_sockets:  # a socket listens already
                wait_for_port(node.metrics_port, deadline, node)

    def _metrics(self, index: int) -> list[str]:
        """The options of node ``index`` (0: the SuperLink) for its metrics endpoint."""
        if self.metrics_sockets:
            return ["--metrics-fd", str(self.metrics_sockets[index])]
        return ["--metrics-port", str(self.metrics_ports[index]), "--metrics-host", "127.0.0.1"]

    def metrics_dir(self, client: int) -> Path:
        """Client ``client``'s metrics folder, in a folder private to this user (0700) that is removed
        with the federation (the node keeps its key and trainer socket in a private folder of its own)."""
        return self.nodes_dir / f"supernode-{client}" / "metrics"

    def _spawn(
        self, name: str, command: list[str], metrics: int | None, extra_env: dict[str, str] | None = None
    ) -> NodeProcess:
        """Start node ``name``; ``metrics``: its index in ``metrics_ports``, None for a stock node."""
        log_path = self.work_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env(), **(extra_env or {})}
        if name.startswith("supernode") and not self.stock:
            # N trainers share this machine's cores: torch's default (all cores each) oversubscribes
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.clients)))
            for key, value in idle_polling(self.clients, os.cpu_count() or 1).items():
                env.setdefault(key, value)
        port = None if metrics is None else self.metrics_ports[metrics]
        inherited = (self.metrics_sockets[metrics],) if self.metrics_sockets and metrics is not None else ()
        node = NodeProcess(
            name, self._popen(command, env, log_path, inherited), log_path, port, command, env, inherited
        )
        self.nodes.append(node)
        return node

    def _popen(
        self, command: list[str], env: dict[str, str], log_path: Path, inherited: tuple[int, ...] = ()
    ) -> subprocess.Popen:
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(
                command,
                pass_fds=inherited,
                cwd=self.work_dir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us, not them
            )

    def restart_dead_supernodes(self) -> list[str]:
        """Start every SuperNode that exited again, with the same partition; say which."""
        notices = []
        for node in self.nodes[1:]:
            if node.alive():
                continue
            code = node.popen.returncode
            node.restarts += 1
            node.popen = self._popen(node.command, node.env, node.log_path, node.inherited)
            notices.append(f"{node.name} exited with code {code}; restarted it (restart {node.restarts})")
        return notices

    def close(self, grace: float = 15, helpers_grace: float = 2) -> None:
        """Stop the SuperNodes, then the SuperLink, then anything left that carries the token."""
        deadline = time.monotonic() + grace
        # SuperNodes first, and the SuperLink only once they are gone: they deactivate on the way out
        for group in (self.nodes[1:], self.nodes[:1]):
            for node in group:
                if node.alive():
                    node.popen.send_signal(signal.SIGTERM)
            for node in group:
                try:
                    node.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.popen.kill()
                    node.popen.wait()
        # Flower's detached helpers (the ServerApp, forked ClientApps, their resource trackers)
        # retry their dead peers ~5 s more: ask them to stop, and kill what is left soon after
        # (nothing is lost: history and checkpoints are written atomically)
        deadline = min(deadline, time.monotonic() + helpers_grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in processes_with_token(self.token):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while sig == signal.SIGTERM and time.monotonic() < deadline and processes_with_token(self.token):
                time.sleep(0.1)
        shutil.rmtree(self.nodes_dir, ignore_errors=True)

    # -- runs --------------------------------------------------------------------------------

    def submit(self, run_config: dict[str, Any]) -> int:
        """``flwr run`` the app with the given run config; returns the run id."""
        pairs = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
        reply = flwr_json("run", str(self.app_dir), CONNECTION, "--run-config", pairs, env=self.env())
        if not reply.get("success", False):
            raise FederationError(f"flwr run failed: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. 'running' or 'finished:completed'."""
        runs = flwr_json("ls", CONNECTION, "--run-id", str(run_id), env=self.env()).get("runs") or []
        return str(runs[0]["status"]) if runs else "unknown"

    def follow(
        self,
        run_id: int,
        out_dir: Path,
        on_round: Callable[[dict], None],
        poll: float = 0.5,
        status_every: float = 5.0,
        on_notice: Callable[[str], None] = print,
    ) -> dict[str, Any]:
        """Report each new round of ``out_dir/history.json`` until the run ends (completed, and its
        ServerApp exited); return the history.

        Dead SuperNodes are restarted (``on_notice`` hears of it); a dead SuperLink, or a run
        that Flower reports finished but not completed (asked ``status_every`` s after the last
        new round), ends it with ``FederationError``.
        """
        shown, next_status = 0, time.monotonic() + status_every
        while True:
            history = load_history(out_dir)
            for record in (history or {}).get("rounds", [])[shown:]:
                on_round(record)
                shown += 1
                # a run that completes rounds is alive: ask Flower (a `flwr` process, ~1 s of CPU)
                # only once rounds stop coming
                next_status = time.monotonic() + status_every
            if history and history.get("run_id") == run_id and history.get("status") == "completed":
                self._until_serverapp_exits(run_id, on_notice)
                return history
            self.sample_memory()
            if not self.nodes[0].alive():
                raise FederationError(f"the SuperLink exited unexpectedly:\n{self.nodes[0].log_tail()}")
            for notice in self.restart_dead_supernodes():
                on_notice(notice)
            if time.monotonic() >= next_status:
                status = self.run_status(run_id)
                if status.startswith("finished") and not status.endswith("completed"):
                    raise FederationError(
                        f"run {run_id} ended as {status}. Its log ends with:\n{self.run_log_tail(run_id)}"
                    )
                next_status = time.monotonic() + status_every
            time.sleep(poll)

    def _until_serverapp_exits(self, run_id: int, on_notice: Callable[[str], None]) -> None:
        """A completed run's ServerApp may still be sending its models to MLflow (bounded by its own
        flush time): stopping the federation now would kill it. Flower reports the run finished once
        the ServerApp has exited."""
        deadline = time.monotonic() + SERVERAPP_EXIT_SECONDS
        while not self.run_status(run_id).startswith("finished"):
            if time.monotonic() >= deadline:
                on_notice(f"run {run_id}: its ServerApp still runs {SERVERAPP_EXIT_SECONDS:.0f}s after the last round")
                return
            time.sleep(1.0)

    def run_log_tail(self, run_id: int, lines: int = 40) -> str:
        """The end of the run's log (the ServerApp's output lives in the SuperLink's log store)."""
        done = flwr("log", str(run_id), CONNECTION, "--show", env=self.env())
        return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])

    def sample_memory(self) -> None:
        """Fold the peak resident memory of every running process into ``peak_rss``."""
        for pid in processes_with_token(self.token):
            kind, hwm = process_kind(pid), process_memory(pid, "VmHWM")
            if kind and hwm:
                self.peak_rss[kind] = max(self.peak_rss.get(kind, 0), hwm)


def idle_polling(nodes: int, cpus: int) -> dict[str, str]:
    """Poll intervals of local SuperNodes (and their SuperExecs), stretched once they outnumber
    2 per core: idle, 16 nodes on 2 cores sent ~220 requests a second at the defaults, and
    rounds took 5.2 s instead of 3.5 s (benchmarks/RESULTS.md). A pod has cores of its own."""
    stretch = max(1.0, nodes / (2 * cpus))
    return {
        POLL_ENV: f"{DEFAULT_POLL_SECONDS * stretch:g}",
        SUPEREXEC_POLL_ENV: f"{SUPEREXEC_POLL_SECONDS * stretch:g}",
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def processes_with_token(token: str) -> list[int]:
    """Processes whose environment carries ``token`` (all descendants of a federation)."""
    return processes_with_env(TOKEN_ENV, token)
