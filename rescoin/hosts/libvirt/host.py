"""LibvirtHost: a real hypervisor behind the Host protocol.

One bulk-stats call per period for every running VM; counters become rates
with the measured interval (``rates``); VMs are keyed by UUID. Per-VM calls
happen only when a VM is first seen (``discovery``: its settings, to restore
them later) and for the actions the guard decided (``actions``). Guest agent
data is merged as a claim checked against the host's own view (``claims``).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from rescoin.core.model import Observation, Plan, VMSet
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET, HostCapacity, Resource
from rescoin.hosts.actuators import Actuator, LibvirtActuator
from rescoin.hosts.base import ApplyResult, HostBase, HostSetup
from rescoin.hosts.claims import HostMemory, cross_check
from rescoin.hosts.config import HostConfig
from rescoin.hosts.libvirt import actions, discovery
from rescoin.hosts.libvirt.connection import ErrorCounts, HostUnavailable, Libvirt, libvirt_module
from rescoin.hosts.libvirt.discovery import VMState
from rescoin.hosts.libvirt.ledger import read_credits, write_credits
from rescoin.hosts.libvirt.rates import STATS_FLAGS, controls, rates
from rescoin.hosts.libvirt.restore import RESTORE_TIMEOUT, Restorer, Todo

log = logging.getLogger("rescoin.libvirt")


def make_actuator(config: HostConfig) -> Actuator:
    """The actuator ``host.actuator`` names."""
    if config.actuator == "cgroup":
        from rescoin.hosts.cgroupfs import CgroupActuator

        return CgroupActuator()
    return LibvirtActuator()


class LibvirtHost(HostBase):
    def __init__(self, uri: str = "qemu:///system", config: HostConfig | None = None, agents=None,
                 managed=None, actuator: Actuator | None = None, vm_config=None,
                 tcp_agents: dict[str, str] | None = None) -> None:
        self.lv = Libvirt(uri)
        self.config = config or HostConfig()
        self.actuator = actuator or make_actuator(self.config)
        self.agents = agents  # rescoin.hosts.agent.AgentClient or None
        self.tcp_agents = dict(tcp_agents or {})  # VM name -> "host:port" of a TCP agent (else the virtio channel)
        self.managed = managed or (lambda uuid, name: True)
        self.vm_config = vm_config  # (uuid, name) -> config.VMConfig: weight, memory bounds, exclude
        self.saved_originals: dict[str, dict] = {}  # from a previous run's state file, by UUID
        self.pending_restore: set[str] = set()  # UUIDs restore() could not reach; restored at the next observe
        self.vms: dict[str, VMState] = {}
        self.t = 0
        self._doms: dict[str, Any] = {}
        self._last_ts: float | None = None
        self._capacity: HostCapacity | None = None
        self._events: list[tuple[str, int]] = []
        self._event_lock = threading.Lock()
        self._event_thread: threading.Thread | None = None
        self._errors = ErrorCounts(self.lv)
        self._arrived: dict[str, tuple[float, ...]] = {}  # ledgers found on VMs first seen this period

    # -- capacity and settings ---------------------------------------------------------------
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
        c = self.config
        mem = max(mem_mib - c.reserve_mib, 0.0)
        if c.memory_mib > 0:  # share at most this much memory among the VMs
            mem = min(mem, c.memory_mib)
        cap = np.array([max(pcpus - c.reserve_cores, 0.1), mem, c.disk_kibs, c.net_kibs])
        return HostCapacity(name=self.lv.uri, capacity=cap, pcpus=pcpus)

    def reconfigure(self, setup: HostSetup) -> None:
        """New settings on a reload: capacity is read again, a new stats period is set on the managed VMs."""
        old, new = self.config, setup.config
        if new != old:
            self._capacity = None  # the next observe reads it with the new reserve and bandwidths
        if new.actuator != old.actuator:
            self.actuator = make_actuator(new)
        self.config = new
        self.agents, self.tcp_agents = setup.agents, dict(setup.tcp_agents)
        self.vm_config, self.managed = setup.vm_config, setup.managed or (lambda uuid, name: True)
        if new.stats_period and new.stats_period != old.stats_period:
            for uuid, dom in self._doms.items():
                if uuid in self.vms:
                    self.lv.call("setMemoryStatsPeriod", self.vms[uuid].name, dom.setMemoryStatsPeriod,
                                 new.stats_period, 0)

    def known_vms(self) -> list[tuple[str, str]]:
        return discovery.known_vms(self.lv)

    # -- what the state file keeps -------------------------------------------------------------
    def resume(self, originals: dict[str, dict], unrestored: set[str]) -> None:
        self.saved_originals, self.pending_restore = dict(originals), set(unrestored)

    def originals(self) -> dict[str, dict]:
        out = {u: s.original for u, s in self.vms.items()}
        out.update({u: o for u, o in self.saved_originals.items() if u not in out})
        return out

    def unrestored(self) -> set[str]:
        return set(self.pending_restore)

    # -- lifecycle events (started explicitly, never from the constructor) ---------
    def start(self) -> None:
        lv = libvirt_module()
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
        conn = self.lv.connect()

        def on_event(_conn, dom, event, _detail, _opaque) -> None:
            with self._event_lock:
                self._events.append((dom.UUIDString(), event))

        self.lv.call("domainEventRegisterAny", None, conn.domainEventRegisterAny, None,
                     lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)

    def _drain_events(self) -> None:
        lv = libvirt_module()
        with self._event_lock:
            events, self._events = self._events, []
        for uuid, event in events:
            if event in (lv.VIR_DOMAIN_EVENT_STOPPED, lv.VIR_DOMAIN_EVENT_UNDEFINED, lv.VIR_DOMAIN_EVENT_CRASHED):
                if self.vms.pop(uuid, None) is not None:
                    log.info("VM %s stopped: dropped at once", uuid)
            elif event == lv.VIR_DOMAIN_EVENT_STARTED:
                log.info("VM %s started", uuid)

    # -- observe -----------------------------------------------------------------------
    def observe(self) -> Observation:
        self.lv.calls.clear()
        conn = self.lv.connect()
        cap = self.capacity
        if self.pending_restore:  # what the last run could not restore, before any new decision
            self.pending_restore = self._restorer().pending(conn, self.pending_restore, self.saved_originals)
        self._drain_events()
        records = self._bulk_stats(conn)
        now = time.time()
        interval = now - self._last_ts if self._last_ts is not None else float("nan")
        self._last_ts = now
        self.t += 1
        rows, usage, signal = self._sample(records, interval)
        confirmed = [True] * len(rows)
        if self.agents is not None:
            self._agent_data(rows, usage, signal, confirmed, interval)
        n = len(rows)
        return Observation(
            ts=now, interval=interval if np.isfinite(interval) else 0.0, host=cap, vms=self._vmset(rows, cap),
            usage=np.array(usage, dtype=float).reshape(n, N_RES),
            signal=np.array(signal, dtype=float).reshape(n, N_RES),
            controls=controls(rows), age=np.array([self.t - r.first_seen for r in rows], dtype=np.intp),
            confirmed=np.array(confirmed, dtype=bool), health=[self._health(r) for r in rows],
            call_errors=self._errors.new(), carried=self._take_arrived(),
        )

    def _take_arrived(self) -> dict[str, tuple[float, ...]]:
        out, self._arrived = self._arrived, {}
        return out

    def _bulk_stats(self, conn) -> list:
        lv = libvirt_module()
        flags = 0
        for f in STATS_FLAGS:
            flags |= getattr(lv, f"VIR_DOMAIN_STATS_{f}")
        ok, records = self.lv.call("getAllDomainStats", None, conn.getAllDomainStats, flags,
                                   lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        if not ok:
            raise HostUnavailable(f"bulk stats from {self.lv.uri} failed; retrying next period")
        return records

    def _sample(self, records: list, interval: float) -> tuple[list[VMState], list, list]:
        """The managed VMs of this period (adopting new ones, dropping gone ones) with their rates."""
        rows: list[VMState] = []
        usage, signal, doms, seen = [], [], {}, set()
        for dom, stats in records:
            uuid, name = dom.UUIDString(), dom.name()
            seen.add(uuid)
            if not self.managed(uuid, name) or (self.vm_config and self.vm_config(uuid, name).exclude):
                continue
            state = self.vms.get(uuid) or self._first_sight(dom, stats)
            if state is None:
                continue
            u, s = rates(state, stats, interval)
            rows.append(state)
            usage.append(u)
            signal.append(s)
            doms[uuid] = dom
        for gone in set(self.vms) - seen:
            log.info("VM %s (%s) is gone", self.vms[gone].name, gone)
            del self.vms[gone]
        self._doms = doms
        return rows, usage, signal

    def _first_sight(self, dom, stats: dict) -> VMState | None:
        state = discovery.adopt(self.lv, dom, stats, self.t, self.saved_originals)
        if state is not None:
            self.vms[state.uuid] = state
            ledger = read_credits(self.lv, dom)  # a VM that migrated here brings its credits
            if ledger:
                self._arrived[state.uuid] = ledger
            if self.config.stats_period:
                self.lv.call("setMemoryStatsPeriod", state.name, dom.setMemoryStatsPeriod,
                             self.config.stats_period, 0)
        return state

    def publish_ledger(self, uuids: np.ndarray, ledger: np.ndarray) -> None:
        """Each VM's ledger into its live domain metadata (the balancer persists it before a move)."""
        for uuid, row in zip(uuids.tolist(), np.asarray(ledger, dtype=float), strict=True):
            dom = self._doms.get(uuid)
            if dom is not None and np.isfinite(row).all():
                write_credits(self.lv, dom, tuple(float(x) for x in row), persistent=False)

    def _vmset(self, rows: list[VMState], cap: HostCapacity) -> VMSet:
        """Identity and size of this period's VMs, with the per-VM configuration's weight and bounds."""
        n = len(rows)
        cfgs = [self.vm_config(r.uuid, r.name) for r in rows] if self.vm_config else [None] * n
        max_mib = [min(r.max_mib, c.max_memory_mib) if c is not None and c.max_memory_mib > 0 else r.max_mib
                   for r, c in zip(rows, cfgs, strict=True)]
        return VMSet.build(
            uuids=[r.uuid for r in rows], names=[r.name for r in rows],
            sizes=np.array([[r.vcpus, m, cap.capacity[DISK], cap.capacity[NET]]
                            for r, m in zip(rows, max_mib, strict=True)]).reshape(n, N_RES),
            min_memory=np.array([max(r.min_mib, c.min_memory_mib if c is not None else 0.0)
                                 for r, c in zip(rows, cfgs, strict=True)]),
            weight=np.array([c.weight if c is not None else 1.0 for c in cfgs]),
            balloon_max=np.array([r.max_mib for r in rows]),
        )

    # -- guest agents ------------------------------------------------------------------------------
    def _endpoint(self, r: VMState) -> str | None:
        return f"tcp:{self.tcp_agents[r.name]}" if r.name in self.tcp_agents else r.agent

    def _health(self, r: VMState) -> str:
        """"no agent", "ok", or why the VM's agent gave no data this period."""
        if self._endpoint(r) is None:
            return "no agent"
        return self.agents.last_errors.get(r.uuid, "ok") if self.agents is not None else "ok"

    def _agent_data(self, rows: list[VMState], usage: list, signal: list, confirmed: list,
                    interval: float) -> None:
        """Merge what the guest agents say, as claims checked against the host's own view."""
        from rescoin.hosts.agent import AgentError, check_size, signals_from

        endpoints = {r.uuid: e for r in rows if (e := self._endpoint(r))}
        if not endpoints:
            return
        reports = self.agents.query(endpoints)
        for i, r in enumerate(rows):
            rep = reports.get(r.uuid)
            if rep is None:
                continue  # no agent data: balloon statistics stand
            try:
                check_size(rep, r.max_mib)
            except AgentError as e:  # beyond the VM's size: no agent data for this VM this period
                self.agents.last_errors[r.uuid] = str(e)
                self._doubt(r, str(e))
                continue
            sig = signals_from(rep, r.last_agent)
            r.last_agent = rep
            checked = cross_check(rep.used_mib, sig[Resource.MEMORY], r.mem or HostMemory.from_stats({}), r.mem_before,
                                  interval)
            self._doubt(r, checked.note)
            confirmed[i] = checked.confirmed
            if np.isfinite(checked.used_mib):
                usage[i][MEMORY] = checked.used_mib
            sig[Resource.MEMORY] = checked.signal
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

    # -- apply and restore: one runner for every call that changes a VM ----------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        result = ApplyResult(actions={})
        pcpus = self.capacity.pcpus
        starts = np.r_[0, np.cumsum(plan.vms.vcpus)[:-1]]
        for i, uuid in enumerate(plan.vms.uuids.tolist()):
            state, dom = self.vms.get(uuid), self._doms.get(uuid)
            if state is None or dom is None:
                continue
            todo = actions.from_plan(plan, i, int(starts[i]), state, dom, self.actuator, pcpus,
                                     self.config.memtune_soft_limit)
            self.run(state, todo, result)
        result.call_errors = self._errors.new()
        return result

    def run(self, state: VMState, todo: list[actions.Action], result: ApplyResult) -> bool:
        """Make ``todo``'s calls on one VM, recording each in ``result``; True when every call succeeded."""
        done = result.actions.setdefault(state.uuid, []) if result.actions is not None else []
        all_ok = True
        for kind, call, fn, args, on_success in todo:
            ok, _ = self.lv.call(call, state.name, fn, *args)
            result.count(kind, ok)
            done.append((kind, ok))
            if ok:
                on_success()
            else:
                all_ok = False
                result.errors.append(f"{state.name}: {kind} via {call} failed")
        return all_ok

    def _restorer(self) -> Restorer:
        return Restorer(self.lv, self.actuator, self.run)

    def restore(self, timeout: float = RESTORE_TIMEOUT) -> int:
        """Put back every managed VM's original settings; returns how many VMs were restored.

        Retried for ``timeout`` seconds while the hypervisor does not answer;
        VMs left unrestored stay in ``unrestored()`` for the next start.
        """
        todo: Todo = {s.uuid: (s, s.original) for s in self.vms.values()}
        for uuid in self.pending_restore - set(todo):
            if uuid in self.saved_originals:
                todo[uuid] = (None, self.saved_originals[uuid])
        restored, self.pending_restore = self._restorer().all(todo, timeout)
        return restored

    def close(self) -> None:
        self.lv.close()
