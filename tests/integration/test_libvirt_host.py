"""LibvirtHost and its actuators against libvirt's real test driver (test:///default).

The test driver keeps its state per connection, so each test drives the host
and defines extra domains through the host's own connection.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from rescoin.core.guard import Guard  # noqa: E402
from rescoin.core.loop import ControlLoop  # noqa: E402
from rescoin.core.model import Allocation  # noqa: E402
from rescoin.core.registry import build  # noqa: E402
from rescoin.hosts.agent import AgentClient  # noqa: E402
from rescoin.hosts.config import HostConfig  # noqa: E402
from rescoin.hosts.libvirt import HostUnavailable, LibvirtHost, _cpumap  # noqa: E402

EXTRA = """<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>
<currentMemory unit='MiB'>1024</currentMemory><vcpu>{vcpus}</vcpu>
<os><type>hvm</type></os><devices/></domain>"""


@pytest.fixture
def host():
    h = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0))
    yield h
    h.close()


def add_vm(host: LibvirtHost, name: str, vcpus: int = 1):
    dom = host.lv.connect().defineXML(EXTRA.format(name=name, vcpus=vcpus))
    dom.create()
    return dom


def test_observe_reads_identity_sizes_and_capacity(host):
    obs = host.observe()
    assert obs.vms.names.tolist() == ["test"]
    assert obs.vms.uuids[0] == "6695eb01-f6a4-8304-79aa-97f2502e193f"
    assert obs.vms.sizes[0, 0] == 2 and obs.vms.sizes[0, 1] == 8192
    info = host.lv.connect().getInfo()
    assert obs.host.pcpus == info[2]
    assert obs.host.capacity[1] == info[1] - host.config.reserve_mib
    assert obs.age.tolist() == [0]


def test_one_bulk_stats_call_per_period_and_none_per_vm(host):
    host.observe()  # first sight: per-VM setup calls happen once
    for _ in range(3):
        host.observe()
        assert dict(host.lv.calls) == {"getAllDomainStats": 1}


def test_loop_applies_actions_read_back_from_libvirt(host):
    loop = ControlLoop(host, build("rescoin"), period=1.0)
    step = loop.step()
    dom = host.lv.connect().lookupByName("test")
    assert step.result.failed == {}
    # the test driver accepts scheduler weights but does not store them (its setter is a no-op):
    # shares are read back on real QEMU guests in tests/e2e
    assert step.plan.changed["shares"][0] and step.result.applied["shares"] == 1
    assert dom.blkioParameters()["weight"] == int(step.plan.controls.blkio[0])
    pins = dom.vcpuPinInfo(0)
    width = step.plan.controls.pin_width
    for v, group in enumerate(step.plan.controls.pins):
        expect = _cpumap(len(pins[v]), group * width, width)
        assert tuple(pins[v]) == expect
    # calls this period: one bulk-stats call plus one per action
    later = loop.step()
    assert host.lv.calls["getAllDomainStats"] == 1
    assert sum(host.lv.calls.values()) == 1 + sum(later.result.applied.values()) + sum(later.result.failed.values())


def test_balloon_target_is_applied_and_read_back(host):
    obs = host.observe()
    alloc = np.full((1, 4), np.nan)
    alloc[0, 1] = 2600.0  # MiB: above the 2048 MiB the test domain has, below the host's 3072
    plan = Guard().plan(Allocation(alloc, caps=np.zeros(4, dtype=bool)), obs, obs.host.capacity)
    assert plan.changed["balloon"][0]
    res = host.apply(plan)
    assert res.applied.get("balloon") == 1
    dom = host.lv.connect().lookupByName("test")
    assert dom.info()[2] == int(round(plan.controls.balloon[0] * 1024))



def test_pin_then_float_again_is_applied_and_read_back(host):
    def apply_pins(pins, width):
        obs = host.observe()
        alloc = Allocation(np.full((1, 4), np.nan), caps=np.zeros(4, dtype=bool)).with_pins(np.array(pins), width)
        plan = Guard().plan(alloc, obs, obs.host.capacity)
        assert host.apply(plan).failed == {}
        return host.lv.connect().lookupByName("test").vcpuPinInfo(0)

    pcpus = host.observe().host.pcpus
    width = 2 if pcpus >= 4 else 1
    # (the test driver reports 16 pCPUs but keeps 8-entry maps)
    maps = apply_pins([1, 1], width)  # both vCPUs on the second pin set
    assert all(tuple(m) == _cpumap(len(m), width, width) for m in maps)
    maps = apply_pins([1, -1], width)  # vCPU 1 floats again: every pCPU allowed
    assert tuple(maps[0]) == _cpumap(len(maps[0]), width, width) and all(maps[1])
    # a new host adopting the VM reads the sets back as set indexes, floating as -1
    again = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0))
    again.lv = host.lv  # the test driver keeps state per connection
    ctl = again.observe().controls
    assert ctl.pins.tolist() == [1, -1] and ctl.pin_width == width

def test_vm_appearing_and_vanishing_is_followed_next_period(host):
    loop = ControlLoop(host, build("rescoin"), period=1.0)
    loop.step()
    dom = add_vm(host, "extra", vcpus=3)
    step = loop.step()
    assert sorted(step.obs.vms.names.tolist()) == ["extra", "test"]
    assert step.obs.age[step.obs.vms.names.tolist().index("extra")] == 0
    dom.destroy()
    step = loop.step()
    assert step.obs.vms.names.tolist() == ["test"]
    assert loop.history.n == 1


def test_vm_vanishing_between_observe_and_apply_is_survived(host):
    host.observe()
    dom = add_vm(host, "short-lived")
    loop = ControlLoop(host, build("static"), period=1.0)
    obs = host.observe()
    assert "short-lived" in obs.vms.names.tolist()
    dom.destroy()
    dom.undefine()
    from rescoin.core.policies import PolicyInput, entitlement

    ent = entitlement(obs.vms.sizes, obs.vms.weight, obs.host.capacity)
    loop.history.push(obs)
    alloc = loop.policy.allocate(PolicyInput(obs, None, loop.history, obs.host.capacity, ent, 1.0))
    plan = Guard().plan(alloc, obs, obs.host.capacity, ent)
    res = host.apply(plan)  # must not raise
    assert sum(res.failed.values()) >= 1
    assert any("short-lived" in e for e in res.errors)
    assert host.observe().vms.names.tolist() == ["test"]


def test_lost_connection_is_reopened(host):
    host.observe()
    host.lv.conn.close()  # libvirtd went away
    obs = host.observe()  # reconnects (the test driver starts from its default state)
    assert obs.vms.names.tolist() == ["test"]


def test_unreachable_hypervisor_raises_host_unavailable_with_backoff():
    h = LibvirtHost("qemu+unix:///system?socket=/nonexistent/rescoin-test.sock")
    with pytest.raises(HostUnavailable, match="cannot connect"):
        h.observe()
    with pytest.raises(HostUnavailable, match="next attempt"):
        h.observe()  # within the backoff: no new connection attempt


def test_restore_puts_back_original_settings(host):
    dom = host.lv.connect().lookupByName("test")
    dom.setBlkioParameters({"weight": 500}, 0)
    before = (dom.blkioParameters()["weight"], [tuple(p) for p in dom.vcpuPinInfo(0)], dom.info()[2])
    loop = ControlLoop(host, build("rescoin"), period=1.0)
    loop.step()
    dom.setMemoryFlags(before[2] - 4096, 0)  # and a balloon change, as a later period would make
    changed = (dom.blkioParameters()["weight"], [tuple(p) for p in dom.vcpuPinInfo(0)], dom.info()[2])
    assert changed[1] != before[1] and changed[2] != before[2]
    assert host.restore() == 1
    after = (dom.blkioParameters()["weight"], [tuple(p) for p in dom.vcpuPinInfo(0)], dom.info()[2])
    assert after == before


def test_cpumap_covers_more_than_eight_cpus():
    m = _cpumap(200, 96, 8)
    assert len(m) == 200 and sum(m) == 8 and m[96] and m[103] and not m[104]


def test_dry_run_host_applies_nothing(host, capsys):
    from rich.console import Console

    from rescoin.hosts.dryrun import DryRunHost

    dry = DryRunHost(host, Console(file=None, force_terminal=False))
    loop = ControlLoop(dry, build("rescoin"), period=1.0)
    step = loop.step()
    dom = host.lv.connect().lookupByName("test")
    assert step.plan.changed["blkio"][0] and step.plan.changed["pin"].any()
    assert dom.blkioParameters()["weight"] == 0  # the test driver's default, untouched
    assert all(all(p) for p in dom.vcpuPinInfo(0))  # no pins applied
    assert "dry-run" in capsys.readouterr().out


def test_disk_cap_and_memtune_soft_limit_reach_libvirt():
    from rescoin.core.model import Allocation as A

    h = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0, memtune_soft_limit=True))
    obs = h.observe()
    alloc = np.full((1, 4), np.nan)
    alloc[0, 1] = 2600.0
    alloc[0, 2] = 3000.0  # KiB/s
    caps = np.array([False, False, True, False])
    ent = np.zeros((1, 4))
    plan = Guard().plan(A(alloc, caps=caps), obs, obs.host.capacity, ent)
    assert plan.changed["diskcap"][0] and plan.changed["balloon"][0]
    res = h.apply(plan)
    assert res.failed == {}, res.errors
    dom = h.lv.connect().lookupByName("test")
    assert dom.blockIoTune("vda", 0)["total_bytes_sec"] == 3000 * 1024
    assert dom.memoryParameters(0)["soft_limit"] == int(round(plan.controls.balloon[0] * 1024))
    h.close()


def test_per_vm_config_weight_memory_bounds_and_exclude():
    from rescoin.ops.config import parse

    cfg = parse('[vm.test]\nweight = 3\nmin_memory_mib = 700\nmax_memory_mib = 4096\n[vm.extra]\nexclude = true\n')
    h = LibvirtHost("test:///default", vm_config=cfg.for_vm)
    add_vm(h, "extra")
    obs = h.observe()
    assert obs.vms.names.tolist() == ["test"]  # excluded VM not managed
    assert obs.vms.weight[0] == 3.0 and obs.vms.min_memory[0] == 700.0 and obs.vms.sizes[0, 1] == 4096.0
    h.close()


# -- guest agents on the domain's virtio channel (real UNIX sockets) -----------------------------

AGENT_VM = """<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>
<currentMemory unit='MiB'>1024</currentMemory><vcpu>1</vcpu><os><type>hvm</type></os>
<devices><channel type='unix'><source mode='bind' path='{path}'/>
<target type='virtio' name='org.rescoin.agent.0'/></channel></devices></domain>"""
KEY = b"a shared key of 16+ bytes"


class ChannelAgent:
    """An unsigned agent behind a VM's virtio channel socket, answering with ``mem`` (KiB)."""

    def __init__(self, path: Path, mem: dict) -> None:
        self.mem = mem
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                nonce = json.loads(conn.makefile().readline())["nonce"]
                conn.sendall(json.dumps({"v": 1, "ts": 0, "nonce": nonce, "mem": self.mem}).encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def agent_vm():
    """make(mem, key) -> a LibvirtHost (agent client with ``key``) and an agent behind VM 'ag'."""
    tmp = Path(tempfile.mkdtemp(prefix="rcl", dir="/tmp"))  # short: UNIX socket paths
    made = []

    def make(mem: dict, key: bytes | None = None) -> LibvirtHost:
        h = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0),
                        agents=AgentClient(timeout=1.0, key=key))
        path = tmp / "ag.sock"
        h.lv.connect().defineXML(AGENT_VM.format(name="ag", path=path)).create()
        made.append((h, ChannelAgent(path, mem)))
        return h

    yield make
    for h, agent in made:
        agent.close()
        dom = h.lv.connect().lookupByName("ag")  # the test driver's state can outlive a failed test
        dom.destroy()
        dom.undefine()
        h.close()
    shutil.rmtree(tmp, ignore_errors=True)


def row(obs, name: str) -> int:
    return obs.vms.names.tolist().index(name)


def test_key_file_set_virtio_agent_still_answers(agent_vm):
    host = agent_vm({"total_kib": 1000 * 1024, "available_kib": 600 * 1024}, key=KEY)  # [agent] key_file set
    obs = host.observe()
    i = row(obs, "ag")
    assert host.agents.last_errors == {}
    assert obs.usage[i, 1] == pytest.approx(400.0)  # the agent's figure: the test driver has no balloon stats
    assert not obs.confirmed[i]  # ... so nothing the host measures backs it


def test_agent_values_beyond_the_vm_size_are_no_agent_data(agent_vm, caplog):
    host = agent_vm({"total_kib": 10**18, "available_kib": 1024})  # MemTotal 1e18 KiB in a 1 GiB VM
    loop = ControlLoop(host, build("rescoin"), period=1.0)
    with caplog.at_level(logging.WARNING, "rescoin.libvirt"):
        steps = [loop.step() for _ in range(3)]
    for step in steps:
        i = row(step.obs, "ag")
        assert np.isnan(step.obs.usage[i, 1])  # rejected: as if the VM had no agent
        fc = step.forecast.value[:, 1] if step.forecast is not None else np.array([])
        assert np.all(np.isnan(fc) | (fc <= 8192.0)), "an agent's value reached the forecast"
    assert "beyond the VM's 1024 MiB" in host.agents.last_errors[steps[-1].obs.vms.uuids[i]]
    assert sum("beyond the VM's" in r.message for r in caplog.records) == 1  # said once, not every period


def test_per_vm_max_memory_below_use_keeps_the_floor(caplog):
    from rescoin.ops.config import parse

    # 64 MiB limit for a guest holding 2048 MiB whose use the host cannot see: nothing is reclaimed
    cfg = parse("[vm.test]\nmax_memory_mib = 64\n")
    h = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0), vm_config=cfg.for_vm)
    loop = ControlLoop(h, build("rescoin"), period=1.0)
    dom = h.lv.connect().lookupByName("test")
    before = dom.info()[2]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            step = loop.step()
            assert step.plan.controls.balloon[0] >= 256.0
            assert dom.info()[2] == before, "a target under the floor reached libvirt"
    assert sum("memory limit 64 MiB is below its floor" in r.message for r in caplog.records) == 1
    h.close()


class RecordingActuator:
    """LibvirtActuator's calls, each recorded as (call, VM, arguments) when made."""

    name = "recording"

    def __init__(self) -> None:
        from rescoin.hosts.actuators import LibvirtActuator

        self.real, self.made = LibvirtActuator(), []

    def _wrap(self, call, vm: str):
        what, fn, args = call

        def run(*a):
            self.made.append((what, vm, a))
            return fn(*a)

        return what, run, args

    def cpu(self, state, dom, shares, quota):
        return self._wrap(self.real.cpu(state, dom, shares, quota), state.name)

    def blkio(self, state, dom, weight):
        return self._wrap(self.real.blkio(state, dom, weight), state.name)

    def pin(self, state, dom, vcpu, cpumap):
        return self._wrap(self.real.pin(state, dom, vcpu, cpumap), state.name)


def test_restore_goes_through_the_hosts_actuator():
    act = RecordingActuator()
    h = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0), actuator=act)
    try:
        dom = h.lv.connect().lookupByName("test")
        dom.setBlkioParameters({"weight": 500}, 0)
        before = (dom.blkioParameters()["weight"], [tuple(p) for p in dom.vcpuPinInfo(0)])
        ControlLoop(h, build("rescoin"), period=1.0).step()
        assert dom.blkioParameters()["weight"] != 500
        act.made.clear()
        assert h.restore() == 1
        made = [(what, vm) for what, vm, _ in act.made]
        assert ("setSchedulerParameters", "test") in made and ("setBlkioParameters", "test") in made
        assert made.count(("pinVcpuFlags", "test")) == len(before[1])  # one per vCPU, as found
        blkio_args = next(a for what, _, a in act.made if what == "setBlkioParameters")
        assert blkio_args[0] == {"weight": 500}
        assert (dom.blkioParameters()["weight"], [tuple(p) for p in dom.vcpuPinInfo(0)]) == before
    finally:
        h.close()


def test_observation_and_apply_result_carry_health_and_failed_calls(host):
    dom = add_vm(host, "short-lived")
    obs = host.observe()
    assert obs.health == ["no agent", "no agent"]
    assert obs.call_errors == {"setMemoryStatsPeriod": 1}  # the extra VM has no balloon device
    dom.destroy()  # gone between observe and apply
    dom.undefine()
    i = obs.vms.names.tolist().index("short-lived")
    plan = Guard().plan(Allocation(np.full((2, 4), np.nan), caps=np.zeros(4, dtype=bool)), obs, obs.host.capacity)
    plan.changed["blkio"][i], plan.controls.blkio[i] = True, 300.0  # one action, on the vanished VM
    res = host.apply(plan)
    uuid = obs.vms.uuids[i]
    assert res.actions[uuid] == [("blkio", False)] and res.actions[obs.vms.uuids[1 - i]] == []
    assert res.call_errors == {"setBlkioParameters": 1}
    assert host.apply(plan).call_errors == {"setBlkioParameters": 1}  # each result: its own calls only
    assert host.observe().call_errors == {}


ARRIVING = """<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>
<currentMemory unit='MiB'>1024</currentMemory><vcpu>1</vcpu>
<metadata><rescoin:credits xmlns:rescoin="{ns}"><c>0.5</c><c>300.0</c><c>0.0</c><c>0.0</c></rescoin:credits></metadata>
<os><type>hvm</type></os><devices/></domain>"""


def test_a_vm_arriving_with_a_ledger_brings_it_to_the_loop_once(host):
    from rescoin.hosts.libvirt.ledger import CREDITS_NS

    loop = ControlLoop(host, build("rescoin"), period=1.0)
    loop.step()
    dom = host.lv.connect().defineXML(ARRIVING.format(name="migrated", ns=CREDITS_NS))
    dom.create()
    step = loop.step()
    assert step.obs.carried == {dom.UUIDString(): (0.5, 300.0, 0.0, 0.0)}
    i = step.obs.vms.uuids.tolist().index(dom.UUIDString())
    carried = loop.history.carried()
    assert carried is not None and carried[i].tolist() == [0.5, 300.0, 0.0, 0.0]
    assert step.allocation.diagnostics["credit"][i, 1] > 0  # it arrives with credits, not from zero
    assert loop.step().obs.carried == {}  # said once, on first sight


def test_published_ledger_is_in_the_live_metadata_and_a_dry_run_writes_none(host):
    from rescoin.hosts.dryrun import DryRunHost
    from rescoin.hosts.libvirt.ledger import read_credits

    obs = host.observe()
    dom = host.lv.connect().lookupByUUIDString(obs.vms.uuids[0])
    DryRunHost(host).publish_ledger(obs.vms.uuids, np.array([[1.0, 2.0, 3.0, 4.0]]))
    assert read_credits(host.lv, dom) == ()
    host.publish_ledger(obs.vms.uuids, np.array([[1.0, 2.0, 3.0, 4.0]]))
    assert read_credits(host.lv, dom) == (1.0, 2.0, 3.0, 4.0)
    host.publish_ledger(obs.vms.uuids, np.array([[np.nan, 2.0, 3.0, 4.0]]))  # unknown: left as it was
    assert read_credits(host.lv, dom) == (1.0, 2.0, 3.0, 4.0)
