"""The Host protocol is the whole interface: the daemon runs a bare host, and the dry-run wrapper is a full host."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rescoin.hosts.actuators import cores_for_quota_us, quota_us
from rescoin.hosts.base import ApplyResult, HostBase, HostSetup
from rescoin.hosts.dryrun import DryRunHost
from rescoin.hosts.sim import SimHost
from rescoin.offline.traces import load_trace, sample_trace_path
from rescoin.ops import daemon as daemon_mod
from rescoin.ops.config import parse
from rescoin.ops.status import snapshot

#: everything the Host protocol names; a daemon that reaches for anything else fails the strict host below
PROTOCOL = {"capacity", "observe", "apply", "period", "start", "resume", "originals", "unrestored",
            "reconfigure", "restore", "known_vms", "publish_ledger", "close"}


class BareHost(HostBase):
    """A host with the loop's three members only (a replay underneath); every extra is HostBase's default."""

    def __init__(self) -> None:
        self._sim = SimHost(load_trace(sample_trace_path(), vms=3, days=0.05))

    @property
    def capacity(self):
        return self._sim.capacity

    def observe(self):
        return self._sim.observe()

    def apply(self, plan):
        return self._sim.apply(plan)


class StrictHost(BareHost):
    """Refuses every attribute outside the protocol to callers outside this module's classes."""

    def __getattribute__(self, name: str):
        if not name.startswith("_") and name not in PROTOCOL:
            raise AssertionError(f"the daemon reached past the Host protocol: {name}")
        return object.__getattribute__(self, name)


def test_daemon_runs_reloads_reports_and_stops_on_a_host_with_only_the_protocol(tmp_path, monkeypatch):
    host = StrictHost()
    monkeypatch.setattr(daemon_mod, "build_host", lambda cfg, sim=None, setup=None: host)
    path = tmp_path / "rescoin.toml"
    text = (f'[daemon]\nuri = "sim:"\nperiod = 1\nstate_file = "{tmp_path / "state.npz"}"\nhistory_dir = ""\n'
            'status_socket = ""\nrestore_on_exit = true\n[metrics]\nenabled = false\n')
    path.write_text(text)
    d = daemon_mod.Daemon(parse(text), config_path=str(path))
    assert d.real_host is host and d.host is host
    d._after_step(d.step())
    snap = snapshot(d, d.last_step)
    assert {vm["agent"] for vm in snap["vms"]} == {"simulated"}
    path.write_text(text.replace("period = 1", "period = 1\ndry_run = true"))
    d.reload()
    assert isinstance(d.host, DryRunHost) and d.host.host is host
    step = d.step()
    assert step.result.total == 0
    d._after_step(step)
    path.write_text(text)
    d.reload()
    assert d.host is host
    d.speed = 1e6
    assert d.run(max_periods=2) == 0  # start(), two periods, then close(): restore_on_exit with nothing to put back
    assert d.periods == 4
    with np.load(tmp_path / "state.npz") as data:
        assert json.loads(str(data["originals"])) == {} and json.loads(str(data["unrestored"])) == []


class Recording(HostBase):
    """An inner host that records every protocol call made on it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.period = 42.0

    @property
    def capacity(self):
        self.calls.append("capacity")
        return "cap"

    def observe(self):
        self.calls.append("observe")
        return "obs"

    def apply(self, plan):
        self.calls.append("apply")
        return ApplyResult(applied={"shares": 1})

    def start(self):
        self.calls.append("start")

    def resume(self, originals, unrestored):
        self.calls.append(f"resume {sorted(originals)} {sorted(unrestored)}")

    def originals(self):
        return {"u1": {"shares": 1}}

    def unrestored(self):
        return {"u2"}

    def reconfigure(self, setup):
        self.calls.append("reconfigure")

    def restore(self, timeout):
        self.calls.append("restore")
        return 3

    def known_vms(self):
        return [("u1", "a")]

    def close(self):
        self.calls.append("close")


def test_dry_run_wrapper_passes_observations_through_and_carries_nothing_out(kit, capsys):
    inner = Recording()
    dry = DryRunHost(inner)
    assert (dry.capacity, dry.period, dry.observe(), dry.known_vms(), dry.originals()) == (
        "cap", 42.0, "obs", [("u1", "a")], {"u1": {"shares": 1}})
    dry.start()
    dry.reconfigure(HostSetup())  # settings are not actions: the real host takes them
    dry.resume({"u1": {}}, {"u3"})  # the pending restores wait in the wrapper
    assert dry.unrestored() == {"u2", "u3"}
    assert dry.restore(timeout=1.0) == 0
    dry.close()
    sim = SimHost(kit.trace(np.full((2, 2, 4), 0.5), np.array([[2.0, 1024.0, np.nan, np.nan]] * 2)))
    from rescoin.core.guard import Guard
    from rescoin.core.model import Allocation

    obs = sim.observe()
    alloc = np.full((2, 4), np.nan)
    alloc[:, 0] = [0.5, 1.5]
    plan = Guard().plan(Allocation(alloc, caps=np.zeros(4, dtype=bool)), obs, obs.host.capacity)
    assert plan.changed["shares"].any()
    res = dry.apply(plan)
    assert res.total == 0 and res.actions is None and "shares" in res.applied
    assert inner.calls == ["capacity", "observe", "start", "reconfigure", "resume ['u1'] []"]
    assert "apply" not in inner.calls and "restore" not in inner.calls and "close" not in inner.calls


@pytest.mark.parametrize("quota", [1000, 33333, 50000, 100000, 123457, 17592186044415])
@pytest.mark.parametrize("vcpus", [1, 3, 7])
def test_an_original_quota_comes_back_exactly(quota, vcpus):
    assert quota_us(cores_for_quota_us(quota, vcpus), vcpus) == quota


def test_no_original_quota_removes_the_cap():
    for q in (None, -1, 0):
        assert quota_us(cores_for_quota_us(q, 2), 2) == -1


class Publishing(BareHost):
    """A bare host that records the ledgers the daemon publishes."""

    def __init__(self) -> None:
        self._sim = SimHost(load_trace(sample_trace_path(), vms=3, days=0.1))  # 28 periods
        self.published: list[tuple[list[str], np.ndarray]] = []

    def publish_ledger(self, uuids, ledger):
        self.published.append((uuids.tolist(), np.array(ledger)))


def test_daemon_publishes_the_credit_ledgers_every_ledger_period(tmp_path, monkeypatch):
    host = Publishing()
    monkeypatch.setattr(daemon_mod, "build_host", lambda cfg, sim=None, setup=None: host)
    text = (f'[daemon]\nuri = "sim:"\nperiod = 1\nstate_file = "{tmp_path / "state.npz"}"\nhistory_dir = ""\n'
            'status_socket = ""\n[metrics]\nenabled = false\n')
    d = daemon_mod.Daemon(parse(text))
    for _ in range(2 * daemon_mod.LEDGER_EVERY):
        d._after_step(d.step())
    assert len(host.published) == 2  # every LEDGER_EVERY periods, not every period
    uuids, ledger = host.published[-1]
    assert len(uuids) == 3 and ledger.shape == (3, 4) and np.isfinite(ledger).all()
    assert np.allclose(ledger, d.last_step.allocation.diagnostics["ledger"])
