"""Opt-in Prometheus metrics, served on loopback by default.

Per VM and resource: usage, forecast, allocation, absolute forecast error;
per VM: credit, balloon target; counters of actions by kind and result, of
libvirt errors by call; a histogram of the loop's duration.

The endpoint runs in the daemon's process, so it is bounded: at most
``MAX_CONNECTIONS`` open connections (past it the oldest is shut down) and
``IDLE_SECONDS`` of silence each, so idle connections held by a local user
can neither exhaust the daemon's file descriptors nor keep scrapes out.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, MetricsHandler

from rescoin.core.resources import RESOURCES
from rescoin.ops.config import ConfigError, parse_address

log = logging.getLogger("rescoin.ops.metrics")

MAX_CONNECTIONS = 32  # a scrape takes milliseconds: more than this open at once are idle or hostile
IDLE_SECONDS = 5.0  # a connection silent this long is closed


class _Handler(MetricsHandler):
    timeout = IDLE_SECONDS  # StreamRequestHandler puts it on the connection's socket


class MetricsServer(ThreadingHTTPServer):
    """HTTP for one registry with a cap on open connections; the oldest goes first past the cap."""

    daemon_threads = True  # stopping never waits for a connection
    request_queue_size = 128

    def __init__(self, address: tuple, family: int, registry: CollectorRegistry) -> None:
        self.address_family = family
        self._open: dict[socket.socket, None] = {}  # in accept order
        self._lock = threading.Lock()
        super().__init__(address, _Handler.factory(registry))

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self._open[request] = None
            while len(self._open) > MAX_CONNECTIONS:
                oldest = next(iter(self._open))
                del self._open[oldest]
                _hang_up(oldest)  # its thread sees end of file, ends and closes it
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics connection from %s failed", client_address, exc_info=True)

    def close(self) -> None:
        """Stop serving, release the port and hang up every open connection."""
        self.shutdown()
        self.server_close()
        with self._lock:
            for conn in list(self._open):
                _hang_up(conn)


def _hang_up(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        conn.shutdown(socket.SHUT_RDWR)


def start_server(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """A bounded endpoint serving ``registry`` on ``listen``; a ConfigError in one line if it cannot."""
    host, port = parse_address("metrics.listen", listen)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"metrics.listen = {listen!r}: cannot resolve {host!r} ({e})") from None
    try:
        server = MetricsServer(address, family, registry)
    except OSError as e:
        raise ConfigError(f"metrics.listen = {listen!r}: cannot listen there: {e.strerror or e}") from None
    threading.Thread(target=server.serve_forever, args=(0.2,), name="metrics", daemon=True).start()
    return server


class Metrics:
    """The daemon's series; served on ``listen`` when given (a reload may move or stop the endpoint)."""

    def __init__(self, listen: str | None = None) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["vm", "resource"]
        self.usage = Gauge("rescoin_vm_usage", "observed usage (cores, MiB, KiB/s)", labels, registry=r)
        self.forecast = Gauge("rescoin_vm_forecast", "forecast for the next period", labels, registry=r)
        self.allocation = Gauge("rescoin_vm_allocation", "allocation decided for the next period", labels,
                                registry=r)
        self.error = Gauge("rescoin_vm_forecast_error", "|usage - forecast made for this period|", labels,
                           registry=r)
        self.credit = Gauge("rescoin_vm_credit", "combined multi-resource credit", ["vm"], registry=r)
        self.balloon = Gauge("rescoin_vm_balloon_mib", "balloon target", ["vm"], registry=r)
        self.actions = Counter("rescoin_actions", "actions applied", ["kind", "result"], registry=r)
        self.libvirt_errors = Counter("rescoin_libvirt_errors", "libvirt calls that failed", ["call"], registry=r)
        self.loop = Histogram("rescoin_loop_seconds", "duration of one control step", registry=r,
                              buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5))
        self.vms = Gauge("rescoin_vms", "VMs managed", registry=r)
        self._known: set[str] = set()
        self._server: MetricsServer | None = None
        self.listen: str | None = None
        if listen:
            self.serve(listen)

    def serve(self, listen: str) -> None:
        """Serve on ``listen``, moving from the current address; a ConfigError keeps the current endpoint."""
        if listen == self.listen:
            return
        previous = self.listen
        self.close()  # first, so that moving to another address on the same port works
        try:
            self._server = start_server(listen, self.registry)
        except ConfigError:
            if previous is not None:
                try:
                    self._server = start_server(previous, self.registry)
                    self.listen = previous
                except ConfigError as e:
                    log.error("metrics endpoint lost: %s", e)
            raise
        self.listen = listen

    def update(self, daemon, step) -> None:
        obs, h = step.obs, daemon.history
        names = [str(x) for x in obs.vms.names]
        fc_now = h.latest("forecast")
        fc = step.forecast.value if step.forecast is not None else np.full_like(obs.usage, np.nan)
        credit = step.allocation.diagnostics["combined_credit"]  # NaN for a policy without credits
        for gone in self._known - set(names):  # a VM that left: drop its series
            for g in (self.usage, self.forecast, self.allocation, self.error):
                for res in RESOURCES:
                    with contextlib.suppress(KeyError):
                        g.remove(gone, res.label)
            for g in (self.credit, self.balloon):
                with contextlib.suppress(KeyError):
                    g.remove(gone)
        self._known = set(names)
        for i, name in enumerate(names):
            for res in RESOURCES:
                for g, v in ((self.usage, obs.usage[i, res]), (self.forecast, fc[i, res]),
                             (self.allocation, step.allocation.amount[i, res]),
                             (self.error, abs(obs.usage[i, res] - fc_now[i, res]))):
                    if np.isfinite(v):
                        g.labels(name, res.label).set(float(v))
            if np.isfinite(credit[i]):
                self.credit.labels(name).set(float(credit[i]))
            if np.isfinite(step.plan.controls.balloon[i]):
                self.balloon.labels(name).set(float(step.plan.controls.balloon[i]))
        for kind, n in step.result.applied.items():
            self.actions.labels(kind, "ok").inc(n)
        for kind, n in step.result.failed.items():
            self.actions.labels(kind, "failed").inc(n)
        for errors in (obs.call_errors, step.result.call_errors):  # this period's, as the host reported them
            for call, n in errors.items():
                self.libvirt_errors.labels(call).inc(n)
        self.loop.observe(step.seconds)
        self.vms.set(obs.n)

    def close(self) -> None:
        """Stop serving (the series stay, for a later ``serve``)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.listen = None


class ClusterMetrics:
    """The cluster balancer's series: migrations by outcome, their wall time, moves planned."""

    def __init__(self, listen: str | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.migrations = Counter("rescoin_migrations", "live migrations by outcome", ["outcome"], registry=r)
        self.migration_seconds = Histogram("rescoin_migration_seconds", "wall time of a successful migration",
                                           registry=r, buckets=(0.5, 1, 2, 3, 5, 10, 30, 60, 120))
        self.planned = Counter("rescoin_moves_planned", "moves the balancer proposed", registry=r)
        self.rounds = Counter("rescoin_balance_rounds", "balancer rounds", registry=r)
        self._server: MetricsServer | None = start_server(listen, r) if listen else None

    def migrated(self, outcome: str, seconds: float) -> None:
        self.migrations.labels(outcome).inc()
        if outcome == "ok":
            self.migration_seconds.observe(seconds)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
