"""Each run's state, exported by the long-lived ``fedcifar superlink`` from the SuperLink's own run list.

A ServerApp that never starts writes no metric, and one that dies cannot write that it failed (its
gauges keep their last value). Flower's SuperLink knows both: its run list holds every run's status
(``pending``, ``starting``, ``running``, ``finished``), sub-status (``completed``, ``failed``,
``stopped``) and when it entered each. ``RunStateCollector`` asks for it (Flower's Control API
client, ``ListRuns``, over the loopback) at every scrape of the node's metrics endpoint, and exports:

- ``fedcifar_run_info{run_id, status, sub_status}`` 1 for each run in its current state;
- ``fedcifar_run_status_since_timestamp_seconds{run_id}``: when it entered that state;
- ``fedcifar_superlink_run_list_up``: 1 when the run list answered this scrape, else 0.

Only runs that have not finished and the ``FINISHED_KEPT`` most recent finished ones are exported,
so the series stay few however many runs a SuperLink has seen.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedcifar.deploy.flwr_cli import flag_value

log = logging.getLogger(__name__)
FINISHED_KEPT = 5
RUN_STATE_SERIES = (
    "fedcifar_run_info",
    "fedcifar_run_status_since_timestamp_seconds",
    "fedcifar_superlink_run_list_up",
)
DEFAULT_PORT = 8000  # flower-superlink's one HTTP port, without --port
TIMEOUT_SECONDS = 5.0  # a scrape waits at most this for the run list


class RunStateCollector(Collector):
    def __init__(self, address: str, root_certificates: str | None) -> None:
        self.address, self.root_certificates = address, root_certificates

    @classmethod
    def of(cls, command: list[str]) -> RunStateCollector:
        """For the ``flower-superlink`` of ``command``, over the loopback (its certificate names 127.0.0.1)."""
        port = flag_value(command, "--port") or DEFAULT_PORT
        return cls(f"127.0.0.1:{port}", flag_value(command, "--ssl-ca-certfile"))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "fedcifar_run_info",
            "Each run the SuperLink holds, in its current state (Flower's status and sub-status): 1.",
            labels=["run_id", "status", "sub_status"],
        )
        since = GaugeMetricFamily(
            "fedcifar_run_status_since_timestamp_seconds",
            "When each run entered its current status (Unix time).",
            labels=["run_id"],
        )
        up = GaugeMetricFamily(
            "fedcifar_superlink_run_list_up", "Whether the SuperLink's run list answered this scrape (1) or not (0)."
        )
        try:
            runs = self._runs()
        except Exception as err:  # the SuperLink starting, stopping or overloaded: the scrape says so
            log.debug("the SuperLink's run list is unavailable: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for run in exported(runs):
            status = run.status
            info.add_metric([str(run.run_id), status.status, status.sub_status], 1)
            if entered := status_since(run):
                since.add_metric([str(run.run_id)], entered)
        yield from (info, since, up)

    def _runs(self) -> list:
        from flwr.proto.control_pb2 import ListRunsRequest

        # a connection per scrape, closed after it: one kept alive held the SuperLink's shutdown for 30 s
        # (uvicorn waits for open connections)
        client = self._connect()
        try:
            return list(client.ListRuns(ListRunsRequest()).run_dict.values())
        finally:
            client.close()

    def _connect(self):
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

        tls = self.root_certificates
        return ControlHttpClient(  # as from_server_address builds it, with a scrape's timeout
            f"{'https' if tls else 'http'}://{self.address}",
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            verify=ssl.create_default_context(cafile=tls) if tls else False,
            timeout=TIMEOUT_SECONDS,
        )


def exported(runs: list) -> list:
    """The runs not finished, and the ``FINISHED_KEPT`` that finished last."""
    finished = sorted((r for r in runs if r.status.status == "finished"), key=lambda r: r.finished_at, reverse=True)
    return [r for r in runs if r.status.status != "finished"] + finished[:FINISHED_KEPT]


def status_since(run) -> float | None:
    """When ``run`` entered its current status (Unix time), from Flower's ISO timestamps."""
    stamp = {"pending": run.pending_at, "starting": run.starting_at, "running": run.running_at}.get(
        run.status.status, run.finished_at
    )
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None
