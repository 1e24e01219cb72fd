"""LibvirtHost: a real hypervisor behind the Host protocol.

One bulk-stats call per period for every running VM; counters become rates
with the measured interval; VMs are keyed by UUID. Per-VM calls happen only
when a VM is first seen (its settings, to restore them later) and for the
actions the guard decided. Every libvirt call goes through ``Libvirt.call``,
the one place that decides what an error means: a vanished VM is dropped for
the period, a dead connection is re-opened with backoff, anything else is
logged with the VM and the call; nothing ends the loop.
"""
from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rescoin.core.loop import HostUnavailableError
from rescoin.core.model import Controls, Observation, Plan, VMSet
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET, HostCapacity
from rescoin.hosts.actuators import Actuator, LibvirtActuator
from rescoin.hosts.base import ApplyResult
from rescoin.hosts.claims import HostMemory, cross_check
from rescoin.hosts.restore import RESTORE_TIMEOUT, original_caps, restore_pending, restore_vms

log = logging.getLogger("rescoin.libvirt")


HostUnavailable = HostUnavailableError  # one exception for every host; the daemon retries


def _lv():
    try:
        import libvirt  # noqa: PLC0415 - optional dependency, needed only for real hosts
    except ImportError:  # pragma: no cover - depends on the machine
        raise HostUnavailable("libvirt-python is not installed: run scripts/setup-host or "
                              "`pip install libvirt-python`") from None
    return libvirt


STATS_FLAGS = ("STATE", "CPU_TOTAL", "VCPU", "BALLOON", "BLOCK", "INTERFACE")


@dataclass
class HostSettings:
    """What libvirt cannot tell: reserves and the disk/net capacity to share."""

    reserve_mib: float = 1024.0  # host memory kept back from the guests
    reserve_cores: float = 0.0  # host CPU kept back
    disk_kibs: float = 204800.0  # disk bandwidth shared by blkio weights (KiB/s)
    net_kibs: float = 125000.0  # link bandwidth shared by caps (KiB/s)
    stats_period: int = 2  # balloon stats period set on each VM (s)
    memtune_soft_limit: bool = False  # also set memtune soft_limit to each balloon target


@dataclass
class VMState:
    """What rescoin keeps per VM between periods."""

    uuid: str
    name: str
    vcpus: int
    max_mib: float
    min_mib: float
    first_seen: int
    sched_key: str | None  # "cpu_shares" (QEMU) or "weight" (other drivers)
    original: dict[str, Any]  # settings found at first sight, for --restore-on-exit
    controls: dict[str, Any]  # what rescoin applied (or found)
    agent: str | None = None  # agent endpoint, e.g. "unix:/run/...sock"
    interfaces: list[str] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)  # counters at the previous sample
    last_agent: Any = None
    mem: HostMemory | None = None  # the host's own view of the VM's memory, this period and the one before
    mem_before: HostMemory | None = None
    agent_doubt: str = ""  # what the last cross-check discounted (logged when it starts)
    last_actions: list[str] = field(default_factory=list)


class Libvirt:
    """The connection and the one helper that handles libvirt errors."""

    def __init__(self, uri: str, backoff_max: float = 30.0) -> None:
        self.uri = uri
        self.conn = None
        self.backoff = 1.0
        self.backoff_max = backoff_max
        self._next_try = 0.0
        self.calls: Counter[str] = Counter()  # per period, by call name
        self.errors: Counter[str] = Counter()
        self.connected_once = False

    def connect(self) -> Any:
        lv = _lv()
        if self.conn is not None:
            try:
                if self.conn.isAlive():
                    return self.conn
            except lv.libvirtError:
                pass
            log.warning("lost the connection to %s; reconnecting", self.uri)
            self.close()
        now = time.monotonic()
        if now < self._next_try:
            raise HostUnavailable(f"{self.uri} unavailable; next attempt in {self._next_try - now:.0f} s")
        try:
            self.conn = lv.open(self.uri)
        except lv.libvirtError as e:
            self._next_try = now + self.backoff
            self.backoff = min(self.backoff * 2, self.backoff_max)
            raise HostUnavailable(f"cannot connect to {self.uri}: {e}; retrying with backoff") from None
        if self.connected_once:
            log.warning("reconnected to %s", self.uri)
        self.connected_once = True
        self.backoff = 1.0
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
                pass
        self.conn = None

    def call(self, what: str, vm: str | None, fn: Callable, *args, default=None):
        """Run one libvirt call; returns ``(ok, value)``. Never raises a libvirt error."""
        lv = _lv()
        self.calls[what] += 1
        try:
            return True, fn(*args)
        except OSError as e:  # a cgroup file the kernel refused, or a VM's cgroup that vanished
            self.errors[what] += 1
            log.warning("%s on VM %s failed: %s", what, vm, e)
            return False, default
        except lv.libvirtError as e:
            code = e.get_error_code()
            self.errors[what] += 1
            if code in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                log.info("%s: VM %s is gone or not running (%s)", what, vm, e.get_error_message())
            elif code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC, lv.VIR_ERR_NO_CONNECT,
                          lv.VIR_ERR_INTERNAL_ERROR) and not self._alive():
                log.warning("%s failed (%s): connection to %s lost", what, e.get_error_message(), self.uri)
                self.close()
            else:
                log.warning("%s on VM %s failed: %s", what, vm, e.get_error_message())
            return False, default

    def _alive(self) -> bool:
        try:
            return bool(self.conn is not None and self.conn.isAlive())
        except Exception:  # noqa: BLE001
            return False


def _cpumap(pcpus: int, first: int, width: int) -> tuple[bool, ...]:
    """A CPU map of any length (the seeds' single-byte masks stopped at 8 CPUs)."""
    return tuple(first <= c < first + width for c in range(pcpus))


def _first_set(cpumap: tuple[bool, ...]) -> tuple[int, int]:
    """(first pCPU, how many) of a CPU map; (-1, 1) when it allows every pCPU (floating)."""
    on = [i for i, b in enumerate(cpumap) if b]
    if not on or len(on) == len(cpumap):
        return -1, 1
    return on[0], len(on)


def _pin_group(cpumap: tuple[bool, ...], width: int) -> int:
    """The pin-set index a CPU map stands for (-1 = floating), for sets of ``width`` pCPUs."""
    first, _ = _first_set(cpumap)
    return first // max(1, width) if first >= 0 else -1


class LibvirtHost:
    def __init__(self, uri: str = "qemu:///system", settings: HostSettings | None = None,
                 agents=None, managed: Callable[[str, str], bool] | None = None,
                 actuator: Actuator | None = None, vm_config: Callable[[str, str], Any] | None = None) -> None:
        self.lv = Libvirt(uri)
        self.vm_config = vm_config  # (uuid, name) -> config.VMConfig: weight, memory bounds, exclude
        self.saved_originals: dict[str, dict] = {}  # from a previous run's state file, by UUID
        self.pending_restore: set[str] = set()  # UUIDs restore() could not reach; restored at the next start
        self.restore_at_start = True  # False in a dry run: the pending restores wait for a real run
        self.tcp_agents: dict[str, str] = {}  # VM name -> "host:port" of a TCP agent (else the virtio channel)
        self.actuator = actuator or LibvirtActuator()
        self.settings = settings or HostSettings()
        self.agents = agents  # rescoin.hosts.agent.AgentClient or None
        self.managed = managed or (lambda uuid, name: True)
        self.vms: dict[str, VMState] = {}
        self.t = 0
        self._last_ts: float | None = None
        self._capacity: HostCapacity | None = None
        self._events: list[tuple[str, int]] = []
        self._event_lock = threading.Lock()
        self._event_thread: threading.Thread | None = None
        self.memory_limit_mib: float | None = None  # share at most this much memory among the VMs

    # -- capacity ------------------------------------------------------------------
    @property
    def capacity(self) -> HostCapacity:
        if self._capacity is None:
            self._capacity = self._read_capacity()
        return self._capacity

    def _read_capacity(self) -> HostCapacity:
        conn = self.lv.connect()
        ok, info = self.lv.call("getInfo", None, conn.getInfo)
        if not ok:
            raise HostUnavailable("cannot read the host's CPU and memory from libvirt")
        mem_mib, pcpus = float(info[1]), int(info[2])
        s = self.settings
        mem = max(mem_mib - s.reserve_mib, 0.0)
        if self.memory_limit_mib is not None:
            mem = min(mem, self.memory_limit_mib)
        cap = np.array([max(pcpus - s.reserve_cores, 0.1), mem, s.disk_kibs, s.net_kibs])
        return HostCapacity(name=self.lv.uri, capacity=cap, pcpus=pcpus)

    def reconfigure(self, settings: HostSettings, memory_limit_mib: float | None) -> None:
        """New settings on a reload: capacity is read again, a new stats period is set on the managed VMs."""
        old, self.settings = self.settings, settings
        if settings != old or memory_limit_mib != self.memory_limit_mib:
            self.memory_limit_mib = memory_limit_mib
            self._capacity = None  # the next observe reads it with the new reserve and bandwidths
        if settings.stats_period and settings.stats_period != old.stats_period:
            for uuid, dom in getattr(self, "_doms", {}).items():
                if uuid in self.vms:
                    self.lv.call("setMemoryStatsPeriod", self.vms[uuid].name, dom.setMemoryStatsPeriod,
                                 settings.stats_period, 0)

    def domain_ids(self) -> list[tuple[str, str]]:
        """(uuid, name) of every domain libvirt knows, running or not, managed or not."""
        ok, doms = self.lv.call("listAllDomains", None, self.lv.connect().listAllDomains, 0, default=[])
        return [(d.UUIDString(), d.name()) for d in doms]

    # -- lifecycle events (started explicitly, never from the constructor) ---------
    def start_events(self) -> None:
        lv = _lv()
        if self._event_thread is not None:
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    lv.virEventRunDefaultImpl()
                except Exception:  # noqa: BLE001 - keep the event loop alive
                    time.sleep(1)

        self._event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        self._event_thread.start()
        self._register_events()

    def _register_events(self) -> None:
        lv = _lv()
        conn = self.lv.connect()

        def on_event(_conn, dom, event, _detail, _opaque) -> None:
            with self._event_lock:
                self._events.append((dom.UUIDString(), event))

        self.lv.call("domainEventRegisterAny", None, conn.domainEventRegisterAny, None,
                     lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)

    def _drain_events(self) -> None:
        lv = _lv()
        with self._event_lock:
            events, self._events = self._events, []
        for uuid, event in events:
            if event in (lv.VIR_DOMAIN_EVENT_STOPPED, lv.VIR_DOMAIN_EVENT_UNDEFINED, lv.VIR_DOMAIN_EVENT_CRASHED):
                if self.vms.pop(uuid, None) is not None:
                    log.info("VM %s stopped: dropped at once", uuid)
            elif event == lv.VIR_DOMAIN_EVENT_STARTED:
                log.info("VM %s started", uuid)

    # -- first sight of a VM ------------------------------------------------------------
    def _adopt(self, dom, stats: dict) -> VMState | None:
        uuid, name = dom.UUIDString(), dom.name()
        ok, info = self.lv.call("info", name, dom.info)
        if not ok:
            return None
        ok, xml = self.lv.call("XMLDesc", name, dom.XMLDesc, 0)
        root = ET.fromstring(xml) if ok else ET.Element("domain")
        ok, sched = self.lv.call("schedulerParameters", name, dom.schedulerParameters, default={})
        key = "cpu_shares" if "cpu_shares" in sched else ("weight" if "weight" in sched else None)
        ok, blkio = self.lv.call("blkioParameters", name, dom.blkioParameters, 0, default={})
        ok, pins = self.lv.call("vcpuPinInfo", name, dom.vcpuPinInfo, 0, default=[])
        vcpus = int(stats.get("vcpu.current", info[3]))
        agent = None
        for ch in root.iter("channel"):
            target, source = ch.find("target"), ch.find("source")
            if (ch.get("type") == "unix" and target is not None and source is not None
                    and target.get("name") == "org.rescoin.agent.0"):
                agent = "unix:" + source.get("path", "")
        min_kib = root.findtext("memtune/min_guarantee")
        found = {"shares": sched.get(key), "quota": sched.get("vcpu_quota"), "balloon": info[2] / 1024.0,
                 "blkio": blkio.get("weight"), "pins": [tuple(p) for p in pins]}
        state = VMState(
            uuid=uuid, name=name, vcpus=max(vcpus, 1), max_mib=info[1] / 1024.0,
            min_mib=float(min_kib) / 1024.0 if min_kib else 0.0, first_seen=self.t, sched_key=key,
            # after a restart, the settings found before rescoin first touched the VM are the originals
            original=self.saved_originals.get(uuid, found),
            controls={}, agent=agent,
            interfaces=[i.find("target").get("dev") for i in root.iter("interface") if i.find("target") is not None],
            disks=[d.find("target").get("dev") for d in root.iter("disk") if d.find("target") is not None],
        )
        if uuid not in self.saved_originals:  # after ``state``: it knows the disks and interfaces
            found.update(original_caps(self.lv, dom, state))
        st = found
        pin0 = _first_set(tuple(pins[0])) if pins else (-1, 1)
        state.controls = {"shares": float(st["shares"]) if st["shares"] is not None else np.nan,
                          "quota": np.nan, "balloon": st["balloon"],
                          "blkio": float(st["blkio"]) if st["blkio"] else np.nan, "netcap": np.nan,
                          "diskcap": np.nan,
                          "pins": [_pin_group(tuple(p), pin0[1]) for p in pins] or [-1] * state.vcpus,
                          "pin_width": pin0[1]}
        if self.settings.stats_period:
            self.lv.call("setMemoryStatsPeriod", name, dom.setMemoryStatsPeriod, self.settings.stats_period, 0)
        log.info("managing VM %s (%s): %d vCPUs, %.0f MiB max, agent %s", name, uuid, state.vcpus,
                 state.max_mib, agent or "none")
        return state

    # -- observe -----------------------------------------------------------------------
    def observe(self) -> Observation:
        lv = _lv()
        self.lv.calls.clear()
        conn = self.lv.connect()
        cap = self.capacity
        if self.pending_restore and self.restore_at_start:  # what the last run could not restore
            self.pending_restore = restore_pending(self.lv, conn, self.pending_restore, self.saved_originals)
        self._drain_events()
        flags = 0
        for f in STATS_FLAGS:
            flags |= getattr(lv, f"VIR_DOMAIN_STATS_{f}")
        ok, records = self.lv.call("getAllDomainStats", None, conn.getAllDomainStats, flags,
                                   lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        if not ok:
            raise HostUnavailable(f"bulk stats from {self.lv.uri} failed; retrying next period")
        now = time.time()
        interval = now - self._last_ts if self._last_ts is not None else float("nan")
        self._last_ts = now
        self.t += 1
        rows: list[VMState] = []
        usage, signal, doms = [], [], {}
        confirmed: list[bool] = []
        seen = set()
        for dom, stats in records:
            uuid = dom.UUIDString()
            seen.add(uuid)
            if not self.managed(uuid, dom.name()) or (self.vm_config and self.vm_config(uuid, dom.name()).exclude):
                continue
            state = self.vms.get(uuid)
            if state is None:
                state = self._adopt(dom, stats)
                if state is None:
                    continue
                self.vms[uuid] = state
            u, s = self._rates(state, stats, interval)
            rows.append(state)
            usage.append(u)
            signal.append(s)
            confirmed.append(True)
            doms[uuid] = dom
        for gone in set(self.vms) - seen:
            log.info("VM %s (%s) is gone", self.vms[gone].name, gone)
            del self.vms[gone]
        self._doms = doms
        if self.agents is not None:
            self._agent_data(rows, usage, signal, confirmed, interval)
        n = len(rows)
        cfgs = [self.vm_config(r.uuid, r.name) for r in rows] if self.vm_config else [None] * n
        max_mib = [min(r.max_mib, c.max_memory_mib) if c is not None and c.max_memory_mib > 0 else r.max_mib
                   for r, c in zip(rows, cfgs)]
        vms = VMSet.build(
            uuids=[r.uuid for r in rows], names=[r.name for r in rows],
            sizes=np.array([[r.vcpus, m, cap.capacity[DISK], cap.capacity[NET]]
                            for r, m in zip(rows, max_mib)]).reshape(n, N_RES),
            min_memory=np.array([max(r.min_mib, c.min_memory_mib if c is not None else 0.0)
                                 for r, c in zip(rows, cfgs)]),
            weight=np.array([c.weight if c is not None else 1.0 for c in cfgs]),
            balloon_max=np.array([r.max_mib for r in rows]),
        )
        return Observation(
            ts=now, interval=interval if np.isfinite(interval) else 0.0, host=cap, vms=vms,
            usage=np.array(usage, dtype=float).reshape(n, N_RES),
            signal=np.array(signal, dtype=float).reshape(n, N_RES),
            controls=self._controls(rows), age=np.array([self.t - r.first_seen for r in rows], dtype=np.intp),
            confirmed=np.array(confirmed, dtype=bool),
        )

    def _rates(self, state: VMState, stats: dict, interval: float) -> tuple[list[float], list[float]]:
        """Usage and unmet-demand signals from counter deltas over the measured interval."""
        cur = {
            "cpu": stats.get("cpu.time"),
            "delay": sum(v for k, v in stats.items() if k.startswith("vcpu.") and k.endswith(".delay")) or None,
            "disk": sum(v for k, v in stats.items() if k.startswith("block.") and k.endswith((".rd.bytes", ".wr.bytes")))
            if any(k.startswith("block.") for k in stats) else None,
            "net": sum(v for k, v in stats.items() if k.startswith("net.") and k.endswith((".rx.bytes", ".tx.bytes")))
            if any(k.startswith("net.") for k in stats) else None,
        }
        prev, state.last = state.last, {k: v for k, v in cur.items() if v is not None}

        def rate(key: str, scale: float) -> float:
            a, b = prev.get(key), cur.get(key)
            if a is None or b is None or not interval > 0 or b < a:  # b < a: VM restarted, counter reset
                return np.nan
            return (b - a) / interval / scale

        cpu = rate("cpu", 1e9)
        delay = rate("delay", 1e9)
        u = [cpu, np.nan, rate("disk", 1024.0), rate("net", 1024.0)]
        s = [np.nan, np.nan, np.nan, np.nan]
        if np.isfinite(delay):
            # share of wall time the vCPUs were runnable but not running: steal seen from the host
            s[CPU] = min(1.0, delay / max(state.vcpus, 1))
        state.mem_before, state.mem = state.mem, HostMemory.from_stats(stats)
        u[MEMORY] = state.mem.used_mib
        cur_b = stats.get("balloon.current")
        if cur_b is not None:
            state.controls["balloon"] = cur_b / 1024.0
        return u, s

    def _agent_data(self, rows: list[VMState], usage: list, signal: list, confirmed: list,
                    interval: float) -> None:
        """Merge what the guest agents say, as claims checked against the host's own view."""
        from rescoin.hosts.agent import AgentError, check_size, signals_from

        endpoints = {r.uuid: f"tcp:{self.tcp_agents[r.name]}" if r.name in self.tcp_agents else r.agent
                     for r in rows if r.agent or r.name in self.tcp_agents}
        if not endpoints:
            return
        reports = self.agents.query(endpoints)
        for i, r in enumerate(rows):
            rep = reports.get(r.uuid)
            if rep is not None:
                try:
                    check_size(rep, r.max_mib)
                except AgentError as e:  # beyond the VM's size: no agent data for this VM this period
                    self.agents.last_errors[r.uuid] = str(e)
                    self._doubt(r, str(e))
                    continue
            if rep is None:
                continue  # no agent data: balloon statistics stand
            sig = signals_from(rep, r.last_agent)
            r.last_agent = rep
            checked = cross_check(rep.used_mib, sig[MEMORY], r.mem or HostMemory.from_stats({}), r.mem_before,
                                  interval)
            self._doubt(r, checked.note)
            confirmed[i] = checked.confirmed
            if np.isfinite(checked.used_mib):
                usage[i][MEMORY] = checked.used_mib
            sig[MEMORY] = checked.signal
            for res, value in sig.items():
                # the host's own view of CPU steal (vcpu delay) wins over the guest's
                if np.isfinite(value) and not (res == CPU and np.isfinite(signal[i][CPU])):
                    signal[i][int(res)] = value

    @staticmethod
    def _doubt(state: VMState, note: str) -> None:
        """Log what the host discounts of a VM's agent when it starts, not every period."""
        if note and not state.agent_doubt:
            log.warning("VM %s: agent data not trusted: %s", state.name, note)
        elif not note and state.agent_doubt:
            log.info("VM %s: agent data agrees with the host again", state.name)
        state.agent_doubt = note

    def _controls(self, rows: list[VMState]) -> Controls:
        n = len(rows)
        c = Controls(
            shares=np.array([r.controls["shares"] for r in rows], dtype=float).reshape(n),
            quota=np.array([r.controls["quota"] for r in rows], dtype=float).reshape(n),
            balloon=np.array([r.controls["balloon"] for r in rows], dtype=float).reshape(n),
            blkio=np.array([r.controls["blkio"] for r in rows], dtype=float).reshape(n),
            netcap=np.array([r.controls["netcap"] for r in rows], dtype=float).reshape(n),
            diskcap=np.array([r.controls["diskcap"] for r in rows], dtype=float).reshape(n),
            pins=np.array([p for r in rows for p in (r.controls["pins"] + [-1] * r.vcpus)[: r.vcpus]], dtype=np.intp),
            pin_width=int(rows[0].controls.get("pin_width", 1)) if rows else 1,
        )
        return c

    # -- apply ---------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        lv = _lv()
        result = ApplyResult()
        c = plan.controls
        live = lv.VIR_DOMAIN_AFFECT_CURRENT  # the running VM, on every driver
        pcpus = self.capacity.pcpus
        starts = np.r_[0, np.cumsum(plan.vms.vcpus)[:-1]]
        for i, uuid in enumerate(plan.vms.uuids.tolist()):
            state, dom = self.vms.get(uuid), self._doms.get(uuid)
            if state is None or dom is None:
                continue
            state.last_actions = []
            todo: list[tuple[str, str, Callable, tuple, Callable[[], None]]] = []
            if plan.changed["shares"][i] or plan.changed["quota"][i]:
                shares = int(c.shares[i]) if plan.changed["shares"][i] else None
                quota = float(c.quota[i]) if plan.changed["quota"][i] else None
                kind = "shares" if shares is not None else "quota"
                todo.append((kind, *self.actuator.cpu(state, dom, shares, quota),
                             lambda s=state, i=i: s.controls.update(shares=float(c.shares[i]),
                                                                    quota=float(c.quota[i]))))
            if plan.changed["balloon"][i]:
                kib = int(round(c.balloon[i] * 1024))
                todo.append(("balloon", "setMemoryFlags", dom.setMemoryFlags, (kib, live),
                             lambda s=state, v=float(c.balloon[i]): s.controls.update(balloon=v)))
                if self.settings.memtune_soft_limit:  # the host reclaims above the target first
                    todo.append(("balloon", "setMemoryParameters", dom.setMemoryParameters,
                                 ({"soft_limit": kib}, live), lambda: None))
            if plan.changed["blkio"][i]:
                w = int(c.blkio[i])
                todo.append(("blkio", *self.actuator.blkio(state, dom, w),
                             lambda s=state, v=float(w): s.controls.update(blkio=v)))
            if plan.changed["diskcap"][i]:
                cap = c.diskcap[i]
                bps = int(cap * 1024) if np.isfinite(cap) else 0  # 0 removes the cap
                for dev in state.disks:
                    todo.append(("diskcap", "setBlockIoTune", dom.setBlockIoTune,
                                 (dev, {"total_bytes_sec": bps, "total_bytes_sec_max": bps}, live),
                                 lambda s=state, v=float(cap): s.controls.update(diskcap=v)))
            if plan.changed["netcap"][i]:
                cap = c.netcap[i]
                kib = int(cap) if np.isfinite(cap) else 0  # 0 removes the cap
                for dev in state.interfaces:
                    todo.append(("netcap", "setInterfaceParameters", dom.setInterfaceParameters,
                                 (dev, {"inbound.average": kib, "outbound.average": kib}, live),
                                 lambda s=state, v=float(cap): s.controls.update(netcap=v)))
            vs = slice(starts[i], starts[i] + state.vcpus)
            for v in np.flatnonzero(plan.changed["pin"][vs]):
                group = int(c.pins[vs][v])
                # -1 floats the vCPU again: a map of every pCPU
                cmap = _cpumap(pcpus, group * c.pin_width, c.pin_width) if group >= 0 else (True,) * pcpus

                def pinned(s=state, v=int(v), g=group, w=c.pin_width) -> None:
                    s.controls["pins"][v] = g
                    s.controls["pin_width"] = w

                todo.append(("pin", *self.actuator.pin(state, dom, int(v), cmap), pinned))
            for kind, call, fn, args, done in todo:
                ok, _ = self.lv.call(call, state.name, fn, *args)
                bucket = result.applied if ok else result.failed
                bucket[kind] = bucket.get(kind, 0) + 1
                state.last_actions.append(f"{kind}{'' if ok else ' FAILED'}")
                if ok:
                    done()
                else:
                    result.errors.append(f"{state.name}: {kind} via {call} failed")
        return result

    # -- restore ------------------------------------------------------------------------------
    def restore(self, timeout: float = RESTORE_TIMEOUT) -> int:
        """Put back every managed VM's original settings; returns how many VMs were restored.

        Retried for ``timeout`` seconds while the hypervisor does not answer;
        VMs left unrestored stay in ``pending_restore`` (see ``hosts.restore``).
        """
        todo = {s.uuid: (s.name, s.original, s.sched_key) for s in self.vms.values()}
        for uuid in self.pending_restore - set(todo):
            if uuid in self.saved_originals:
                todo[uuid] = (uuid, self.saved_originals[uuid], None)
        restored, self.pending_restore = restore_vms(self.lv, todo, timeout)
        return restored

    def close(self) -> None:
        self.lv.close()
