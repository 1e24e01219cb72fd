"""The production loop on the simulated host: VMs coming and going, what the host shows, metrics."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from rescoin.core.loop import ControlLoop, run_daemon
from rescoin.core.model import Controls
from rescoin.core.registry import POLICIES, build, recipe
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.hosts.sim import SimHost
from rescoin.offline.evaluate import jain
from rescoin.offline.simulate import SimSettings, build_loop, run_policy

NAN = np.nan


def mixed_trace(kit, periods=10, n=4, seed=5, scale=1.0, vcpus=None):
    rng = np.random.default_rng(seed)
    demand = np.empty((periods, n, N_RES))
    demand[:, :, CPU] = rng.uniform(0.2, 2.0, (periods, n)) * scale
    demand[:, :, MEMORY] = rng.uniform(300, 2000, (periods, n)) * scale
    demand[:, :, DISK] = rng.uniform(10, 500, (periods, n)) * scale
    demand[:, :, NET] = rng.uniform(10, 500, (periods, n)) * scale
    sizes = np.tile([2.0, 2048.0, NAN, NAN], (n, 1))
    if vcpus is not None:
        sizes[:, CPU] = vcpus
    return kit.trace(demand, sizes)


# -- VMs that come and go --------------------------------------------------------------------------

PRESENCE = np.array([
    # VM0 always; VM1 leaves at 4 and returns at 7; VM2 appears at 2; VM3 leaves for good at 5
    [1, 1, 0, 1],
    [1, 1, 0, 1],
    [1, 1, 1, 1],
    [1, 1, 1, 1],
    [1, 0, 1, 1],
    [1, 0, 1, 0],
    [1, 0, 1, 0],
    [1, 1, 1, 0],
    [1, 1, 1, 0],
    [1, 1, 1, 0],
], dtype=bool)


@pytest.mark.parametrize("name", list(POLICIES))
def test_vms_come_and_go(kit, name):
    trace = mixed_trace(kit, vcpus=[1, 2, 3, 2])
    loop = build_loop(trace, name, SimSettings(), presence=PRESENCE)
    all_uuids = np.asarray(loop.host.all_vms.uuids)
    steps = list(loop.steps())
    assert len(steps) == PRESENCE.shape[0]
    first_seen = {}
    for t, step in enumerate(steps):
        obs = step.obs
        want = list(all_uuids[PRESENCE[t]])
        assert list(obs.vms.uuids) == want, f"period {t}"
        assert step.allocation.amount.shape == (obs.n, N_RES)
        assert step.plan.controls.pins.shape == (int(obs.vms.vcpus.sum()),)
        for i, u in enumerate(obs.vms.uuids):
            vm = int(np.flatnonzero(all_uuids == u)[0])
            if t == 0 or not PRESENCE[t - 1, vm]:
                first_seen[vm] = t  # new, or back after leaving: a new VM
            assert obs.age[i] == t - first_seen[vm], f"VM{vm} age at period {t}"
    assert list(loop.history.vms.uuids) == list(all_uuids[PRESENCE[-1]])
    # VM1 departed at 4: absent from that observation; back at 7 with age 0 and fresh controls
    back = steps[7].obs
    i = list(back.vms.uuids).index(all_uuids[1])
    assert back.age[i] == 0
    fresh = Controls.defaults(loop.host.all_vms)
    assert back.controls.balloon[i] == fresh.balloon[1]
    assert back.controls.shares[i] == fresh.shares[1]
    start = int(back.vms.vcpus[:i].sum())
    assert np.all(back.controls.pins[start:start + 2] == -1)  # VM1 has 2 vCPUs


def _controls_of(ctl, vms, u):
    i = list(vms.uuids).index(u)
    start = int(vms.vcpus[:i].sum())
    return dict(shares=ctl.shares[i], quota=ctl.quota[i], balloon=ctl.balloon[i], blkio=ctl.blkio[i],
                netcap=ctl.netcap[i], pins=ctl.pins[start:start + vms.vcpus[i]].tolist())


@pytest.mark.parametrize("name", ["rescoin", "mom", "vm-balancer", "kvmscheduling"])
def test_applied_controls_follow_uuid_as_vms_come_and_go(kit, name):
    """What the guard applied to a VM is what the host shows for it next period, whoever left or came."""
    trace = mixed_trace(kit, vcpus=[1, 2, 3, 2], scale=1.5)
    loop = build_loop(trace, name, SimSettings(overcommit=2.0), presence=PRESENCE)
    seen = []  # (vms, observed controls, planned controls), copied as each step happens
    for step in loop.steps():
        seen.append((step.obs.vms, step.obs.controls.copy(), step.plan.controls.copy()))
    checked = 0
    for (pv, _, planned), (cv, observed, _) in zip(seen, seen[1:], strict=False):
        for u in set(pv.uuids) & set(cv.uuids):
            want = _controls_of(planned, pv, u)
            got = _controls_of(observed, cv, u)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} of {u}")
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", ["rescoin", "mom"])
def test_step_records_do_not_change_afterwards(kit, name):
    """A Step is what one control step saw and did: later periods must not rewrite it."""
    trace = mixed_trace(kit, vcpus=[1, 2, 3, 2], scale=1.5)
    loop = build_loop(trace, name, SimSettings(overcommit=2.0), presence=PRESENCE)
    steps, frozen = [], []
    for step in loop.steps():
        steps.append(step)
        frozen.append((step.obs.controls.copy(), step.plan.controls.copy()))
    for t, (step, (obs_ctl, plan_ctl)) in enumerate(zip(steps, frozen, strict=False)):
        for k in ("shares", "quota", "balloon", "blkio", "netcap", "pins"):
            np.testing.assert_array_equal(getattr(step.obs.controls, k), getattr(obs_ctl, k),
                                          err_msg=f"obs.controls.{k} of period {t} changed later")
            np.testing.assert_array_equal(getattr(step.plan.controls, k), getattr(plan_ctl, k),
                                          err_msg=f"plan.controls.{k} of period {t} changed later")


def test_period_with_no_vms(kit):
    presence = np.ones((6, 3), dtype=bool)
    presence[2] = False
    trace = mixed_trace(kit, periods=6, n=3)
    for name in ("rescoin", "drf", "mom", "vm-balancer", "kvmscheduling", "oracle"):
        loop = build_loop(trace, name, SimSettings(), presence=presence)
        steps = list(loop.steps())
        assert [s.obs.n for s in steps] == [3, 3, 0, 3, 3, 3]
        assert all(a == 0 for a in steps[3].obs.age)


@pytest.mark.parametrize("name", list(POLICIES))
def test_missing_samples_do_not_break_the_loop(kit, name):
    rng = np.random.default_rng(4)
    trace = mixed_trace(kit, periods=10, n=4)
    trace.demand[rng.uniform(size=trace.demand.shape) < 0.2] = NAN
    trace.demand[:, 3, MEMORY] = NAN  # a VM whose memory use is never known
    loop = build_loop(trace, name, SimSettings(overcommit=2.0))
    for step in loop.steps():
        c = step.plan.controls
        for k in ("shares", "balloon", "blkio"):
            assert not np.isnan(getattr(c, k)).any(), f"NaN {k}"
        d = step.obs.truth
        np.testing.assert_array_equal(np.isnan(step.obs.usage), np.isnan(d))  # unknown stays unknown
        # nobody knows what VM3 uses: rescoin's guard never reclaims from it (the physical one may)
        if recipe(name).guard == "rescoin":
            assert c.balloon[3] >= step.obs.controls.balloon[3] - 1e-9


def test_presence_shape_checked(kit):
    trace = mixed_trace(kit, periods=4, n=2)
    with pytest.raises(ValueError):
        SimHost(trace, presence=np.ones((3, 2), dtype=bool))


# -- what the simulated host shows -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rescoin", "static", "mom", "drf", "vm-balancer"])
def test_sim_host_never_shows_true_demand(kit, name):
    trace = mixed_trace(kit, periods=12, n=5, seed=9, scale=1.3)
    loop = build_loop(trace, name, SimSettings(overcommit=2.0))
    contended = False
    for step in loop.steps():
        obs = step.obs
        d, u, s = obs.truth, obs.usage, obs.signal
        known = ~np.isnan(d)
        assert np.all(u[known] <= d[known] + 1e-9), "usage above demand"
        assert np.all(u[known] >= -1e-12)
        pos = known & (d > 0)
        # a real host shows stall time, not the missing share: net shows nothing, the others are 0
        # when nothing is missing and on when something is (memory and disk to 4 decimals of a
        # saturating stall share; CPU steal, except while the host swaps: a stalled vCPU is not runnable)
        assert np.isnan(s[:, 3]).all()
        pos[:, 3] = False
        assert np.all(s[pos & (s > 0)] <= 1) and not np.any(s[pos] < 0)
        assert np.all(u[pos & (s > 0)] < d[pos & (s > 0)])
        assert np.all(s[:, :3][known[:, :3] & (d[:, :3] == 0)] == 0)
        short = pos & (u < d * (1 - 1e-4))
        if not obs.host_swap:
            assert np.all(s[short] > 0)
        else:
            assert np.all(s[:, 1:3][short[:, 1:3]] > 0)
        contended |= bool((u[pos] < d[pos]).any())
    assert contended, "the scenario should contend for something"


def _two_vm_host(kit, cpu_demand, mem_demand):
    demand = np.full((2, 2, N_RES), NAN)
    demand[:, :, CPU] = cpu_demand
    demand[:, :, MEMORY] = mem_demand
    sizes = np.array([[4.0, 1000.0, NAN, NAN], [4.0, 1000.0, NAN, NAN]])
    return SimHost(kit.trace(demand, sizes), overcommit=2.0)  # 4 cores, 1000 MiB


def test_cpu_grant_is_weighted_max_min_by_shares(kit):
    host = _two_vm_host(kit, [4.0, 4.0], [100.0, 100.0])
    assert host.capacity.capacity[CPU] == 4.0
    host.controls.shares = np.array([1024.0, 3072.0])
    obs = host.observe()
    np.testing.assert_allclose(obs.usage[:, CPU], [1.0, 3.0])  # 4 cores split 1:3
    np.testing.assert_allclose(obs.signal[:, CPU], [0.75, 0.25])


def test_cpu_grant_small_demand_met_rest_to_other(kit):
    host = _two_vm_host(kit, [0.5, 4.0], [100.0, 100.0])
    obs = host.observe()  # default equal shares
    np.testing.assert_allclose(obs.usage[:, CPU], [0.5, 3.5])
    np.testing.assert_allclose(obs.signal[:, CPU], [0.0, 0.125])


def test_cpu_grant_capped_by_quota(kit):
    host = _two_vm_host(kit, [4.0, 4.0], [100.0, 100.0])
    host.controls.quota = np.array([0.5, NAN])
    obs = host.observe()
    np.testing.assert_allclose(obs.usage[:, CPU], [0.5, 3.5])


def test_cpu_grant_with_pins_per_pcpu(kit):
    demand = np.full((1, 2, N_RES), NAN)
    demand[:, :, CPU] = 1.0
    host = SimHost(kit.trace(demand, np.array([1.0, 1.0])), overcommit=1.0)  # 2 pCPUs
    host.controls.pins = np.array([0, 0])  # both single vCPUs on pCPU 0
    obs = host.observe()
    np.testing.assert_allclose(obs.usage[:, CPU], [0.5, 0.5])
    host2 = SimHost(kit.trace(demand, np.array([1.0, 1.0])), overcommit=1.0)
    host2.controls.pins = np.array([0, 1])
    np.testing.assert_allclose(host2.observe().usage[:, CPU], [1.0, 1.0])



def test_floating_vcpus_use_any_room_pinned_ones_only_their_group(kit):
    # 3 single-vCPU VMs on 2 pCPUs: A and B pinned to pCPU 0, C floating.
    demand = np.full((3, 3, N_RES), NAN)
    demand[:, :, CPU] = 1.0
    host = SimHost(kit.trace(demand, np.array([1.0, 1.0, 1.0])), overcommit=1.5)  # 2 pCPUs
    assert host.observe().host.pcpus == 2
    host.controls.pins = np.array([0, 0, -1])
    # A and B split pCPU 0; C floats onto the idle pCPU 1 and gets all of it
    np.testing.assert_allclose(host.observe().usage[:, CPU], [0.5, 0.5, 1.0])
    # pinned apart, A and B each have a pCPU; C shares the host's last bit of room: none left
    host.controls.pins = np.array([0, 1, -1])
    got = host.observe().usage[:, CPU]
    assert got.sum() == pytest.approx(2.0)
    # max-min over the whole host: everyone equal at 2/3 (C takes a third from each pCPU)
    np.testing.assert_allclose(got, [2 / 3, 2 / 3, 2 / 3])

def test_memory_grant_is_min_of_demand_and_balloon(kit):
    host = _two_vm_host(kit, [1.0, 1.0], [500.0, 500.0])
    host.controls.balloon = np.array([300.0, 700.0])
    obs = host.observe()
    np.testing.assert_allclose(obs.usage[:, MEMORY], [300.0, 500.0])
    # 40% of the first VM's working set missing: its memory stall share saturates (5 x 0.4, at most 1)
    np.testing.assert_allclose(obs.signal[:, MEMORY], [1.0, 0.0])


def test_vcpu_count_caps_cpu_demand(kit):
    demand = np.full((1, 1, N_RES), NAN)
    demand[:, :, CPU] = 7.0
    host = SimHost(kit.trace(demand, np.array([2.0])), overcommit=0.25)  # 8 cores, 2 vCPUs
    obs = host.observe()
    assert obs.usage[0, CPU] == pytest.approx(2.0)


def test_sim_host_sizes_and_capacity(kit):
    trace = mixed_trace(kit, periods=3, n=4)
    host = SimHost(trace, overcommit=2.0)
    cap = host.capacity.capacity
    assert cap[CPU] == 4.0 and host.capacity.pcpus == 4
    assert cap[MEMORY] == pytest.approx(4 * 2048.0 / 2)
    with pytest.raises(ValueError):
        SimHost(trace, overcommit=0.0)


def test_sim_host_ends(kit):
    host = SimHost(mixed_trace(kit, periods=2, n=1))
    assert host.observe() is not None and host.observe() is not None
    assert host.observe() is None


# -- placement beyond one byte of CPUs --------------------------------------------------------------


@pytest.mark.parametrize("name", ["vm-balancer", "kvmscheduling", "rescoin"])
def test_many_pcpus_all_used(kit, name):
    # 72 single-vCPU VMs, each wanting one full core, on a 72-pCPU host
    n, periods = 72, 4
    trace = kit.trace(np.ones((periods, n)), np.ones(n))
    result = run_policy(trace, name, SimSettings(overcommit=1.0))
    assert result["cpu"]["satisfaction"] == pytest.approx(1.0)
    assert result["cpu"]["violations"] == 0.0


# -- metrics ----------------------------------------------------------------------------------------


def test_oracle_uncontended_is_fully_satisfied(kit):
    rng = np.random.default_rng(2)
    periods, n = 16, 4
    demand = np.empty((periods, n, N_RES))
    demand[:, :, CPU] = rng.uniform(0.1, 1.0, (periods, n))
    demand[:, :, MEMORY] = 600 + 50 * np.sin(np.arange(periods))[:, None] + 10 * np.arange(n)[None, :]
    demand[:, :, DISK] = rng.uniform(1, 100, (periods, n))
    demand[:, :, NET] = rng.uniform(1, 100, (periods, n))
    trace = kit.trace(demand, np.tile([2.0, 4096.0, NAN, NAN], (n, 1)))
    result = run_policy(trace, "oracle", SimSettings(overcommit=1.0))
    for r in ("cpu", "memory", "disk", "net"):
        m = result[r]
        assert m["satisfaction"] == pytest.approx(1.0), r
        assert m["violations"] == 0.0, r
        assert m["breaches"] == 0.0, r
        assert m["worst_off"] == pytest.approx(1.0), r
        assert m["fairness"] == pytest.approx(1.0), r


def test_static_contended_metrics_by_hand(kit):
    # 2 VMs of 4 vCPUs on 4 cores, demanding 4 and 1 every period; equal shares -> 3 and 1
    periods = 6
    demand = np.tile([4.0, 1.0], (periods, 1))
    trace = kit.trace(demand, np.array([4.0, 4.0]))
    r = run_policy(trace, "static", SimSettings(overcommit=2.0))
    cpu = r["cpu"]
    assert cpu["satisfaction"] == pytest.approx(4.0 / 5.0)
    assert cpu["violations"] == pytest.approx(0.5)  # VM0 below 95% every period
    assert cpu["breaches"] == 0.0  # both get at least min(demand, entitlement 2)
    assert cpu["worst_off"] == pytest.approx(0.75 + 0.05 * 0.25)  # 5th percentile of (0.75, 1)
    assert cpu["fairness"] == pytest.approx(1.75 ** 2 / (2 * (0.75 ** 2 + 1.0)))
    # shares 1024 -> 2048 for both VMs once, over 2 VMs x 6 x 5 min = 1 VM-hour
    assert cpu["actuations_per_vm_hour"] == pytest.approx(2.0)
    assert cpu["under_error"] is None and cpu["over_error"] is None  # static forecasts nothing
    assert all(v is None for v in r["memory"].values())
    assert r["pin_changes_per_vm_hour"] == 0.0


def test_breaches_counted_when_below_sharing_incentive(kit):
    # one VM with all shares: the other gets nothing although it is entitled to half
    periods = 4
    demand = np.tile([4.0, 4.0], (periods, 1))
    trace = kit.trace(demand, np.array([4.0, 4.0]))
    loop = build_loop(trace, "static", SimSettings(overcommit=2.0))
    from rescoin.offline.evaluate import Metrics

    m = Metrics()
    for step in loop.steps():
        loop.host.controls.shares = np.array([262144.0, 2.0])  # a host misconfigured behind our back
        m.update(step, loop.history)
    res = m.result()["cpu"]
    # periods 2..4 run with the skewed shares: VM1 gets 4 * 2 / 262146 < its floor min(4, 2)
    assert res["breaches"] == pytest.approx(3 / 8)


def test_forecast_errors_by_hand(kit):
    # one 4-vCPU VM alone on 4 cores (never contended); rescoin-paper plans on a plain EWMA (cpu alpha 0.7)
    demand = np.array([[1.0], [1.0], [1.0], [3.0], [3.0]])
    trace = kit.trace(demand, np.array([4.0]))
    r = run_policy(trace, "rescoin-paper", SimSettings(overcommit=1.0))["cpu"]
    # forecasts in force in periods 1..4: 1, 1, 1, 1 + 0.7 * 2 = 2.4 against demand 1, 1, 3, 3
    under = (3.0 - 1.0) + (3.0 - 2.4)
    assert r["under_error"] == pytest.approx(under / 8.0)
    assert r["over_error"] == pytest.approx(0.0)
    assert r["satisfaction"] == pytest.approx(1.0)


def test_jain_known_values():
    assert jain(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert jain(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert jain(np.array([1.0, 2.0])) == pytest.approx(9.0 / 10.0)
    assert jain(np.array([0.5, 0.5])) == pytest.approx(1.0)
    assert math.isnan(jain(np.array([])))
    assert math.isnan(jain(np.array([0.0, 0.0])))


# -- the daemon survives a bad period ---------------------------------------------------------


class Flaky:
    def __init__(self, host, fail_at):
        self.host, self.fail_at, self.calls = host, fail_at, 0

    @property
    def capacity(self):
        return self.host.capacity

    def observe(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("libvirt went away")
        return self.host.observe()

    def apply(self, plan):
        return self.host.apply(plan)


def test_daemon_goes_on_after_a_failing_step(kit, caplog):
    host = Flaky(SimHost(mixed_trace(kit, periods=8, n=2)), fail_at=2)
    loop = ControlLoop(host, build("rescoin"), period=300.0)
    taken = run_daemon(loop, 300.0, threading.Event(), speed=0, max_steps=3)
    assert taken == 3
    assert host.calls == 4
    assert "control step failed" in caplog.text


def test_daemon_stops_at_end_of_replay(kit):
    loop = ControlLoop(SimHost(mixed_trace(kit, periods=3, n=2)), build("static"), period=300.0)
    seen = []
    assert run_daemon(loop, 300.0, threading.Event(), on_step=seen.append, speed=0) == 3
    assert len(seen) == 3


@pytest.mark.parametrize("jump_to", [6000.0, 8000.0])  # above the 5461 MiB entitlement
def test_starving_guest_balloon_grows_within_two_periods(kit, jump_to):
    """A memory jump the forecast could not see: the guest starves in one period, is fed by the next."""
    periods, n = 40, 4
    demand = np.full((periods, n, N_RES), np.nan)
    demand[:, :, CPU] = 0.2
    demand[:, :, MEMORY] = 600.0
    demand[25:, 0, MEMORY] = jump_to  # VM 0's memory jumps at period 25
    sizes = np.tile([2.0, 8192.0, np.nan, np.nan], (n, 1))
    loop = build_loop(kit.trace(demand, sizes), "rescoin", SimSettings(overcommit=1.5))
    starved_at = fed_at = None
    for step in loop.steps():
        t = loop.history.t - 1
        granted, want = step.obs.usage[0, MEMORY], step.obs.truth[0, MEMORY]
        if starved_at is None and granted < want - 1:
            starved_at = t
        if starved_at is not None and fed_at is None and granted >= want - 1:
            fed_at = t
    assert starved_at == 25, "the jump is unforeseeable: the guest starves when it happens"
    assert fed_at is not None and fed_at - starved_at <= 2, (starved_at, fed_at)


def test_credit_is_the_policys_own_and_nan_without_credits(kit):
    """Reporters read the credit the policy computed (its window and norm); drf has none (NaN)."""
    from rescoin.core.policies.rescoin import combined_credit, credits
    from rescoin.core.registry import build

    for name, window, norm in (("rescoin", 3, 2.0), ("drf", None, None)):
        parts = build(name)
        if window is not None:
            parts.policy.window, parts.policy.norm = window, norm
        loop = ControlLoop(SimHost(mixed_trace(kit, periods=6, n=3)), parts, period=300.0)
        differs = False
        for step in loop.steps(6):
            d = step.allocation.diagnostics
            assert d["credit"].shape == (step.obs.n, N_RES) and d["combined_credit"].shape == (step.obs.n,)
            np.testing.assert_array_equal(loop.history.latest("credit"), d["credit"])
            if window is None:
                assert np.isnan(d["credit"]).all() and np.isnan(d["combined_credit"]).all()
            else:
                from rescoin.core.policies import PolicyInput
                inp = PolicyInput(obs=step.obs, forecast=None, history=loop.history, capacity=step.obs.host.capacity,
                                  entitlement=step.entitlement, period=300.0)
                np.testing.assert_allclose(d["credit"], credits(inp, window))
                np.testing.assert_allclose(d["combined_credit"], combined_credit(credits(inp, window), norm))
                differs |= not np.allclose(d["combined_credit"], combined_credit(credits(inp, 10), 1.0))
        assert differs == (window is not None)  # not the reporters' old window 10 and norm 1


def test_only_a_policy_that_declares_it_sees_the_truth(kit):
    """The loop hides truth and truth_next from every policy but one with needs_truth (the oracle)."""
    from rescoin.core.registry import build

    for name in POLICIES:
        parts = build(name)
        seen = []
        inner = parts.policy.allocate
        parts.policy.allocate = lambda inp, _f=inner, _seen=seen: (_seen.append(inp.obs), _f(inp))[1]
        loop = ControlLoop(SimHost(mixed_trace(kit, periods=3, n=2)), parts, period=300.0)
        steps = list(loop.steps(3))
        assert steps[0].obs.truth is not None  # the step (metrics) still has it
        blind = [o.truth is None and o.truth_next is None for o in seen]
        assert all(blind) != parts.policy.needs_truth, name
