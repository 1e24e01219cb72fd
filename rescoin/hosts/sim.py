"""SimHost: a host that replays per-VM demand from a trace, by the rules of docs/simulator.md.

It grants resources the way the real mechanisms would, and the same rules
apply to every policy:

- CPU: weighted max-min sharing of the host's cores by cpu shares, capped by
  quotas and by each VM's vCPU count; with pinning, per pCPU group, each vCPU
  using at most one core; unpinned vCPUs float over whatever room is left.
- Memory: guest footprints that grow with I/O toward the balloon target (else
  the size), shrink only by balloon reclaim, and make the host swap when they
  sum to more than host memory (rescoin.hosts.simmemory); with the model off,
  ``min(demand, balloon target)`` within host memory.
- Disk: weighted max-min by blkio weight. Net: max-min under each VM's cap.

The scheduler sees only granted usage and what a real host shows of unmet
demand (CPU steal, memory and I/O stall time, nothing for net), the sizes a
real host knows (vCPUs, memory, nominal disk and net), resident memory and
host swap: never the demand itself. Only ``truth`` / ``truth_next`` carry it,
and the control loop hands them to the oracle alone.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from rescoin.core import kinds
from rescoin.core.arrays import fillnan
from rescoin.core.model import Controls, Observation, Plan, VMSet
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET, RESOURCES, HostCapacity, Resource
from rescoin.core.sharing import water_fill, water_fill_columns
from rescoin.hosts.base import ApplyResult, HostBase
from rescoin.hosts.simmemory import Footprints, MemoryModel, MemoryOutcome

NAMESPACE = uuid.UUID("6f1c1a52-9a3e-4d4f-9d44-7e0c5c2b1a10")
#: nominal per-VM disk and net bandwidth (KiB/s): the allowance a provider sells with a VM; 100 VMs at
#: overcommit 1.5 share 267 MiB/s, and the shared trace's 100 VMs contend for it in about 1% of periods
DISK_KIBS_PER_VM = 4096.0
NET_KIBS_PER_VM = 4096.0
#: a shortfall share s shows as stall time min(1, PRESSURE_GAIN * s): a guest missing a fifth of its
#: working set (or of its I/O) stalls all the time; PSI is reported to 2 decimals of a percent
PRESSURE_GAIN = 5.0
DEFAULT_OVERCOMMIT = 1.5  # a resource a per-resource overcommit does not name keeps this factor


def overcommit_factors(value: float | Mapping[str, float]) -> np.ndarray:
    """``1.5`` or ``{"cpu": 4, "memory": 1.5}`` -> one factor per resource (unnamed ones: the default)."""
    if isinstance(value, Mapping):
        out = np.full(N_RES, DEFAULT_OVERCOMMIT)
        for key, f in value.items():
            out[Resource.parse(key)] = float(f)
    else:
        out = np.full(N_RES, float(value))
    for r in RESOURCES:
        if not (np.isfinite(out[r]) and out[r] > 0):
            raise ValueError(f"overcommit of {r.label} must be a number > 0, got {out[r]}")
    return out


def _sizes(given: np.ndarray, demand: np.ndarray, disk_kibs: float, net_kibs: float) -> np.ndarray:
    """What a real host knows of each VM: configured vCPUs and memory, nominal disk and net.

    No trace provisions disk or net: a VM with such a device gets the nominal
    allowance, as a real host knows its devices (never the replay's future peaks).
    """
    sizes = np.array(given, dtype=float)
    sizes[:, CPU] = fillnan(sizes[:, CPU], 1.0).clip(min=1).round()
    for r, nominal in ((DISK, disk_kibs), (NET, net_kibs)):
        has = np.isfinite(demand[:, :, r]).any(axis=0)
        sizes[:, r] = np.where(np.isnan(sizes[:, r]) & has, float(nominal), sizes[:, r])
    return sizes


class SimHost(HostBase):
    period: float  # the trace's, always known

    def __init__(
        self,
        trace,
        overcommit: float | Mapping[str, float] = 1.5,
        presence: np.ndarray | None = None,
        name: str = "sim",
        memory: MemoryModel | None = None,
        exempt: bool = False,
        disk_kibs: float = DISK_KIBS_PER_VM,
        net_kibs: float = NET_KIBS_PER_VM,
        weights: Sequence[float] | None = None,
    ) -> None:
        factors = overcommit_factors(overcommit)
        self.memory = memory or MemoryModel()
        self.exempt = exempt  # the oracle: no reclaim latency
        demand = np.asarray(trace.demand, dtype=float)
        if demand.ndim != 3 or demand.shape[2] != N_RES:
            raise ValueError(f"trace demand must be (periods, vms, {N_RES}), got {demand.shape}")
        self.periods, n, _ = demand.shape
        sizes = _sizes(trace.sizes, demand, disk_kibs, net_kibs)
        demand = demand.copy()
        demand[:, :, CPU] = np.minimum(demand[:, :, CPU], sizes[None, :, CPU])
        self.demand = np.maximum(demand, 0.0, where=~np.isnan(demand), out=demand)
        self.sizes = sizes

        cap = np.full(N_RES, np.nan)
        for r in range(N_RES):
            if not np.isnan(sizes[:, r]).all():
                cap[r] = np.nansum(sizes[:, r]) / factors[r]
        pcpus = max(1, int(round(cap[CPU])))
        cap[CPU] = float(pcpus)  # a host has whole cores
        self._capacity = HostCapacity(name=name, capacity=cap, pcpus=pcpus)
        self.overcommit = overcommit

        ids = [str(v) for v in trace.vm_ids]
        self.all_vms = VMSet.build(
            uuids=[str(uuid.uuid5(NAMESPACE, f"{getattr(trace, 'name', '')}/{v}")) for v in ids],
            names=[f"vm-{v}" for v in ids],
            sizes=sizes,
            min_memory=np.zeros(n),
            weight=None if weights is None else np.resize(np.asarray(weights, dtype=float), n),
        )
        if presence is None:  # a VM with no sample at all in a period was not running then
            presence = np.isfinite(demand).any(axis=2)
        self.presence = np.asarray(presence, bool)
        if self.presence.shape != (self.periods, n):
            raise ValueError(f"presence must be {(self.periods, n)}, got {self.presence.shape}")
        self.t0 = float(getattr(trace, "start", 0.0))  # (``start`` is the Host protocol's)
        self.period = float(getattr(trace, "period", 300.0))
        self.controls = Controls.defaults(self.all_vms)
        self._vstart = np.r_[0, np.cumsum(self.all_vms.vcpus)[:-1]]
        self.first_seen = np.full(n, -1, dtype=np.intp)
        self.t = 0
        self._rows: np.ndarray | None = None
        self._view: tuple[VMSet, np.ndarray] | None = None
        self.actions = {k: 0 for k in kinds.names()}
        self.footprints = Footprints(n, self.memory, exempt) if self.memory.enabled else None
        self._burden = (0.0, 0.0, 0.0)  # next period's migration work: MiB held, MiB-seconds, core-seconds

    @property
    def capacity(self) -> HostCapacity:
        return self._capacity

    # -- the present VMs ----------------------------------------------------------
    def _present(self, t: int) -> tuple[np.ndarray, VMSet, np.ndarray]:
        mask = self.presence[t]
        rows = np.flatnonzero(mask)
        if self._rows is not None and self._view is not None and np.array_equal(rows, self._rows):
            vms, vidx = self._view
            return rows, vms, vidx
        gone = np.setdiff1d(self._rows if self._rows is not None else rows, rows)
        self._reset(gone)  # a VM that left comes back as a new VM
        if rows.size == self.all_vms.n:
            vms = self.all_vms
        else:
            a = self.all_vms
            vms = VMSet(a.uuids[rows], a.names[rows], a.sizes[rows], a.min_memory[rows], a.weight[rows])
        counts = self.all_vms.vcpus[rows]
        vidx = np.repeat(self._vstart[rows], counts) + (
            np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        self._rows, self._view = rows, (vms, vidx)
        return rows, vms, vidx

    def _reset(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        fresh = Controls.defaults(self.all_vms)
        for name in kinds.per_vm_fields():
            getattr(self.controls, name)[rows] = getattr(fresh, name)[rows]
        counts = self.all_vms.vcpus[rows]
        for r, c in zip(self._vstart[rows], counts, strict=True):
            self.controls.pins[r : r + c] = -1
        self.first_seen[rows] = -1
        if self.footprints is not None:
            self.footprints.reset(rows)

    def _controls_for(self, rows: np.ndarray, vidx: np.ndarray) -> Controls:
        c = self.controls
        if rows.size == self.all_vms.n:
            return c  # the guard copies before it changes anything
        assert c.diskcap is not None  # Controls.__post_init__ fills it
        return Controls(c.shares[rows], c.quota[rows], c.balloon[rows], c.blkio[rows], c.netcap[rows],
                        c.pins[vidx], c.pin_width, c.diskcap[rows])

    # -- granting -----------------------------------------------------------------
    def grant(self, demand: np.ndarray, vms: VMSet, ctl: Controls, mem: MemoryOutcome | None = None,
              busy: float = 0.0) -> np.ndarray:
        """What each VM actually gets this period under the applied controls.

        ``mem``: the memory model's outcome; ``busy``: cores the host spends on its own
        work (a migration's copy), not available to any VM.
        """
        cap = self._capacity.capacity
        if busy > 0:
            cap = cap.copy()
            cap[CPU] = max(cap[CPU] - busy, 0.0)
        d = fillnan(demand, 0.0)
        out = np.zeros_like(d)
        v = vms.vcpus
        limit = np.minimum(v, fillnan(ctl.quota, np.inf))
        want = np.minimum(d[:, CPU], limit)
        if mem is not None:  # a vCPU waiting on swapped-out pages is not runnable: others may use the core
            want = want * mem.cpu_factor
        if (ctl.pins < 0).all():
            out[:, CPU] = water_fill(want, ctl.shares, cap[CPU])
        else:
            width = max(1, int(ctl.pin_width))
            groups = max(1, self._capacity.pcpus // width)
            owner = vms.vcpu_owner()
            per = np.repeat(want / v, v)
            w = np.repeat(ctl.shares / v, v)
            # Progressive filling with affinity: a pinned vCPU gets no more than its
            # group's max-min share; then every vCPU shares the whole host, because
            # floating vCPUs run wherever a pCPU has room (as CFS migrates them).
            pinned = ctl.pins >= 0
            bound = per.copy()
            bound[pinned] = water_fill(per[pinned], w[pinned], np.full(groups, float(width)),
                                       ctl.pins[pinned] % groups)
            got = water_fill(bound, w, cap[CPU])
            out[:, CPU] = np.bincount(owner, weights=got, minlength=vms.n)
        assert ctl.diskcap is not None  # Controls.__post_init__ fills it
        size_mem = fillnan(vms.sizes[:, MEMORY], 0.0)
        target = np.where(np.isnan(ctl.balloon), size_mem, ctl.balloon)
        rest_d = np.column_stack([
            np.minimum(d[:, MEMORY], target),
            np.minimum(d[:, 2], fillnan(ctl.diskcap, np.inf)),
            np.minimum(d[:, 3], fillnan(ctl.netcap, np.inf)),
        ])
        rest_w = np.column_stack([np.maximum(target, 1.0), ctl.blkio, np.ones(vms.n)])
        out[:, 1:] = water_fill_columns(rest_d, rest_w, fillnan(cap[1:], 0.0))
        if mem is not None:  # memory is what the footprints hold, not a share of host memory
            out[:, MEMORY] = mem.granted
        return out

    def _memory_step(self, t: int, rows: np.ndarray, vms: VMSet, ctl: Controls) -> MemoryOutcome | None:
        if self.footprints is None or np.isnan(self._capacity.capacity[MEMORY]):
            return None
        demand = self.demand[t, rows]
        size = fillnan(vms.sizes[:, MEMORY], 0.0)
        limit = np.where(np.isnan(ctl.balloon), size, np.minimum(ctl.balloon, size))
        io_mib = fillnan(demand[:, DISK], 0.0) * self.period / 1024.0
        mib, mib_s, _ = self._burden
        held = (mib, mib_s / max(mib, 1e-9) / self.period) if mib > 0 else (0.0, 0.0)
        return self.footprints.step(rows, demand[:, MEMORY], limit, io_mib, self.period,
                                    float(self._capacity.capacity[MEMORY]), held)

    def burden(self, mib: float, cores: float, seconds: float) -> None:
        """Next period, a live migration holds ``mib`` here and spends ``cores`` for ``seconds``.

        The cluster simulator books it: on the source, the moving VM's memory stays
        resident and QEMU spends CPU on the copy until the switch-over; on the target
        of a copy that fails, the memory received so far was held for nothing.
        """
        s = min(max(seconds, 0.0), self.period)
        m, ms, cs = self._burden
        self._burden = (m + mib, ms + mib * s, cs + cores * s)

    @staticmethod
    def signals(demand: np.ndarray, got: np.ndarray, vms: VMSet, mem: MemoryOutcome | None) -> np.ndarray:
        """What a real host shows of unmet demand: CPU steal, memory and I/O stall time, nothing for net.

        Steal is the share of the VM's vCPU time runnable but not running (time a vCPU
        stalls on swapped-out pages is not runnable, so it is not steal); memory and disk
        show a stall share that saturates (``PRESSURE_GAIN``), never the missing MiB.
        """
        sig = np.full(demand.shape, np.nan)
        want = np.minimum(demand[:, CPU], vms.vcpus)
        if mem is not None:
            want = want * mem.cpu_factor
        sig[:, CPU] = np.clip((want - got[:, CPU]) / vms.vcpus, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            for r in (MEMORY, DISK):
                short = np.where(demand[:, r] > 0, (demand[:, r] - got[:, r]) / demand[:, r], 0.0)
                sig[:, r] = np.round(np.clip(PRESSURE_GAIN * short, 0.0, 1.0), 4)
        sig[np.isnan(demand)] = np.nan
        sig[:, NET] = np.nan
        return sig

    # -- the Host protocol --------------------------------------------------------------
    def observe(self) -> Observation | None:
        if self.t >= self.periods:
            return None
        t = self.t
        rows, vms, vidx = self._present(t)
        ctl = self._controls_for(rows, vidx)
        demand = self.demand[t, rows]
        mem = self._memory_step(t, rows, vms, ctl)
        busy = self._burden[2] / self.period  # cores the copies took, averaged over the period
        self._burden = (0.0, 0.0, 0.0)
        got = self.grant(demand, vms, ctl, mem, busy)
        missing = np.isnan(demand)
        signal = self.signals(demand, got, vms, mem)
        usage = np.where(missing, np.nan, got)
        new = self.first_seen[rows] < 0
        self.first_seen[rows[new]] = t
        nxt = self.demand[t + 1, rows] if t + 1 < self.periods else demand
        self.t += 1
        return Observation(
            ts=self.t0 + t * self.period,
            interval=self.period,
            host=self._capacity,
            vms=vms,
            usage=usage,
            signal=signal,
            controls=ctl,
            age=t - self.first_seen[rows],
            truth=demand,
            truth_next=nxt,
            resident=None if mem is None else mem.resident,
            host_swap=None if mem is None else mem.host_swap,
        )

    def apply(self, plan: Plan) -> ApplyResult:
        rows, _, vidx = self._present(self.t - 1)
        c, new = self.controls, plan.controls
        if rows.size == self.all_vms.n:
            self.controls = new.copy()  # a Step handed out keeps its own plan
        else:
            for name in kinds.per_vm_fields():
                getattr(c, name)[rows] = getattr(new, name)
            c.pins[vidx] = new.pins
            c.pin_width = new.pin_width
        counts = plan.counts()
        for k, v in counts.items():
            self.actions[k] = self.actions.get(k, 0) + v
        return ApplyResult(applied=counts)
