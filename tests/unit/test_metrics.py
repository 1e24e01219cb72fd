"""The Prometheus metrics: what each series holds after real control steps, and the bounded endpoint."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rescoin.core.loop import ControlLoop
from rescoin.core.registry import build
from rescoin.core.resources import CPU, MEMORY, N_RES, RESOURCES
from rescoin.hosts.sim import SimHost
from rescoin.ops import metrics as metrics_mod
from rescoin.ops.config import ConfigError
from rescoin.ops.metrics import MAX_CONNECTIONS, Metrics

NAN = float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample in the registry: (name, sorted labels) -> value."""
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(port: int, timeout: float = 5.0) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()


def sim_loop(kit, periods: int = 6, presence=None):
    rng = np.random.default_rng(3)
    demand = np.full((periods, 3, N_RES), NAN)
    demand[:, :, CPU] = rng.uniform(0.2, 1.5, (periods, 3))
    demand[:, :, MEMORY] = rng.uniform(200, 900, (periods, 3))
    sizes = np.array([[2.0, 1024.0, NAN, NAN]] * 3)
    host = SimHost(kit.trace(demand, sizes), overcommit=1.5, presence=presence)
    loop = ControlLoop(host, build("rescoin"), period=300.0)
    return loop, SimpleNamespace(history=loop.history, host=host)  # what Metrics.update reads of the daemon


def test_update_exports_what_each_step_saw_and_did(kit):
    loop, daemon = sim_loop(kit)
    m = Metrics()
    applied, steps = Counter(), 0
    for step in loop.steps():
        m.update(daemon, step)
        applied.update(step.result.applied)
        steps += 1
        last = step
    got = samples(m)
    names = [str(x) for x in last.obs.vms.names]
    for i, name in enumerate(names):
        for res in RESOURCES:
            labels = (("resource", res.label), ("vm", name))
            usage = last.obs.usage[i, res]
            if np.isfinite(usage):
                assert got[("rescoin_vm_usage", labels)] == pytest.approx(usage)
            alloc = last.allocation.amount[i, res]
            if np.isfinite(alloc):
                assert got[("rescoin_vm_allocation", labels)] == pytest.approx(alloc)
        assert ("rescoin_vm_credit", (("vm", name),)) in got
        assert got[("rescoin_vm_balloon_mib", (("vm", name),))] == pytest.approx(last.plan.controls.balloon[i])
    assert ("rescoin_vm_forecast", (("resource", "cpu"), ("vm", names[0]))) in got
    assert ("rescoin_vm_forecast_error", (("resource", "memory"), ("vm", names[0]))) in got
    assert got[("rescoin_vms", ())] == last.obs.n
    assert got[("rescoin_loop_seconds_count", ())] == steps
    for kind, n in applied.items():
        assert got[("rescoin_actions_total", (("kind", kind), ("result", "ok")))] == n
    assert sum(applied.values()) > 0


def test_a_vm_that_leaves_drops_its_series(kit):
    presence = np.ones((6, 3), dtype=bool)
    presence[3:, 2] = False  # the third VM goes away after three periods
    loop, daemon = sim_loop(kit, presence=presence)
    m = Metrics()
    seen = []
    for step in loop.steps():
        m.update(daemon, step)  # right after each step, as the daemon does
        seen.append({dict(labels).get("vm") for _, labels in samples(m)} - {None})
    assert len(seen[2]) == 3 and len(seen[-1]) == 2 and seen[-1] < seen[2]
    assert samples(m)[("rescoin_vms", ())] == 2


def test_failed_calls_are_counted_by_call_from_what_the_host_reported(kit):
    from dataclasses import replace

    loop, daemon = sim_loop(kit)
    step = loop.step()
    step = replace(step, obs=replace(step.obs, call_errors={"setMemoryFlags": 2, "getAllDomainStats": 1}))
    step.result.call_errors = {"setMemoryFlags": 1}
    m = Metrics()
    m.update(daemon, step)
    got = samples(m)
    assert got[("rescoin_libvirt_errors_total", (("call", "setMemoryFlags"),))] == 3
    assert got[("rescoin_libvirt_errors_total", (("call", "getAllDomainStats"),))] == 1
    assert step.obs.call_errors == {"setMemoryFlags": 2, "getAllDomainStats": 1}  # a reporter changes nothing


def test_serve_moves_the_endpoint_and_close_releases_the_port():
    port, port2 = free_port(), free_port()
    m = Metrics(f"127.0.0.1:{port}")
    try:
        assert "rescoin_vms" in scrape(port)
        m.serve(f"127.0.0.1:{port2}")
        assert "rescoin_vms" in scrape(port2)
        with pytest.raises(urllib.error.URLError):
            scrape(port)
    finally:
        m.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port2)
    with socket.socket() as s:  # no one listens there any more (TIME_WAIT aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port2))
        s.listen()


def test_a_port_in_use_or_a_bad_address_is_one_line_and_keeps_the_endpoint():
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="Address already in use"):
            Metrics(f"127.0.0.1:{taken}")
        m = Metrics(f"127.0.0.1:{port}")
        try:
            with pytest.raises(ConfigError) as e:
                m.serve(f"127.0.0.1:{taken}")
            assert str(e.value).startswith(f"metrics.listen = '127.0.0.1:{taken}'")
            assert m.listen == f"127.0.0.1:{port}" and "rescoin_vms" in scrape(port)  # still served
        finally:
            m.close()
    for bad, words in [("127.0.0.1:99999", "1 .. 65535"), ("127.0.0.1", "HOST:PORT"),
                       ("999.1.1.1:9000", "cannot resolve"), (":9000", "HOST:PORT")]:
        with pytest.raises(ConfigError, match=words) as e:
            Metrics(bad)
        assert len(str(e.value).splitlines()) == 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connections_cannot_exhaust_descriptors_or_keep_a_scrape_out():
    port = free_port()
    m = Metrics(f"127.0.0.1:{port}")
    idle: list[socket.socket] = []
    try:
        scrape(port)
        fds0, threads0 = _fds(), threading.active_count()
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        t0 = time.monotonic()
        assert "rescoin_vms" in scrape(port)  # a normal scrape still gets through, and at once
        assert time.monotonic() - t0 < 2
        # accepted in order, so every idle one was accepted before the scrape; the evicted ones close
        deadline = time.monotonic() + 3
        while _fds() - fds0 - len(idle) > MAX_CONNECTIONS + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds() - fds0 - len(idle) <= MAX_CONNECTIONS + 4
        assert threading.active_count() - threads0 <= MAX_CONNECTIONS + 4
    finally:
        for s in idle:
            s.close()
        m.close()


def test_an_idle_connection_is_closed_after_the_idle_time(monkeypatch):
    monkeypatch.setattr(metrics_mod._Handler, "timeout", 0.3)
    port = free_port()
    m = Metrics(f"127.0.0.1:{port}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metr")  # half a request, then silence
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # the server hangs up, well before the client's 5 s
            assert time.monotonic() - t0 < 3
    finally:
        m.close()
