"""The guard: safety floors, step limits, dead-bands, new VMs, weights (DESIGN section 8)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.guard import Guard, GuardConfig, blkio_weights
from rescoin.core.model import Allocation, Controls
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET

NAN = np.nan
C = GuardConfig()


def setup(kit, size, cur, used, *, want=None, signal=None, age=None, min_memory=None, cpu=None,
          disk=None, capacity=None, vcpus=None):
    """Observation + Allocation for a memory (and optionally CPU/disk) decision."""
    n = len(size)
    sizes = np.column_stack([
        np.full(n, 2.0) if vcpus is None else np.asarray(vcpus, float),
        np.asarray(size, float), np.full(n, 1000.0), np.full(n, 1000.0),
    ])
    vms = kit.vms(n, sizes=sizes, min_memory=None if min_memory is None else np.asarray(min_memory, float))
    usage = np.zeros((n, N_RES))
    usage[:, MEMORY] = used
    sig = np.zeros((n, N_RES))
    if signal is not None:
        sig[:, MEMORY] = signal
    ctl = Controls.defaults(vms)
    ctl.balloon = np.asarray(cur, float).copy()
    cap = np.array([8.0, 1e9 if capacity is None else float(capacity), 4000.0, 4000.0])
    obs = kit.obs(vms, usage, cap, signal=sig, controls=ctl, age=age)
    amount = np.full((n, N_RES), NAN)
    if want is not None:
        amount[:, MEMORY] = want
    if cpu is not None:
        amount[:, CPU] = cpu
    if disk is not None:
        amount[:, DISK] = disk
    return Allocation(amount=amount, caps=np.zeros(N_RES, dtype=bool)), obs, cap


def floor_of(used, min_memory=0.0, size=np.inf):
    used = np.asarray(used, float)
    f = np.maximum.reduce([np.full_like(used, C.mem_floor_mib), np.broadcast_to(min_memory, used.shape),
                           used + np.maximum(C.mem_reserve_mib, C.mem_reserve_frac * used)])
    return np.minimum(f, size)


# -- balloon floors and ceilings ----------------------------------------------------------------


def test_target_never_below_used_plus_reserve(kit):
    alloc, obs, cap = setup(kit, [8000.0], [4000.0], [3000.0], want=[100.0])
    plan = Guard().plan(alloc, obs, cap)
    # used 3000 + max(128, 300) = 3300, and shrinking 700 is within one step (800)
    assert plan.controls.balloon[0] == pytest.approx(3300.0)


def test_target_never_below_absolute_floor(kit):
    alloc, obs, cap = setup(kit, [2048.0], [300.0], [10.0], want=[0.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] >= 256.0


def test_target_never_below_min_memory(kit):
    # size 2000: step 200, shrink band 100; min_guarantee 1850 binds before the step does
    alloc, obs, cap = setup(kit, [2000.0], [2000.0], [100.0], want=[100.0], min_memory=[1850.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(1850.0)


def test_target_never_above_max_memory(kit):
    alloc, obs, cap = setup(kit, [2048.0], [2000.0], [1990.0], want=[1e6], signal=[0.9])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(2048.0)


def test_sum_of_targets_fits_host_memory(kit):
    # three guests want 3000 each on a host with 6000 MiB; floors are 628 each
    alloc, obs, cap = setup(kit, [4000.0] * 3, [2000.0] * 3, [500.0] * 3, want=[3000.0] * 3, capacity=6000.0)
    plan = Guard().plan(alloc, obs, cap)
    b = plan.controls.balloon
    assert b.sum() <= 6000.0 + 1e-6
    assert np.all(b >= floor_of([500.0] * 3) - 1e-9)


def test_sum_over_capacity_from_current_state_is_brought_down(kit):
    # current balloons already exceed the host (an overcommitted start): the guard must fix it
    alloc, obs, cap = setup(kit, [4000.0] * 3, [4000.0] * 3, [500.0] * 3, want=[NAN] * 3, capacity=6000.0)
    alloc.amount[0, MEMORY] = 4000.0  # at least one resource decided, so the guard runs
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon.sum() <= 6000.0 + 1e-6
    assert np.all(plan.controls.balloon >= floor_of([500.0] * 3) - 1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**32 - 1), st.booleans())
def test_balloon_safety_properties(kit, n, seed, tight):
    rng = np.random.default_rng(seed)
    size = rng.uniform(512, 8192, n)
    cur = size * rng.uniform(0.1, 1.0, n)
    used = cur * rng.uniform(0.0, 1.0, n)
    minm = np.where(rng.uniform(size=n) < 0.3, rng.uniform(0, 1024, n), 0.0)
    want = np.where(rng.uniform(size=n) < 0.2, NAN, rng.uniform(0, 10000, n))
    sig = np.where(rng.uniform(size=n) < 0.3, rng.uniform(0, 1, n), 0.0)
    age = rng.integers(0, 3, n)
    floor = floor_of(used, minm, size)
    capacity = floor.sum() + rng.uniform(0, 1) * size.sum() if tight else 10 * size.sum()
    alloc, obs, cap = setup(kit, size, cur, used, want=want, signal=sig, age=age, min_memory=minm,
                            capacity=capacity)
    alloc.amount[0, MEMORY] = rng.uniform(0, 10000)  # never all-NaN
    want = alloc.amount[:, MEMORY]
    plan = Guard().plan(alloc, obs, cap)
    b = plan.controls.balloon
    # changes under 0.5 MiB are not actuated (below balloon granularity): allow that much
    tol = 0.5 + 1e-6
    assert np.all(b >= floor - tol), "balloon target below the floor"
    assert np.all(b <= size + tol), "balloon target above max memory"
    assert b.sum() <= capacity + tol * n, "sum of balloon targets above host memory"
    if not tight:
        step = C.mem_step_frac * size
        # shrink at most one step, and never from a VM that just appeared, unless its floor demands it
        assert np.all(b >= np.minimum(cur - step, size) - tol)
        new = age == 0
        assert np.all(b[new] >= np.minimum(cur[new], size[new]) - tol)
        starving = (sig > C.starving_signal) | (used >= C.starving_used * cur)
        # growth of a guest that is not starving is step-limited (no entitlement given to the guard)
        calm = ~starving
        grow_step = C.mem_grow_step_frac * size
        assert np.all(b[calm] <= np.maximum(cur[calm] + grow_step[calm], floor[calm]) + tol)
        # a starving guest gets what it asked for (within floor and max), in one period
        ask = np.clip(np.where(np.isnan(want), cur, want), floor, size)
        grow_frac = getattr(C, "mem_grow_deadband_frac", C.mem_deadband_frac)
        grow = starving & (ask > cur) & (age > 0) & (ask - cur >= np.maximum(C.mem_deadband_mib, grow_frac * size))
        np.testing.assert_allclose(b[grow], ask[grow], atol=tol)
    changed = plan.changed["balloon"]
    np.testing.assert_array_equal(changed, np.abs(b - cur) > 0.5)


@pytest.mark.parametrize("want", [NAN, 500.0, 1000.0])
def test_unknown_usage_neither_reclaims_nor_inflates(kit, want):
    # no agent, no balloon stats: the guard cannot know the floor, so it keeps what the guest has
    alloc, obs, cap = setup(kit, [4000.0, 4000.0], [1000.0, 1000.0], [NAN, 500.0], want=[want, 900.0])
    for _ in range(3):  # period after period: the target must not creep up by a reserve each time
        plan = Guard().plan(alloc, obs, cap)
        assert plan.controls.balloon[0] == 1000.0
        assert not plan.changed["balloon"][0]
        obs.controls = plan.controls


# -- step limits and dead-band -------------------------------------------------------------------


def test_shrink_limited_to_one_step_per_period(kit):
    alloc, obs, cap = setup(kit, [8000.0], [4000.0], [500.0], want=[1000.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(4000.0 - C.mem_step_frac * 8000.0)


def test_growth_of_calm_guest_is_step_limited(kit):
    alloc, obs, cap = setup(kit, [8000.0], [1000.0], [600.0], want=[4000.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(1000.0 + C.mem_grow_step_frac * 8000.0)


def test_growth_of_starving_guest_by_signal_is_not_step_limited(kit):
    alloc, obs, cap = setup(kit, [8000.0], [1000.0], [600.0], want=[4000.0], signal=[0.5])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(4000.0)


def test_growth_of_starving_guest_by_usage_is_not_step_limited(kit):
    alloc, obs, cap = setup(kit, [8000.0], [1000.0], [990.0], want=[4000.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(4000.0)


@pytest.mark.parametrize("want", [3700.0, 3990.0, 4000.0 + 63.0])
def test_deadband_skips_small_changes(kit, want):
    # shrinking band = max(64, 5% of 8000 = 400); any band is at least 64 MiB
    alloc, obs, cap = setup(kit, [8000.0], [4000.0], [1000.0], want=[want])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == 4000.0
    assert not plan.changed["balloon"][0]


def test_change_beyond_deadband_is_applied(kit):
    alloc, obs, cap = setup(kit, [8000.0], [4000.0], [1000.0], want=[3300.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == pytest.approx(3300.0)
    assert plan.changed["balloon"][0]


def test_new_vm_is_never_reclaimed_from(kit):
    alloc, obs, cap = setup(kit, [8000.0, 8000.0], [4000.0, 4000.0], [500.0, 500.0],
                            want=[1000.0, 1000.0], age=[0, 3])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] >= 4000.0
    assert plan.controls.balloon[1] < 4000.0


def test_floor_above_current_raises_target_even_in_deadband(kit):
    # used grew to 3950 of a 4000 balloon: floor 4345 > current, so the guard must raise it
    alloc, obs, cap = setup(kit, [8000.0], [4000.0], [3950.0], want=[4000.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] >= 3950.0 + 395.0 - 1e-9


# -- CPU shares, quota, blkio ------------------------------------------------------------------


def test_shares_proportional_to_cpu_allocation(kit):
    cpu = np.array([0.5, 2.0, 3.0, 8.0])
    alloc, obs, cap = setup(kit, [2048.0] * 4, [2048.0] * 4, [100.0] * 4, cpu=cpu)
    plan = Guard().plan(alloc, obs, cap)
    s = plan.controls.shares
    assert plan.changed["shares"].all()
    np.testing.assert_allclose(s / s.sum(), cpu / cpu.sum(), rtol=2e-3)
    np.testing.assert_allclose(s, cpu * 1024.0, atol=0.5)  # cgroup v1 scale: 1024 per core


def test_shares_never_below_the_entitlement(kit):
    # VM 0 is forecast idle (0.1 core) but entitled to 2 cores; VM 1 is forecast to want 6
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2, cpu=[0.1, 6.0])
    ent = np.full((2, N_RES), NAN)
    ent[:, CPU] = [2.0, 2.0]
    plan = Guard().plan(alloc, obs, cap, ent)
    np.testing.assert_allclose(plan.controls.shares, [2048.0, 6144.0])
    # without an entitlement (direct guard use) the allocation alone sets them
    np.testing.assert_allclose(Guard().plan(alloc, obs, cap).controls.shares, [102.0, 6144.0])


def test_shares_clipped_to_kernel_range(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2, cpu=[0.0, 1e6])
    plan = Guard().plan(alloc, obs, cap)
    np.testing.assert_array_equal(plan.controls.shares, [2.0, 262144.0])


def test_shares_deadband(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2, cpu=[1.05, 1.5])
    plan = Guard().plan(alloc, obs, cap)
    # 1075 is within 10% of the default 1024: left alone; 1536 is not
    np.testing.assert_array_equal(plan.controls.shares, [1024.0, 1536.0])
    np.testing.assert_array_equal(plan.changed["shares"], [False, True])


def test_quota_when_cpu_is_capped(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2, cpu=[0.5, 5.0], vcpus=[2, 2])
    alloc.caps[CPU] = True
    plan = Guard().plan(alloc, obs, cap)
    np.testing.assert_allclose(plan.controls.quota, [0.5, 2.0])  # never more than its vCPUs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(-10, 1e7, allow_subnormal=False), st.just(NAN)), min_size=1, max_size=10))
def test_blkio_weights_within_kernel_range(kit, disk):
    disk = np.array(disk)
    w = blkio_weights(disk)
    ok = ~np.isnan(w)
    assert np.all((w[ok] >= 10.0) & (w[ok] <= 1000.0))
    n = disk.size
    alloc, obs, cap = setup(kit, [2048.0] * n, [2048.0] * n, [100.0] * n, disk=disk)
    plan = Guard().plan(alloc, obs, cap)
    b = plan.controls.blkio
    assert np.all((b >= 10.0) & (b <= 1000.0))
    # NaN allocation: weight left as it was
    assert np.all(b[np.isnan(disk)] == obs.controls.blkio[np.isnan(disk)])


def test_blkio_weights_proportional():
    w = blkio_weights(np.array([100.0, 200.0, 400.0]))
    # largest 400 -> scale 512: 1000 * x / 512
    np.testing.assert_allclose(w, np.round(1000.0 * np.array([100.0, 200.0, 400.0]) / 512.0))
    assert w[2] == pytest.approx(2 * w[1], abs=1) and w[1] == pytest.approx(2 * w[0], abs=1)


# -- NaN = no change ------------------------------------------------------------------------


def test_all_nan_allocation_changes_nothing(kit):
    alloc, obs, cap = setup(kit, [4096.0] * 3, [3000.0, 2000.0, 1000.0], [500.0, 500.0, 500.0])
    before = obs.controls.copy()
    plan = Guard().plan(alloc, obs, cap)
    assert plan.empty
    assert not any(v.any() for v in plan.changed.values())
    for name in ("shares", "quota", "balloon", "blkio", "netcap", "pins"):
        np.testing.assert_array_equal(getattr(plan.controls, name), getattr(before, name))
    # the observation's controls are not mutated
    np.testing.assert_array_equal(obs.controls.balloon, before.balloon)


def test_nan_row_leaves_that_vm_alone(kit):
    alloc, obs, cap = setup(kit, [8000.0, 8000.0], [4000.0, 4000.0], [500.0, 500.0],
                            want=[NAN, 3000.0], cpu=[NAN, 3.0])
    plan = Guard().plan(alloc, obs, cap)
    assert plan.controls.balloon[0] == 4000.0 and not plan.changed["balloon"][0]
    assert plan.controls.shares[0] == 1024.0 and not plan.changed["shares"][0]
    assert plan.controls.balloon[1] == pytest.approx(3200.0)  # one step down
    assert plan.controls.shares[1] == 3072.0


def test_pins_none_leaves_pins(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2)
    plan = Guard().plan(alloc, obs, cap)
    np.testing.assert_array_equal(plan.controls.pins, obs.controls.pins)
    assert not plan.changed["pin"].any()


def test_pin_changes_reported(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2)
    pins = np.array([0, 1, 1, 0])  # 2 VMs x 2 vCPUs
    plan = Guard().plan(alloc.with_pins(pins), obs, cap)
    np.testing.assert_array_equal(plan.controls.pins, pins)
    assert plan.changed["pin"].all()  # every vCPU was floating before


def test_guard_config_rejects_bad_values():
    with pytest.raises(ValueError):
        Guard(GuardConfig(mem_step_frac=1.5))
    with pytest.raises(ValueError):
        Guard(GuardConfig(mem_floor_mib=-1.0))
    with pytest.raises(ValueError):
        Guard(GuardConfig(mem_reserve_mib=float("nan")))


def test_netcap_only_when_capped(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [2048.0] * 2, [100.0] * 2)
    alloc.amount[:, NET] = [10.0, 500.0]
    plan = Guard().plan(alloc, obs, cap)
    assert np.isnan(plan.controls.netcap).all()  # weights only: no cap
    alloc.caps[NET] = True
    plan = Guard().plan(alloc, obs, cap)
    np.testing.assert_allclose(plan.controls.netcap, [C.net_min_kibs, 500.0])


# -- claims the host cannot confirm (a lying agent), floors over host memory ----------------------


def test_unconfirmed_starving_claim_cannot_grab_memory_from_honest_guests(kit):
    # VM 0's agent claims 2000 MiB used and heavy pressure while the host cannot back it;
    # VMs 1 and 2 are honest. Host memory 3000: each is entitled to 1000.
    alloc, obs, cap = setup(kit, [2048.0] * 3, [800.0, 1000.0, 1000.0], [2000.0, 700.0, 500.0],
                            want=[2048.0, 900.0, 700.0], signal=[0.9, 0.0, 0.0], capacity=3000.0)
    obs.confirmed = np.array([False, True, True])
    ent = np.zeros((3, N_RES))
    ent[:, MEMORY] = 1000.0
    b = Guard().plan(alloc, obs, cap, ent).controls.balloon
    assert b[0] <= 800.0 + C.mem_grow_step_frac * 2048.0 + 1e-6, "an unconfirmed claim grows one step at most"
    want = np.array([900.0, 700.0])
    assert np.all(b[1:] >= np.minimum(want, 1000.0) - 1e-6), "honest guests keep min(demand, entitlement)"
    assert b.sum() <= 3000.0 + 1e-6
    # the same figures, backed by the host: a starving guest grows at once
    obs.confirmed = np.array([True, True, True])
    assert Guard().plan(alloc, obs, cap, ent).controls.balloon[0] > b[0]


def test_unconfirmed_claim_protects_but_does_not_raise_the_floor(kit):
    alloc, obs, cap = setup(kit, [4096.0], [1000.0], [3000.0], want=[0.0])
    obs.confirmed = np.array([False])
    guard = Guard()
    np.testing.assert_allclose(guard.memory_floor(obs), [1000.0])  # what it has, not 3000 + reserve
    assert guard.plan(alloc, obs, cap).controls.balloon[0] == pytest.approx(1000.0)


def test_floors_over_host_memory_hold_growth_and_warn_once(kit):
    # both guests use 900 of 1000: floors 1028 each, 2056 > 2000 MiB of host memory
    alloc, obs, cap = setup(kit, [2048.0] * 2, [1000.0, 1000.0], [900.0, 900.0], want=[1500.0, 1500.0],
                            capacity=2000.0)
    guard = Guard()
    for _ in range(3):
        plan = guard.plan(alloc, obs, cap)
        assert plan.controls.balloon.sum() <= 2000.0 + 1e-6, "targets past the host reserve were sent"
        np.testing.assert_allclose(plan.controls.balloon, [1000.0, 1000.0])  # held
    assert len(guard.warnings) == 1 and "holding memory growth" in guard.warnings[0]


def test_floors_over_host_memory_scale_growth_into_the_room_left(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 2, [900.0, 1000.0], [900.0, 900.0], want=[1500.0, 1500.0],
                            capacity=2000.0)
    b = Guard().plan(alloc, obs, cap).controls.balloon
    assert b.sum() == pytest.approx(2000.0)
    assert b[0] > 900.0 and b[1] >= 1000.0  # growth scaled, nobody shrunk for it


# -- a per-VM memory limit goes through the floors, first sight and the step limit -----------------


def limited(kit, limit, hw, cur, used, want, age=None):
    alloc, obs, cap = setup(kit, [limit], [cur], [used], want=[want], age=age)
    obs.vms = replace(obs.vms, balloon_max=np.array([hw]))
    return alloc, obs, cap


def test_limit_below_use_keeps_the_floor_first_sight_and_step(kit):
    # max_memory_mib = 64 for a guest using 81 of its 1024: the floor (256) wins over the limit
    alloc, obs, cap = limited(kit, 64.0, 1024.0, 1024.0, 81.0, 64.0, age=[0])
    guard = Guard()
    seen = []
    for period in range(12):
        plan = guard.plan(alloc, obs, cap)
        b = plan.controls.balloon[0]
        if period == 0:
            assert b == pytest.approx(1024.0), "reclaimed from a VM seen for the first time"
        assert b >= 256.0 - 1e-6, "below the floor"
        assert b >= obs.controls.balloon[0] - C.mem_step_frac * 1024.0 - 1e-6, "faster than the step limit"
        seen.append(b)
        obs.controls = plan.controls
        obs.age = obs.age + 1
    assert seen[-1] == pytest.approx(256.0)
    assert sum("memory limit 64 MiB is below its floor 256 MiB" in w for w in guard.warnings) == 1


def test_limit_above_the_floor_caps_growth(kit):
    alloc, obs, cap = limited(kit, 700.0, 1024.0, 600.0, 400.0, 4000.0)
    assert Guard().plan(alloc, obs, cap).controls.balloon[0] == pytest.approx(700.0)


# -- the physical profile: only what the host enforces (the peers' guard) ------------------------


def test_unknown_profile_says_which_exist():
    with pytest.raises(ValueError, match="rescoin, physical"):
        Guard(profile="nope")


def test_physical_has_no_step_limit_no_deadband_no_used_floor(kit):
    # want 300 from 8000 with 3000 used: rescoin's guard holds the used+reserve floor and one step;
    # the physical profile goes straight there (above the absolute floor)
    alloc, obs, cap = setup(kit, [8000.0, 8000.0], [8000.0, 4000.0], [3000.0, 0.0], want=[300.0, 4010.0])
    plan = Guard(profile="physical").plan(alloc, obs, cap)
    np.testing.assert_allclose(plan.controls.balloon, [300.0, 4010.0])
    assert plan.changed["balloon"].tolist() == [True, True]  # a 10 MiB move is a change (no dead-band)
    rescoin = Guard().plan(alloc, obs, cap)
    assert rescoin.controls.balloon[0] > 300.0 and not rescoin.changed["balloon"][1]


def test_physical_targets_within_floor_and_maximum(kit):
    alloc, obs, cap = setup(kit, [2048.0, 2048.0, 2048.0], [2048.0] * 3, [0.0] * 3, want=[10.0, 5000.0, 800.0],
                            min_memory=[0.0, 0.0, 1000.0])
    plan = Guard(profile="physical").plan(alloc, obs, cap)
    np.testing.assert_allclose(plan.controls.balloon, [C.mem_floor_mib, 2048.0, 1000.0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**32 - 1), st.floats(0.2, 2.0))
def test_physical_sum_within_host_memory_and_floors_kept(n, seed, room):
    from tests.conftest import make_obs, make_vms  # the kit fixture is function-scoped

    rng = np.random.default_rng(seed)
    size = rng.uniform(512, 8192, n)
    sizes = np.column_stack([np.full(n, 2.0), size, np.full(n, 1000.0), np.full(n, 1000.0)])
    vms = make_vms(n, sizes=sizes)
    ctl = Controls.defaults(vms)
    ctl.balloon = size * rng.uniform(0.1, 1.0, n)
    capacity = max(room * size.sum(), 1.0)
    cap = np.array([8.0, capacity, 4000.0, 4000.0])
    obs = make_obs(vms, np.zeros((n, N_RES)), cap, controls=ctl, age=np.ones(n, dtype=int))
    amount = np.full((n, N_RES), NAN)
    amount[:, MEMORY] = size * rng.uniform(0.0, 1.5, n)
    plan = Guard(profile="physical").plan(Allocation(amount=amount, caps=np.zeros(N_RES, bool)), obs, cap)
    target = plan.controls.balloon
    floor = np.minimum(C.mem_floor_mib, size)
    assert np.all(target >= floor - 1e-6) and np.all(target <= size + 1e-6)
    if floor.sum() <= capacity:
        assert target.sum() <= capacity + 1e-6
    else:
        np.testing.assert_allclose(target, floor)


def test_physical_shares_follow_the_allocation_not_the_entitlement(kit):
    alloc, obs, cap = setup(kit, [2048.0, 2048.0], [2048.0] * 2, [0.0, 0.0], cpu=[0.1, 3.0])
    ent = np.tile([2.0, 2048.0, 1000.0, 1000.0], (2, 1))
    phys = Guard(profile="physical").plan(alloc, obs, cap, ent)
    np.testing.assert_array_equal(phys.controls.shares, [102.0, 3072.0])  # round(alloc * 1024)
    assert Guard().plan(alloc, obs, cap, ent).controls.shares[0] == 2048.0  # rescoin's: the entitlement's


def test_physical_shares_clipped_to_kernel_range_and_changed_when_different(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 3, [2048.0] * 3, [0.0] * 3, cpu=[0.0, 1000.0, 1.01])
    plan = Guard(profile="physical").plan(alloc, obs, cap)
    np.testing.assert_array_equal(plan.controls.shares, [2.0, 262144.0, 1034.0])
    assert plan.changed["shares"].all()  # 1024 -> 1034 is under rescoin's 10% band, still a change
    assert not Guard().plan(alloc, obs, cap).changed["shares"][2]


def test_physical_blkio_within_kernel_range(kit):
    alloc, obs, cap = setup(kit, [2048.0] * 3, [2048.0] * 3, [0.0] * 3, disk=[0.0, 300.0, 1024.0])
    plan = Guard(profile="physical").plan(alloc, obs, cap)
    assert plan.controls.blkio.min() >= 10.0 and plan.controls.blkio.max() <= 1000.0
    assert plan.controls.blkio[0] == 10.0


def test_blkio_weights_of_absurd_sizes_stay_in_range_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = blkio_weights(np.array([1e308, 1.7e308, -1e308, 5e-324, np.inf, NAN]))
    assert np.all((w[:5] >= 10.0) & (w[:5] <= 1000.0)) and np.isnan(w[5])
    assert w[1] == 1000.0 and w[2] == 10.0
