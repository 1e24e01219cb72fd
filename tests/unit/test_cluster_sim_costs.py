"""What a live migration costs in the cluster simulator, and what travels with the VM (its credits)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from rescoin.cluster.model import Move
from rescoin.cluster.sim import ClusterSettings, ClusterSim
from rescoin.core.resources import CPU, MEMORY, N_RES
from rescoin.hosts.sim import SimHost
from rescoin.hosts.simmemory import MemoryModel
from rescoin.offline.simulate import SimSettings


def trace(n: int = 4, periods: int = 30, cpu: float = 0.5, mem: float = 1000.0):
    demand = np.zeros((periods, n, N_RES))
    demand[:, :, CPU] = cpu
    demand[:, :, MEMORY] = mem
    demand[:, :, 2:] = 10.0
    sizes = np.full((n, N_RES), np.nan)
    sizes[:, CPU], sizes[:, MEMORY] = 2, 2048.0
    return SimpleNamespace(demand=demand, sizes=sizes, vm_ids=list(range(n)), name="t", period=300.0, start=0.0)


def test_memory_held_during_a_copy_makes_a_full_host_swap_for_that_share_of_the_period() -> None:
    # 4 VMs x 2048 MiB at memory 2:1 -> 4096 MiB of host, working sets 4 x 1000: 96 MiB free
    host = SimHost(trace(), overcommit={"cpu": 1, "memory": 2.0}, memory=MemoryModel.preset("off"))
    first = host.observe()
    assert first is not None and first.host_swap == 0.0
    host.burden(1000.0, 0.0, 150.0)  # 1000 MiB resident for half the period
    during = host.observe()
    assert during is not None
    assert during.host_swap == np.float64(0.5 * (4000 + 1000 - 4096))
    assert (during.usage[:, MEMORY] < 1000.0).all()  # every VM on the host lost some of its working set
    after = host.observe()
    assert after is not None and after.host_swap == 0.0  # the copy is over: the burden was one period's


def test_the_source_spends_cpu_on_the_copy_when_its_cores_are_contended() -> None:
    # 4 VMs wanting 2 cores each on 4 cores: every core is taken
    host = SimHost(trace(cpu=2.0), overcommit={"cpu": 2.0, "memory": 1.0}, memory=MemoryModel.preset("off"))
    before = host.observe()
    host.burden(0.0, 0.5, 300.0)  # half a core for the whole period
    during = host.observe()
    after = host.observe()
    assert before is not None and during is not None and after is not None
    assert np.isclose(before.usage[:, CPU].sum(), 4.0)
    assert np.isclose(during.usage[:, CPU].sum(), 3.5)
    assert (during.signal[:, CPU] > before.signal[:, CPU]).all()  # the VMs see the lost time as steal
    assert np.isclose(after.usage[:, CPU].sum(), 4.0)


class MoveAt:
    """Moves the first VM of host0 to host1 at ``when`` seconds."""

    name = "move-at"

    def __init__(self, when: float) -> None:
        self.when, self.uuid = when, ""

    def plan(self, state, rules):
        if state.now != self.when:
            return []
        v = next(v for v in state.vms if v.host == "host0")
        self.uuid = v.uuid
        return [Move(v.uuid, v.name, "host0", "host1", "test")]

    def moved(self, move, ok, now):
        assert ok


def credit_after_move(carry: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The moved VM's credit (memory) on the source just before the move and on the target after it."""
    b = MoveAt(when=15 * 300.0)
    sim = ClusterSim(trace(n=4, periods=30, mem=300.0), b, ClusterSettings(hosts=(1, 1)),
                     SimSettings(overcommit=1.0))
    if not carry:
        sim.loops[1].history.carry = lambda *a, **k: None  # type: ignore[method-assign]
    seen: dict[int, list] = {0: [], 1: []}  # per host, per period: uuid -> (memory credit, ledger)
    for t in range(sim.periods):
        steps = [loop.step() for loop in sim.loops]
        for h, loop in enumerate(sim.loops):
            hist = loop.history
            uuids = [] if hist.vms is None else hist.vms.uuids.tolist()
            seen[h].append({u: (hist.latest("credit")[i, MEMORY], hist.latest("ledger")[i])
                            for i, u in enumerate(uuids)})
        if t + 1 < sim.periods:
            sim._round(t, steps)
    src = [p[b.uuid][0] for p in seen[0] if b.uuid in p]
    dst = [p[b.uuid][0] for p in seen[1] if b.uuid in p]
    led = [p[b.uuid][1] for p in seen[0] if b.uuid in p][-1]
    return np.array(src), np.array(dst), led


def test_a_moved_vms_credits_travel_and_fade_into_its_history_on_the_target() -> None:
    src, dst, ledger = credit_after_move(carry=True)
    assert src[-1] > 0 and ledger[MEMORY] > 0  # it used 300 of its 2048 MiB entitlement: it saved
    # on arrival the target weighs it by what it saved on the source (window 10, both hosts alike)
    assert abs(dst[0] - src[-1]) <= 0.05 * src[-1]
    _, bare, _ = credit_after_move(carry=False)
    assert bare[0] < 0.5 * dst[0]  # without the ledger it would arrive with next to nothing
    assert np.allclose(dst[-1], bare[-1], rtol=0.05)  # and after a window its own history is all that counts


def test_a_copy_that_fails_costs_the_source_cpu_and_the_target_memory_and_a_refusal_costs_nothing() -> None:
    sim = ClusterSim(trace(), MoveAt(-1.0), ClusterSettings(hosts=(1, 1), fail_p=1.0), SimSettings(overcommit=1.0))
    steps = [loop.step() for loop in sim.loops]
    state = sim.state(0, steps)
    v = next(v for v in state.vms if v.host == "host0")
    assert not sim.migrate(0, Move(v.uuid, v.name, "host0", "host1", ""), v, state)
    src, dst = sim.hosts[0]._burden, sim.hosts[1]._burden
    assert src[0] == 0.0 and src[2] > 0.0  # the source spent CPU, its VM's memory never left
    assert dst[0] == v.mem_used and dst[2] == 0.0  # the target held what it received
    full = ClusterSim(trace(mem=1900.0), MoveAt(-1.0), ClusterSettings(hosts=(1, 1)), SimSettings(overcommit=1.0))
    steps = [loop.step() for loop in full.loops]
    state = full.state(0, steps)
    v = next(v for v in state.vms if v.host == "host0")
    assert not full.migrate(0, Move(v.uuid, v.name, "host0", "host1", ""), v, state)  # no room: refused
    assert full.hosts[0]._burden == (0.0, 0.0, 0.0) and full.hosts[1]._burden == (0.0, 0.0, 0.0)
