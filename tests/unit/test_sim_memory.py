"""The simulated host's memory rules (docs/simulator.md): footprints, reclaim, host swap, signals, sizes."""
from __future__ import annotations

import numpy as np
import pytest

from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.hosts.sim import DISK_KIBS_PER_VM, SimHost, overcommit_factors
from rescoin.hosts.simmemory import Footprints, MemoryModel, warm
from rescoin.offline.simulate import SimSettings, build_loop, run_policy

NAN = np.nan
ROWS = np.arange(2)


def fp(**kw) -> Footprints:
    return Footprints(2, MemoryModel(warm_start=False).with_options(**kw))


def test_footprint_grows_with_io_and_idle_growth_and_stops_at_the_limit():
    f = fp(io_growth=1.0, idle_growth=0.5)
    w, lim = np.array([100.0, 100.0]), np.array([1000.0, 1000.0])
    f.step(ROWS, w, lim, np.zeros(2), 300.0, 1e9)  # first sight: the working set
    np.testing.assert_allclose(f.f, [100.0, 100.0])
    f.step(ROWS, w, lim, np.array([50.0, 0.0]), 3600.0, 1e9)  # an hour: half the gap, plus the I/O
    np.testing.assert_allclose(f.f, [100 + 50 + 450, 100 + 450])
    for _ in range(40):
        f.step(ROWS, w, lim, np.array([500.0, 500.0]), 3600.0, 1e9)
    np.testing.assert_allclose(f.f, lim)  # never above the limit


def test_freed_pages_are_kept_and_the_footprint_never_falls_below_the_working_set():
    f = fp(io_growth=0.0)
    lim = np.array([1000.0, 1000.0])
    f.step(ROWS, np.array([100.0, 100.0]), lim, np.zeros(2), 300.0, 1e9)
    f.step(ROWS, np.array([700.0, 100.0]), lim, np.zeros(2), 300.0, 1e9)
    out = f.step(ROWS, np.array([200.0, 100.0]), lim, np.zeros(2), 300.0, 1e9)
    np.testing.assert_allclose(f.f, [700.0, 100.0])  # the peak stays resident: nobody took it back
    np.testing.assert_allclose(out.granted, [200.0, 100.0])


def test_balloon_reclaim_is_limited_per_second_and_the_oracle_is_exempt():
    slow = fp(io_growth=0.0, reclaim_mib_s=1.0)
    quick = Footprints(2, MemoryModel(warm_start=False, reclaim_mib_s=1.0), exempt=True)
    for f in (slow, quick):
        f.step(ROWS, np.array([800.0, 800.0]), np.array([1000.0, 1000.0]), np.zeros(2), 300.0, 1e9)
        f.step(ROWS, np.array([100.0, 100.0]), np.array([100.0, 1000.0]), np.zeros(2), 300.0, 1e9)
    np.testing.assert_allclose(slow.f, [800.0 - 300.0, 800.0])  # 1 MiB/s for 300 s
    np.testing.assert_allclose(quick.f, [100.0, 800.0])


def test_reclaim_below_the_working_set_leaves_that_demand_unmet():
    f = fp()
    f.step(ROWS, np.array([500.0, 500.0]), np.array([1000.0, 1000.0]), np.zeros(2), 300.0, 1e9)
    out = f.step(ROWS, np.array([500.0, 500.0]), np.array([300.0, 1000.0]), np.zeros(2), 300.0, 1e9)
    np.testing.assert_allclose(out.granted, [300.0, 500.0])
    np.testing.assert_allclose(out.cpu_factor, [1.0, 1.0])  # the guest's own swap: memory, not host swap


def test_host_swap_takes_memory_in_proportion_to_footprint_and_slows_cpu():
    f = fp(io_growth=0.0, swap_penalty=1.0)
    w, lim = np.array([300.0, 100.0]), np.array([1000.0, 1000.0])
    f.step(ROWS, np.array([600.0, 200.0]), lim, np.zeros(2), 300.0, 1e9)  # footprints 600 and 200
    out = f.step(ROWS, w, lim, np.zeros(2), 300.0, 400.0)  # 800 resident on a 400 MiB host
    assert out.host_swap == pytest.approx(400.0)
    lost = np.array([300.0, 100.0])  # half of each footprint ...
    np.testing.assert_allclose(out.resident, [600.0, 200.0] - lost)
    np.testing.assert_allclose(out.granted, w - lost * w / [600.0, 200.0])  # ... so half of each working set
    np.testing.assert_allclose(out.cpu_factor, [0.5, 0.5])
    calm = f.step(ROWS, w, lim, np.zeros(2), 300.0, 1e6)
    assert calm.host_swap == 0.0 and np.all(calm.cpu_factor == 1.0)


def test_a_warm_host_is_full_but_not_over():
    held, lim = np.array([100.0, 300.0]), np.array([1000.0, 500.0])
    start = warm(held, lim, 1000.0)
    assert start.sum() == pytest.approx(1000.0)
    np.testing.assert_allclose(start, held + np.array([900.0, 200.0]) * 600.0 / 1100.0)
    np.testing.assert_allclose(warm(held, lim, 300.0), held)  # already over: nothing added


def _trace(kit, periods=200, n=4, io=200.0):
    demand = np.zeros((periods, n, N_RES))
    demand[:, :, CPU] = 0.5
    demand[:, :, MEMORY] = 400.0
    demand[:, :, DISK] = io  # KiB/s: 58.6 MiB of page cache per 300 s period
    demand[:, :, NET] = 1.0
    return kit.trace(demand, np.tile([1.0, 2000.0, NAN, NAN], (n, 1)))


def test_an_unmanaged_overcommitted_host_swaps_while_balloons_at_the_working_set_do_not(kit):
    trace = _trace(kit)
    model = MemoryModel(warm_start=False)
    none = run_policy(trace, "none", SimSettings(overcommit=1.5, memory=model))
    oracle = run_policy(trace, "oracle", SimSettings(overcommit=1.5, memory=model))
    assert none["host_swap"]["share_of_periods"] > 0.3  # footprints grew to the VMs' full size
    assert none["memory"]["satisfaction"] < 0.95 and none["cpu"]["satisfaction"] < 0.95
    assert oracle["host_swap"]["share_of_periods"] == 0.0
    assert oracle["memory"]["satisfaction"] == pytest.approx(1.0)
    off = run_policy(trace, "none", SimSettings(overcommit=1.5, memory=MemoryModel(enabled=False)))
    assert off["memory"]["satisfaction"] == pytest.approx(1.0)  # the old rule: memory not reclaimed is free


def test_the_model_off_is_the_old_grant_rule(kit):
    demand = np.full((1, 2, N_RES), NAN)
    demand[:, :, CPU] = 1.0
    demand[:, :, MEMORY] = [600.0, 600.0]
    trace = kit.trace(demand, np.array([[4.0, 1000.0, NAN, NAN]] * 2))
    host = SimHost(trace, overcommit=2.0, memory=MemoryModel(enabled=False))  # 1000 MiB host
    host.controls.balloon = np.array([300.0, 1000.0])
    obs = host.observe()
    np.testing.assert_allclose(obs.usage[:, MEMORY], [300.0, 600.0])
    assert obs.resident is None and obs.host_swap is None


def test_signals_are_steal_stall_time_and_nothing_for_net(kit):
    demand = np.full((1, 2, N_RES), NAN)
    demand[0, :, CPU] = [4.0, 1.0]
    demand[0, :, MEMORY] = [500.0, 500.0]
    demand[0, :, NET] = [10.0, 10.0]
    trace = kit.trace(demand, np.array([[4.0, 1000.0, NAN, NAN]] * 2))
    host = SimHost(trace, overcommit=2.0, memory=MemoryModel(warm_start=False))  # 4 cores
    host.controls.balloon = np.array([450.0, 1000.0])
    obs = host.observe()
    got = obs.usage[0, CPU]
    assert obs.signal[0, CPU] == pytest.approx((4.0 - got) / 4.0)  # steal: of the VM's vCPU time
    assert obs.signal[1, CPU] == 0.0
    assert obs.signal[0, MEMORY] == pytest.approx(min(1.0, 5 * 50 / 500))  # stall share, not the missing 0.1
    assert obs.signal[1, MEMORY] == 0.0
    assert np.isnan(obs.signal[:, NET]).all()


def test_sizes_are_what_a_host_knows_then_and_overcommit_is_per_resource(kit):
    trace = _trace(kit, periods=10)
    late = _trace(kit, periods=10)
    late.demand[-1, :, DISK] = 1e7  # a burst at the end must not change what the host shows at the start
    a, b = SimHost(trace), SimHost(late)
    np.testing.assert_array_equal(a.all_vms.sizes, b.all_vms.sizes)
    assert a.all_vms.sizes[0, DISK] == DISK_KIBS_PER_VM
    host = SimHost(trace, overcommit={"cpu": 4, "memory": 2})
    cap = host.capacity.capacity
    assert cap[CPU] == 1.0 and cap[MEMORY] == pytest.approx(4 * 2000 / 2)
    assert cap[DISK] == pytest.approx(4 * DISK_KIBS_PER_VM / 1.5)  # unnamed: the default factor
    with pytest.raises(ValueError, match="unknown resource"):
        overcommit_factors({"gpu": 2})


def test_only_the_oracle_is_shown_true_demand(kit):
    seen = {}
    for name in ("rescoin", "mom", "oracle"):
        loop = build_loop(_trace(kit, periods=3), name, SimSettings())
        original = loop.policy.allocate

        def spy(inp, _name=name, _orig=original):
            seen.setdefault(_name, []).append((inp.obs.truth is not None, inp.obs.truth_next is not None))
            return _orig(inp)

        loop.policy.allocate = spy
        list(loop.steps())
        assert not hasattr(loop.history, "truth")
    assert all(t == (False, False) for t in seen["rescoin"] + seen["mom"])
    assert all(t == (True, True) for t in seen["oracle"])
