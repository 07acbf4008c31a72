"""The SuperLink's Control API through the Kubernetes API server's port-forward.

In the chart Flower listens on its pod's loopback only, and the public port (a proxy) refuses the
Control API: the open-source SuperLink checks no account there. The run Job reaches it as an
operator does with ``kubectl port-forward``: through the API server, which checks the Job's
ServiceAccount against RBAC (``pods/portforward`` in the release's namespace). ``PortForward``
listens on a local port for the ``flwr`` CLI and opens one port-forward stream per connection,
each to the pod that matches the selector at that moment (a restarted SuperLink is a new pod).
"""

from __future__ import annotations

import selectors
import socket
import threading
from pathlib import Path

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PortForwardError(RuntimeError):
    """No pod to forward to, or the API server refused the port-forward."""


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes, then close both."""
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()


class PortForward:
    """``with PortForward(selector, port) as address:`` -- ``127.0.0.1:<local port>`` reaches ``port``
    on the loopback of the running pod that ``selector`` picks, in the Job's own namespace (or ``namespace``)."""

    def __init__(self, selector: str, port: int, namespace: str | None = None, core: object | None = None) -> None:
        """``core``: a ``CoreV1Api`` (e.g. from the operator's kubeconfig); by default the pod's own
        ServiceAccount's."""
        from kubernetes import client, config

        if core is None:
            config.load_incluster_config()
            core = client.CoreV1Api()
        self.core = core
        self.selector, self.port = selector, port
        self.namespace = namespace or NAMESPACE_FILE.read_text().strip()
        self.listener = socket.create_server(("127.0.0.1", 0))

    def pod(self) -> str:
        from kubernetes.client import ApiException

        try:
            found = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        except ApiException as err:
            raise PortForwardError(f"cannot list pods in {self.namespace} ({err.status} {err.reason})") from None
        running = [p.metadata.name for p in found if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        if not running:
            raise PortForwardError(f"no running pod matches {self.selector} in namespace {self.namespace}")
        return running[0]

    def open(self, pod: str) -> socket.socket:
        """One port-forward stream to the pod's port, as a socket."""
        from kubernetes.client import ApiException
        from kubernetes.stream import portforward

        try:
            forward = portforward(
                self.core.connect_get_namespaced_pod_portforward, pod, self.namespace, ports=str(self.port)
            )
        except ApiException as err:
            raise PortForwardError(
                f"the API server refused a port-forward to {self.namespace}/{pod}:{self.port} ({err.reason}): "
                "the identity (a user or ServiceAccount) needs get and create on pods/portforward in this namespace"
            ) from None
        return forward.socket(self.port)

    def check(self) -> str:
        """Open and close one stream (a clear error now instead of a reset connection in ``flwr``);
        returns the pod it reached."""
        pod = self.pod()
        self.open(pod).close()
        return pod

    def serve(self) -> None:
        while True:
            try:
                local, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                remote = self.open(self.pod())
            except PortForwardError as err:
                print(f"fedcifar: {err}", flush=True)
                local.close()
                continue
            threading.Thread(target=splice, args=(local, remote), daemon=True).start()

    def __enter__(self) -> str:
        threading.Thread(target=self.serve, name="port-forward", daemon=True).start()
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def __exit__(self, *_exc: object) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in serve()
        except OSError:
            pass
        self.listener.close()
