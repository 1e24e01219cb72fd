"""Opt-in Prometheus metrics, served on loopback by default.

Per VM and resource: usage, forecast, allocation, absolute forecast error;
per VM: credit, balloon target; counters of actions by kind and result, of
libvirt errors by call; a histogram of the loop's duration.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .policies.base import PolicyInput
from .policies.rescoin import combined_credit, credits
from .resources import RESOURCES


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics.listen = {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:9848")
    return host.strip("[]"), int(port)


class Metrics:
    def __init__(self, listen: str, serve: bool = True) -> None:
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
        self._server = None
        if serve:
            host, port = parse_listen(listen)
            self._server, self._thread = start_http_server(port, addr=host, registry=r)

    def update(self, daemon, step) -> None:
        obs, h = step.obs, daemon.history
        names = [str(x) for x in obs.vms.names]
        fc_now = h.latest("forecast")
        fc = step.forecast.value if step.forecast is not None else np.full_like(obs.usage, np.nan)
        inp = PolicyInput(obs=obs, forecast=None, history=h, capacity=obs.host.capacity,
                          entitlement=step.entitlement, period=obs.interval)
        credit = combined_credit(credits(inp, 10), 1.0)
        for gone in self._known - set(names):  # a VM that left: drop its series
            for g in (self.usage, self.forecast, self.allocation, self.error):
                for res in RESOURCES:
                    try:
                        g.remove(gone, res.label)
                    except KeyError:
                        pass
            for g in (self.credit, self.balloon):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
        self._known = set(names)
        for i, name in enumerate(names):
            for res in RESOURCES:
                for g, v in ((self.usage, obs.usage[i, res]), (self.forecast, fc[i, res]),
                             (self.allocation, step.allocation.amount[i, res]),
                             (self.error, abs(obs.usage[i, res] - fc_now[i, res]))):
                    if np.isfinite(v):
                        g.labels(name, res.label).set(float(v))
            self.credit.labels(name).set(float(credit[i]))
            if np.isfinite(step.plan.controls.balloon[i]):
                self.balloon.labels(name).set(float(step.plan.controls.balloon[i]))
        for kind, n in step.result.applied.items():
            self.actions.labels(kind, "ok").inc(n)
        for kind, n in step.result.failed.items():
            self.actions.labels(kind, "failed").inc(n)
        lv = getattr(getattr(daemon.host, "host", daemon.host), "lv", None)
        if lv is not None:
            for call, n in lv.errors.items():
                self.libvirt_errors.labels(call).inc(n)
            lv.errors.clear()
        self.loop.observe(step.seconds)
        self.vms.set(obs.n)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
