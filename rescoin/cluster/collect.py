"""Build a ``ClusterState`` from several libvirt hosts: one bulk stats call per host per round.

What each field is made of (rates need two rounds: the first round gives 0):

* ``HostInfo.cpus``, ``memory_mib``: ``getInfo()`` (CPUs, node memory), capped by
  ``capacity`` when given (as the host daemon's ``memory_mib`` caps what VMs share).
* ``HostInfo.contention``: the share of its VMs' wanted memory and CPU the host
  could not give: ``max(sum mem_unserved / sum mem_forecast, sum cpu_unserved / cpus,
  (sum mem_used + reserve - memory) / sum mem_used)``, clipped to [0, 1]; the
  last is resident memory past what the host has (it swaps, or would).
* ``VmInfo.vcpus``: ``vcpu.current``; ``memory_mib``: ``balloon.maximum``.
* ``cpu_used``: the rate of ``cpu.time`` (cores); ``cpu_forecast``: the peak of
  that rate over the last ``CPU_PEAK_ROUNDS`` rounds on this host (a burst seen
  recently is what a target must take; the host daemon's forecasts are not read here).
* ``cpu_unserved``: the rate of ``vcpu.N.wait`` summed over vCPUs (time a vCPU
  was runnable but the host ran something else: steal seen from the host), or
  the agent's steal ticks when libvirt has no wait figure.
* ``mem_used``: ``balloon.rss`` (the host footprint), else ``balloon.current``.
* ``mem_forecast``: the guest's working set, its agent's MemTotal - MemAvailable
  (else balloon current - unused), plus 10% headroom.
* ``mem_unserved``: the balloon deficit ``max(0, mem_forecast - balloon.current)``
  plus, when the guest reports memory pressure, ``PSI some avg10 %`` of its
  balloon and 4 KiB per swap-in per second (as MiB).
* ``credits``: the ledger in the VM's rescoin domain metadata (travels with it).
* ``last_moved``: the collector's clock when it saw the VM change host.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from rescoin.cluster.model import ClusterState, HostInfo, VmInfo
from rescoin.hosts.agent import AgentClient, AgentReport
from rescoin.hosts.libvirt.connection import HostUnavailable, Libvirt, libvirt_module
from rescoin.hosts.libvirt.ledger import read_credits

HEADROOM = 1.10  # working set x this = what a VM wants resident
CPU_PEAK_ROUNDS = 6  # rounds of CPU rate whose peak is the VM's CPU forecast


def cpu_peak(recent: tuple[float, ...], rate: float, rounds: int = CPU_PEAK_ROUNDS) -> tuple[float, ...]:
    """The last ``rounds`` CPU rates, newest last: their max is the collector's CPU forecast."""
    return (*recent, rate)[-rounds:]


@dataclass
class _Seen:
    """What the previous round saw of one VM, for rates and move detection."""

    t: float
    host: str
    cpu_ns: float
    wait_ns: float
    steal: float
    cpu_recent: tuple[float, ...] = ()  # CPU rates of the last rounds on this host


def _agent_socket(dom) -> str | None:
    import xml.etree.ElementTree as ET

    from rescoin.lab.base import AGENT_CHANNEL

    root = ET.fromstring(dom.XMLDesc(0))
    for ch in root.iterfind("devices/channel"):
        target, source = ch.find("target"), ch.find("source")
        if target is not None and target.get("name") == AGENT_CHANNEL and source is not None:
            return source.get("path")
    return None


def _nan0(x: float) -> float:
    return 0.0 if x is None or math.isnan(x) else float(x)


def vm_figures(stats: dict, report: AgentReport | None) -> dict[str, float]:
    """The memory fields of one VM from its domstats record and agent report (pure; see the module doc)."""
    kib = 1024.0
    current = stats.get("balloon.current", 0) / kib
    rss = stats.get("balloon.rss")
    mem_used = rss / kib if rss else current
    if report is not None and not math.isnan(report.mem_total_mib):
        ws = report.used_mib
        pressure = _nan0(report.psi_memory_some) / 100.0 * current
    else:
        unused = stats.get("balloon.unused")
        ws = current - unused / kib if unused is not None else mem_used
        pressure = 0.0
    forecast = ws * HEADROOM
    return {"memory_mib": stats.get("balloon.maximum", 0) / kib, "mem_used": mem_used, "mem_forecast": forecast,
            "mem_unserved": max(0.0, forecast - current) + pressure}


def contention(vms: list[VmInfo], cpus: float, mem: float, reserve: float) -> float:
    """The share of what a host's VMs want that it cannot give, in [0, 1] (see the module doc)."""
    wanted = sum(v.mem_forecast for v in vms)
    resident = sum(v.mem_used for v in vms)
    share = max(sum(v.mem_unserved for v in vms) / wanted if wanted else 0.0,
                sum(v.cpu_unserved for v in vms) / cpus if cpus else 0.0,
                max(0.0, resident + reserve - mem) / resident if resident else 0.0)
    return min(1.0, share)


@dataclass
class Collector:
    """The cluster's hosts by name, each behind its URI; ``collect()`` gives one ClusterState per round."""

    uris: dict[str, str]  # host name -> URI
    capacity: dict[str, tuple[float, float]] = field(default_factory=dict)  # host -> (cpus, memory MiB) caps
    reserve_mib: dict[str, float] = field(default_factory=dict)
    agent_timeout: float = 1.0
    clock: object = time.monotonic
    conns: dict[str, Libvirt] = field(default_factory=dict)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _moved: dict[str, float] = field(default_factory=dict)

    def lv(self, host: str) -> Libvirt:
        if host not in self.conns:
            self.conns[host] = Libvirt(self.uris[host])
        return self.conns[host]

    def close(self) -> None:
        for lv in self.conns.values():
            lv.close()

    def collect(self) -> ClusterState:
        """One round: every reachable host and its running VMs (an unreachable host is left out)."""
        now = float(self.clock())  # type: ignore[operator]
        hosts, vms = [], []
        for name in self.uris:
            try:
                host, host_vms = self._host(name, now)
            except HostUnavailable:
                continue
            hosts.append(host)
            vms.extend(host_vms)
        return ClusterState(now=now, hosts=tuple(hosts), vms=tuple(vms))

    def _host(self, name: str, now: float) -> tuple[HostInfo, list[VmInfo]]:
        m = libvirt_module()
        lv = self.lv(name)
        conn = lv.connect()
        ok, info = lv.call("getInfo", None, conn.getInfo)
        if not ok:
            raise HostUnavailable(f"cannot read {name}'s CPUs and memory")
        cpus, mem = float(info[2]), float(info[1])
        if name in self.capacity:
            cpus, mem = min(cpus, self.capacity[name][0]), min(mem, self.capacity[name][1])
        what = m.VIR_DOMAIN_STATS_STATE | m.VIR_DOMAIN_STATS_CPU_TOTAL | m.VIR_DOMAIN_STATS_BALLOON \
            | m.VIR_DOMAIN_STATS_VCPU
        ok, records = lv.call("getAllDomainStats", None, conn.getAllDomainStats, what,
                              m.VIR_CONNECT_GET_ALL_DOMAINS_STATS_RUNNING, default=[])
        doms = [(dom, stats) for dom, stats in records]
        sockets = {dom.UUIDString(): _agent_socket(dom) for dom, _ in doms}
        endpoints = {u: f"unix:{p}" for u, p in sockets.items() if p}
        reports = AgentClient(timeout=self.agent_timeout).query(endpoints) if endpoints else {}
        vms = [self._vm(name, lv, dom, stats, reports.get(dom.UUIDString()), now) for dom, stats in doms]
        reserve = self.reserve_mib.get(name, 0.0)
        host = HostInfo(name=name, cpus=cpus, memory_mib=mem, uri=self.uris[name],
                        reserve_mib=reserve, contention=contention(vms, cpus, mem, reserve))
        return host, vms

    def _vm(self, host: str, lv: Libvirt, dom, stats: dict, report: AgentReport | None, now: float) -> VmInfo:
        uuid = dom.UUIDString()
        ncpu = int(stats.get("vcpu.current", 1))
        cpu_ns = float(stats.get("cpu.time", 0))
        wait_ns = float(sum(stats.get(f"vcpu.{i}.wait", 0) for i in range(ncpu)))
        steal = _nan0(report.cpu_steal_ticks) if report is not None else 0.0
        prev = self._seen.get(uuid)
        cpu_used = cpu_unserved = 0.0
        if prev is not None and now > prev.t and prev.host == host:
            dt = now - prev.t
            cpu_used = max(0.0, (cpu_ns - prev.cpu_ns) / 1e9 / dt)
            if wait_ns or prev.wait_ns:
                cpu_unserved = max(0.0, (wait_ns - prev.wait_ns) / 1e9 / dt)
            else:
                cpu_unserved = max(0.0, (steal - prev.steal) / 100.0 / dt)  # USER_HZ ticks
        if prev is not None and prev.host != host:
            self._moved[uuid] = now
        same = prev is not None and prev.host == host  # a VM that moved starts its peak afresh
        recent = cpu_peak(prev.cpu_recent if same and prev is not None else (), cpu_used)
        self._seen[uuid] = _Seen(now, host, cpu_ns, wait_ns, steal, recent)
        return VmInfo(uuid=uuid, name=dom.name(), host=host, vcpus=ncpu, cpu_used=cpu_used, cpu_forecast=max(recent),
                      cpu_unserved=cpu_unserved, credits=read_credits(lv, dom), last_moved=self._moved.get(uuid),
                      **vm_figures(stats, report))
