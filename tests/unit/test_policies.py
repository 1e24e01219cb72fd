"""Allocation policies, entitlement, DRF, the seeds' memory rules and vCPU placement."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.history import History
from rescoin.core.model import Forecast
from rescoin.core.placement import (
    BalancePlacement,
    KvmSchedulingPlacement,
    VmBalancerPlacement,
    group_load,
    make_placement,
)
from rescoin.core.policies import entitlement
from rescoin.core.policies.peers import MomPolicy, drf_fill
from rescoin.core.registry import POLICIES, build, make_policy
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET

NAN = np.nan

#: columns each policy must fill (when the host manages them); the rest it leaves to the hypervisor
FILLS = {
    "rescoin": (CPU, MEMORY, DISK, NET),
    "rescoin-paper": (CPU, MEMORY, DISK, NET),
    "static": (CPU, MEMORY),  # disk and net stay at the hypervisor defaults
    "none": (),  # a host without any manager sets nothing
    "drf": (CPU, MEMORY, DISK, NET),
    "oracle": (CPU, MEMORY, DISK, NET),
    "mom": (CPU, MEMORY),
    "vm-balancer": (MEMORY,),
    "kvmscheduling": (MEMORY,),
}
#: policies that own the whole split of every resource: their sum never exceeds capacity
WHOLE_SPLIT = ("rescoin", "rescoin-paper", "static", "drf", "oracle")


def test_every_policy_has_a_column_rule():
    assert set(FILLS) == set(POLICIES)


def test_make_policy_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        make_policy("nope")
    for name in POLICIES:
        assert name in str(e.value)


@pytest.mark.parametrize("name", list(POLICIES))
def test_make_policy_returns_fresh_named_policy(name):
    a, b = make_policy(name), make_policy(name)
    assert a.name == name
    assert a is not b


# -- generic invariants ------------------------------------------------------------------------


@st.composite
def scenarios(draw, n=None):
    n = draw(st.integers(1, 6)) if n is None else n
    periods = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sizes = np.column_stack([
        rng.integers(1, 5, n).astype(float),
        rng.uniform(256, 4096, n),
        rng.uniform(100, 1000, n),
        rng.uniform(100, 1000, n),
    ])
    overcommit = draw(st.floats(0.5, 3.0))
    cap = sizes.sum(axis=0) / overcommit
    cap[CPU] = max(1.0, round(cap[CPU]))
    for r in (DISK, NET):
        if draw(st.booleans()):
            cap[r] = NAN
            sizes[:, r] = NAN
    if draw(st.booleans()):
        cap[MEMORY] = NAN
        sizes[:, MEMORY] = NAN
    mode = draw(st.sampled_from(["random", "zero", "entitled"]))
    ent = entitlement(sizes, np.ones(n), cap)
    usages = []
    for _ in range(periods):
        if mode == "zero":
            u = np.zeros((n, N_RES))
        elif mode == "entitled":
            u = np.nan_to_num(ent, nan=0.0)  # no VM earns or spends coins: every credit is zero
        else:
            u = rng.uniform(0.0, 1.3, (n, N_RES)) * np.nan_to_num(sizes, nan=100.0)
        u[:, np.isnan(cap)] = NAN
        usages.append(u)
    signals = [rng.uniform(0, 1, (n, N_RES)) * (rng.uniform(size=(n, N_RES)) < 0.3) for _ in range(periods)]
    balloon = np.nan_to_num(sizes[:, MEMORY], nan=1024.0) * rng.uniform(0.3, 1.0, n)
    if draw(st.booleans()) and np.isfinite(cap[MEMORY]) and balloon.sum() > cap[MEMORY]:
        balloon *= cap[MEMORY] / balloon.sum()  # a feasible state: the balloons fit the host
    truth_next = rng.uniform(0.0, 1.5, (n, N_RES)) * np.nan_to_num(sizes, nan=100.0)
    if mode == "zero":
        truth_next[:] = 0.0
    return dict(sizes=sizes, cap=cap, usages=usages, signals=signals, balloon=balloon, truth_next=truth_next)


def make_input(kit, policy, sc):
    vms = kit.vms(sc["sizes"].shape[0], sizes=sc["sizes"])
    return kit.input(vms, sc["usages"], sc["cap"], signals=sc["signals"], predictor=build(policy.name).predictor,
                     truth_next=sc["truth_next"], balloon=sc["balloon"])


def run_policy_once(kit, name, sc):
    policy = make_policy(name)
    inp = make_input(kit, policy, sc)
    return inp, policy.allocate(inp)


def check_invariants(name, inp, alloc):
    cap = inp.capacity
    a = alloc.amount
    n = inp.n
    assert a.shape == (n, N_RES)
    managed = ~np.isnan(cap)
    assert np.isnan(a[:, ~managed]).all(), "unmanaged resources must be left alone (NaN)"
    for r in FILLS[name]:
        if managed[r]:
            assert not np.isnan(a[:, r]).any(), f"NaN in managed column {r}"
    vals = a[~np.isnan(a)]
    assert np.all(vals >= -1e-9), "negative allocation"
    assert np.all(np.isfinite(vals))
    cur_balloon = inp.obs.controls.balloon
    for r in np.flatnonzero(managed):
        col = a[:, r]
        if np.isnan(col).all():
            continue
        eps = 1e-9 * max(1.0, cap[r]) + 1e-9
        if name in WHOLE_SPLIT or r == CPU:
            assert np.nansum(col) <= cap[r] + eps, f"{name}: sum of resource {r} above capacity"
        elif r == MEMORY and cur_balloon.sum() <= cap[r]:
            # reactive balloon rules: from a feasible state they never make it infeasible
            assert np.nansum(col) <= cap[r] + eps, f"{name}: balloon targets above host memory"


@pytest.mark.parametrize("name", list(POLICIES))
@settings(max_examples=50, deadline=None)
@given(sc=scenarios())
def test_policy_invariants(kit, name, sc):
    inp, alloc = run_policy_once(kit, name, sc)
    check_invariants(name, inp, alloc)
    if name == "rescoin":
        floor = np.minimum(inp.estimate(), inp.entitlement)
        live = ~np.isnan(inp.capacity)
        assert np.all(alloc.amount[:, live] >= floor[:, live] - 1e-9 * (1 + np.abs(floor[:, live])))


@pytest.mark.parametrize("name", list(POLICIES))
@settings(max_examples=25, deadline=None)
@given(sc=scenarios())
def test_policy_is_pure_and_blind_to_truth(kit, name, sc):
    """A policy reads a snapshot and changes nothing; only the oracle may look at true demand."""
    policy = make_policy(name)
    inp = make_input(kit, policy, sc)
    hist_before = {k: np.array(v, copy=True) for k, v in inp.history.snapshot().items()}
    obs_before = {k: np.array(getattr(inp.obs, k), copy=True) for k in ("usage", "signal", "age")}
    ctl_before = inp.obs.controls.copy()
    ent_before = inp.entitlement.copy()
    fc_before = None if inp.forecast is None else inp.forecast.value.copy()
    a = policy.allocate(inp).amount
    for k, v in inp.history.snapshot().items():
        np.testing.assert_array_equal(v, hist_before[k], err_msg=f"history {k} changed")
    for k, v in obs_before.items():
        np.testing.assert_array_equal(getattr(inp.obs, k), v, err_msg=f"obs.{k} changed")
    for k in ("shares", "quota", "balloon", "blkio", "netcap", "pins"):
        np.testing.assert_array_equal(getattr(inp.obs.controls, k), getattr(ctl_before, k))
    np.testing.assert_array_equal(inp.entitlement, ent_before)
    if fc_before is not None:
        np.testing.assert_array_equal(inp.forecast.value, fc_before)
    if not policy.needs_truth:
        blind = replace(inp, obs=replace(inp.obs, truth=inp.obs.truth * 7 + 1, truth_next=inp.obs.truth_next * 3 + 5))
        np.testing.assert_array_equal(make_policy(name).allocate(blind).amount, a)
    else:
        assert name == "oracle"


@pytest.mark.parametrize("name", list(POLICIES))
@settings(max_examples=15, deadline=None)
@given(sc=scenarios(n=1))
def test_policy_single_vm(kit, name, sc):
    inp, alloc = run_policy_once(kit, name, sc)
    check_invariants(name, inp, alloc)


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_all_demand_zero_all_managed(kit, name):
    n = 4
    sizes = np.tile([2.0, 2048.0, 500.0, 500.0], (n, 1))
    cap = np.array([4.0, 4096.0, 1000.0, 1000.0])
    sc = dict(sizes=sizes, cap=cap, usages=[np.zeros((n, N_RES))] * 3, signals=None,
              balloon=np.full(n, 1024.0), truth_next=np.zeros((n, N_RES)))
    inp, alloc = run_policy_once(kit, name, sc)
    check_invariants(name, inp, alloc)


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_with_2000_vms(kit, name):
    rng = np.random.default_rng(7)
    n = 2048
    sizes = np.column_stack([rng.integers(1, 9, n).astype(float), rng.uniform(512, 8192, n),
                             rng.uniform(100, 5000, n), rng.uniform(100, 5000, n)])
    cap = sizes.sum(axis=0) / 1.5
    cap[CPU] = round(cap[CPU])
    usages = [rng.uniform(0, 1.2, (n, N_RES)) * sizes for _ in range(3)]
    sc = dict(sizes=sizes, cap=cap, usages=usages, signals=None, balloon=sizes[:, MEMORY] * 0.5,
              truth_next=rng.uniform(0, 1.2, (n, N_RES)) * sizes)
    inp, alloc = run_policy_once(kit, name, sc)
    check_invariants(name, inp, alloc)


def test_oracle_without_truth_is_a_clear_error(kit):
    vms = kit.vms(2)
    inp = kit.input(vms, [np.ones((2, N_RES))], [2.0, 4096.0, 2000.0, 2000.0], predictor="none")
    obs = replace(inp.obs, truth=None, truth_next=None)
    with pytest.raises(ValueError, match="oracle"):
        make_policy("oracle").allocate(replace(inp, obs=obs))


# -- entitlement ------------------------------------------------------------------------------


def test_entitlement_is_size_when_it_fits():
    sizes = np.array([[2.0, 1024.0, NAN, NAN], [4.0, 2048.0, NAN, NAN]])
    cap = np.array([8.0, 4096.0, NAN, NAN])
    ent = entitlement(sizes, np.ones(2), cap)
    np.testing.assert_allclose(ent[:, :2], sizes[:, :2])
    assert np.isnan(ent[:, 2:]).all()  # unmanaged resources


def test_entitlement_scales_down_when_sizes_exceed_capacity():
    sizes = np.array([[2.0, 1024.0, 100.0, 100.0], [4.0, 3072.0, 300.0, 100.0]])
    cap = np.array([3.0, 2048.0, 800.0, 100.0])
    ent = entitlement(sizes, np.ones(2), cap)
    np.testing.assert_allclose(ent[:, CPU], [1.0, 2.0])
    np.testing.assert_allclose(ent[:, MEMORY], [512.0, 1536.0])
    np.testing.assert_allclose(ent[:, DISK], [100.0, 300.0])  # fits: unchanged
    np.testing.assert_allclose(ent[:, NET], [50.0, 50.0])


def test_entitlement_times_weight():
    sizes = np.array([[2.0, NAN, NAN, NAN], [2.0, NAN, NAN, NAN], [2.0, NAN, NAN, NAN]])
    w = np.array([2.0, 1.0, 1.0])
    cap = np.array([4.0, NAN, NAN, NAN])
    ent = entitlement(sizes, w, cap)
    # weighted sizes 4, 2, 2 (sum 8) scaled to 4: 2, 1, 1
    np.testing.assert_allclose(ent[:, CPU], [2.0, 1.0, 1.0])


def test_entitlement_missing_size_is_zero():
    sizes = np.array([[2.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]])
    ent = entitlement(sizes, np.ones(2), np.array([4.0, NAN, NAN, NAN]))
    np.testing.assert_allclose(ent[:, CPU], [2.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**32 - 1), st.floats(0.2, 5.0))
def test_entitlement_properties(n, seed, over):
    rng = np.random.default_rng(seed)
    sizes = rng.uniform(0.5, 10, (n, N_RES))
    w = rng.uniform(0.1, 3, n)
    cap = (sizes * w[:, None]).sum(axis=0) / over
    ent = entitlement(sizes, w, cap)
    assert np.all(ent.sum(axis=0) <= cap * (1 + 1e-9))
    # proportional to size x weight, within each resource
    want = sizes * w[:, None]
    np.testing.assert_allclose(ent / ent.sum(axis=0), want / want.sum(axis=0), rtol=1e-9)
    if over <= 1:
        np.testing.assert_allclose(ent, want, rtol=1e-12)


# -- rescoin -----------------------------------------------------------------------------------

CPU_ONLY = np.array([10.0, NAN, NAN, NAN])


def cpu_input(kit, sizes, est, usages, cap=CPU_ONLY):
    """A PolicyInput on a CPU-only host with a given forecast and usage history."""
    n = len(sizes)
    s = np.full((n, N_RES), NAN)
    s[:, CPU] = sizes
    vms = kit.vms(n, sizes=s)
    us = []
    for u in usages:
        a = np.full((n, N_RES), NAN)
        a[:, CPU] = u
        us.append(a)
    inp = kit.input(vms, us, cap, predictor="none")
    e = np.full((n, N_RES), NAN)
    e[:, CPU] = est
    return replace(inp, forecast=Forecast(point=e, value=e))


def test_rescoin_no_contention_gives_forecast_plus_share_of_the_rest(kit):
    # sizes 4, 4, 4 on 10 cores: tc = 10/3 each; every forecast below it and the sum below 10
    est = np.array([1.0, 1.5, 0.5])
    inp = cpu_input(kit, [4.0, 4.0, 4.0], est, [est] * 3)
    got = make_policy("rescoin").allocate(inp).amount[:, CPU]
    assert np.all(got >= est - 1e-12)  # at least the forecast
    assert got.sum() == pytest.approx(10.0)  # work-conserving: what is left is handed out
    assert np.all(got <= 4.0 + 1e-9)  # never more than a VM's vCPUs
    assert got[1] >= got[0] >= got[2]  # equal entitlements: more forecast never means less


def test_rescoin_no_contention_equal_vms_split_evenly(kit):
    inp = cpu_input(kit, [4.0, 4.0, 4.0], [1.0, 1.0, 1.0], [[1.0, 1.0, 1.0]] * 3)
    got = make_policy("rescoin").allocate(inp).amount[:, CPU]
    np.testing.assert_allclose(got, [10.0 / 3] * 3)


def test_rescoin_leftover_in_proportion_to_entitlement(kit):
    # sizes 1, 3 on 8 cores fit: tc = 1, 3; forecasts 0.5, 0.5 -> 7 left split 1:3,
    # but nobody is handed more than its vCPUs can use
    inp = cpu_input(kit, [1.0, 3.0], [0.5, 0.5], [[0.5, 0.5]] * 2, cap=np.array([8.0, NAN, NAN, NAN]))
    got = make_policy("rescoin").allocate(inp).amount[:, CPU]
    assert got[0] >= 0.5 and got[1] >= 0.5
    assert got[0] <= 1.0 + 1e-9 and got[1] <= 3.0 + 1e-9
    assert (got[1] - 0.5) >= 3 * (got[0] - 0.5) - 1e-9 or got[0] == pytest.approx(1.0)


def test_rescoin_contention_no_coins_weights_excess_by_entitlement(kit):
    # sizes 4,4,4 on 10 cores: tc = 10/3 each; est 2, 6, 6 -> base 2, 10/3, 10/3
    # excess room 10 - 26/3 = 4/3 split equally between the two wanting more
    tc = 10.0 / 3
    inp = cpu_input(kit, [4.0, 4.0, 4.0], [2.0, 6.0, 6.0], [[tc, tc, tc]] * 3)
    got = make_policy("rescoin").allocate(inp).amount[:, CPU]
    np.testing.assert_allclose(got, [2.0, tc + 2.0 / 3, tc + 2.0 / 3])


def test_rescoin_contention_coins_go_to_the_saver(kit):
    # VM1 used 1 < tc (earned coins), VM2 used 5 > tc (spent coins): the excess goes to VM1
    tc = 10.0 / 3
    inp = cpu_input(kit, [8.0, 8.0, 8.0], [2.0, 6.0, 6.0], [[2.0, 1.0, 5.0]] * 3)
    got = make_policy("rescoin-coins").allocate(inp).amount[:, CPU]  # the prototype's: all of it
    room = 10.0 - (2.0 + 2 * tc)
    np.testing.assert_allclose(got, [2.0, tc + room, tc])
    saved = make_policy("rescoin").allocate(inp).amount[:, CPU]  # the default: more of it, not all
    assert saved[0] == pytest.approx(2.0) and saved.sum() == pytest.approx(10.0)
    assert saved[2] + 0.05 < saved[1] < tc + room and saved[2] > tc


def test_rescoin_never_below_sharing_incentive_under_heavy_contention(kit):
    tc = 10.0 / 4
    inp = cpu_input(kit, [4.0] * 4, [100.0, 100.0, 1.0, 100.0], [[0.0, 4.0, 4.0, 4.0]] * 3)
    got = make_policy("rescoin").allocate(inp).amount[:, CPU]
    assert got.sum() == pytest.approx(10.0)
    assert np.all(got >= np.minimum([100.0, 100.0, 1.0, 100.0], tc) - 1e-9)


def test_rescoin_paper_formula(kit):
    tc = 10.0 / 3
    used = np.array([2.0, 1.0, 5.0])
    inp = cpu_input(kit, [4.0, 4.0, 4.0], [2.0, 6.0, 6.0], [used] * 3)
    got = make_policy("rescoin-paper").allocate(inp).amount[:, CPU]
    # credits over the periods whose entitlement is known (all but the first)
    ac = np.maximum((tc - used) * 2 / 10.0, 0.0)
    wr = ac / ac.sum()
    base = np.minimum([2.0, 6.0, 6.0], tc)
    expect = base + wr * (10.0 - base.sum())
    np.testing.assert_allclose(got, expect)


def test_rescoin_paper_no_contention_allocates_forecast(kit):
    inp = cpu_input(kit, [2.0, 2.0, 2.0], [1.0, 2.0, 0.5], [[1.0, 1.0, 1.0]] * 2)
    got = make_policy("rescoin-paper").allocate(inp).amount[:, CPU]
    np.testing.assert_allclose(got, [1.0, 2.0, 0.5])


def test_static_gives_entitlement(kit):
    inp = cpu_input(kit, [4.0, 4.0, 2.0], [0.0, 9.0, 0.0], [[1.0, 1.0, 1.0]])
    got = make_policy("static").allocate(inp).amount[:, CPU]
    np.testing.assert_allclose(got, [4.0, 4.0, 2.0])


def test_oracle_is_weighted_max_min_of_next_demand(kit):
    n = 3
    s = np.full((n, N_RES), NAN)
    s[:, CPU] = [8.0, 8.0, 4.0]  # entitlements 4, 4, 2 on 10 cores
    vms = kit.vms(n, sizes=s)
    truth = np.full((n, N_RES), NAN)
    truth[:, CPU] = [8.0, 2.0, 4.0]
    inp = kit.input(vms, [np.zeros((n, N_RES))], CPU_ONLY, predictor="none", truth_next=truth)
    got = make_policy("oracle").allocate(inp).amount[:, CPU]
    # floors min(demand, entitlement) = 4, 2, 2; then the ratio rises for VM0 and VM2 alike:
    # 8x + 2 + 4x = 10 -> x = 2/3 -> 16/3, 2, 8/3
    np.testing.assert_allclose(got, [16 / 3, 2.0, 8 / 3])


# -- DRF ----------------------------------------------------------------------------------------


def test_drf_classic_example_equal_dominant_shares():
    # Ghodsi et al.: 9 CPUs, 18 GB; A's tasks need (1 CPU, 4 GB), B's (3 CPU, 1 GB).
    # Both want far more than the host: they end with equal dominant shares of 2/3.
    d = np.array([[1.0, 4.0], [3.0, 1.0]]) * 100
    cap = np.array([9.0, 18.0])
    got = drf_fill(d, np.ones(2), cap)
    np.testing.assert_allclose(got, [[3.0, 12.0], [6.0, 2.0]])
    dom = (got / cap).max(axis=1)
    np.testing.assert_allclose(dom, [2 / 3, 2 / 3])


def test_drf_met_demand_frees_room_for_others():
    got = drf_fill(np.array([[1.0, 1.0], [100.0, 100.0]]), np.ones(2), np.array([10.0, 10.0]))
    np.testing.assert_allclose(got, [[1.0, 1.0], [9.0, 9.0]])


def test_drf_bottleneck_freezes_only_its_users():
    # B's memory-only demand is met at 2; A and C rise together until CPU runs out (5 each)
    d = np.array([[100.0, 0.0], [0.0, 2.0], [100.0, 100.0]])
    got = drf_fill(d, np.ones(3), np.array([10.0, 10.0]))
    np.testing.assert_allclose(got, [[5.0, 0.0], [0.0, 2.0], [5.0, 5.0]])


def test_drf_weights():
    got = drf_fill(np.array([[100.0, 0.0], [100.0, 0.0]]), np.array([2.0, 1.0]), np.array([9.0, 10.0]))
    np.testing.assert_allclose(got, [[6.0, 0.0], [3.0, 0.0]])


def test_drf_zero_capacity_resource_is_not_handed_out():
    # a resource the host has none of: nobody may be allocated any of it
    d = np.array([[1.0, 2.0], [1.0, 0.0]])
    got = drf_fill(d, np.ones(2), np.array([0.0, 10.0]))
    assert got[:, 0].sum() <= 0.0 + 1e-12
    assert np.all(got <= d + 1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 7), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_drf_properties(n, k, seed):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0, 10, (n, k)) * (rng.uniform(size=(n, k)) < 0.8)
    cap = rng.uniform(1, 20, k)
    w = rng.uniform(0.2, 3, n)
    got = drf_fill(d, w, cap)
    eps = 1e-9 * max(1.0, cap.max())
    assert np.all(got >= -eps) and np.all(got <= d + eps)
    assert np.all(got.sum(axis=0) <= cap + eps)
    # each VM gets one fraction t of its whole demand vector
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(d > 0, got / np.where(d > 0, d, 1.0), -1.0).max(axis=1)
    t = np.where(t < 0, np.nan, t)
    for i in range(n):
        if (d[i] > 0).any():
            np.testing.assert_allclose(got[i], t[i] * d[i], atol=1e-9)
    dom = (d / cap).max(axis=1)
    level = np.where(dom > 0, np.nan_to_num(t) * dom / w, 0.0)
    saturated = got.sum(axis=0) >= cap - 1e-7 * cap
    for i in range(n):
        if dom[i] == 0 or t[i] >= 1 - 1e-9:
            continue
        # an unsatisfied VM is held by a saturated resource on which it has the highest level
        ok = False
        for r in np.flatnonzero(saturated & (d[i] > 0)):
            users = d[:, r] > 0
            if level[i] >= level[users].max() - 1e-7:
                ok = True
        assert ok, f"VM {i} unsatisfied without a bottleneck"


# -- MoM --------------------------------------------------------------------------------------

MEM_ONLY = np.array([NAN, 1000.0, NAN, NAN])


def mem_input(kit, size, cur, used, cap=MEM_ONLY, period=300.0):
    n = len(size)
    s = np.full((n, N_RES), NAN)
    s[:, MEMORY] = size
    u = np.full((n, N_RES), NAN)
    u[:, MEMORY] = used
    vms = kit.vms(n, sizes=s)
    return kit.input(vms, [u], cap, predictor="last", balloon=np.asarray(cur, float), period=period)


def test_mom_shrinks_by_at_most_5_percent_toward_used_plus_reserve(kit):
    # host free 1 - 850/1000 = 15% < 20%: shrink
    inp = mem_input(kit, [1000.0, 1000.0], [400.0, 450.0], [100.0, 400.0])
    got = MomPolicy().allocate(inp).amount[:, MEMORY]
    # VM0: toward 100/0.8 = 125, at most 5%: 380; VM1: 400/0.8 = 500 > 450: no shrink
    np.testing.assert_allclose(got, [380.0, 450.0])


def test_mom_shrink_stops_at_used_over_reserve(kit):
    inp = mem_input(kit, [1000.0, 1000.0], [400.0, 500.0], [376.0, 100.0])
    got = MomPolicy().allocate(inp).amount[:, MEMORY]
    # VM0: 376/0.8 = 470 > 380 would shrink only to ... 470 > 400: stays 400; VM1: 475
    np.testing.assert_allclose(got, [400.0, 475.0])
    inp = mem_input(kit, [1000.0, 1000.0], [400.0, 500.0], [312.0, 100.0])
    got = MomPolicy().allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [390.0, 475.0])  # 312 / 0.8 = 390, within the 5% step


def test_mom_grows_5_percent_when_host_has_room(kit):
    inp = mem_input(kit, [1000.0, 410.0], [300.0, 400.0], [100.0, 100.0])
    got = MomPolicy().allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [315.0, 410.0])  # 5% more, capped at max memory


def test_mom_skips_changes_under_a_quarter_percent(kit):
    inp = mem_input(kit, [300.5, 1000.0], [300.0, 400.0], [100.0, 100.0])
    got = MomPolicy().allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [300.0, 420.0])  # +0.5 < 0.25% of 300 = 0.75


def test_mom_cpu_equal_shares(kit):
    n = 4
    vms = kit.vms(n)
    inp = kit.input(vms, [np.ones((n, N_RES))], [6.0, 8192.0, NAN, NAN], predictor="last")
    got = MomPolicy().allocate(inp).amount
    np.testing.assert_allclose(got[:, CPU], 1.5)
    assert np.isnan(got[:, DISK]).all() and np.isnan(got[:, NET]).all()


# -- vm-balancer memory -------------------------------------------------------------------------


def test_vm_balancer_reclaims_half_above_256_and_feeds_starving(kit):
    cap = np.array([NAN, 4000.0, NAN, NAN])
    inp = mem_input(kit, [2000.0] * 3, [1000.0, 1000.0, 600.0], [200.0, 950.0, 500.0], cap, period=1.0)
    got = make_policy("vm-balancer").allocate(inp).amount[:, MEMORY]
    # VM0 usable 800: gives (800 - 256) / 2 = 272; VM1 (50) and VM2 (100) starve: +128 each
    np.testing.assert_allclose(got, [728.0, 1128.0, 728.0])


def test_vm_balancer_feeds_hungriest_first_and_stops_when_host_lacks(kit):
    cap = np.array([NAN, 2650.0, NAN, NAN])
    inp = mem_input(kit, [2000.0] * 3, [1000.0, 1000.0, 600.0], [200.0, 950.0, 500.0], cap, period=2.0)
    got = make_policy("vm-balancer").allocate(inp).amount[:, MEMORY]
    free = 2650.0 - 2600.0 + 272.0  # host free plus what VM0 returned
    assert got[0] == pytest.approx(728.0)
    assert got[1] == pytest.approx(1000.0 + 256.0)  # the hungriest (usable 50) is fed fully
    assert 600.0 <= got[2] <= 600.0 + (free - 256.0) + 1e-9
    assert got.sum() <= 2650.0 + 1e-9


def test_vm_balancer_feed_capped_at_max_memory(kit):
    cap = np.array([NAN, 8000.0, NAN, NAN])
    inp = mem_input(kit, [1050.0], [1000.0], [990.0], cap, period=1.0)
    got = make_policy("vm-balancer").allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [1050.0])


def test_vm_balancer_keeps_guest_with_little_usable(kit):
    cap = np.array([NAN, 8000.0, NAN, NAN])
    inp = mem_input(kit, [2000.0], [1000.0], [800.0], cap, period=1.0)  # usable 200: neither rule
    got = make_policy("vm-balancer").allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [1000.0])


# -- kvmscheduling memory -----------------------------------------------------------------------

KVM_CAP = np.array([NAN, 4000.0, NAN, NAN])


def test_kvmscheduling_halves_wasteful_and_gives_it_to_starved(kit):
    inp = mem_input(kit, [2000.0, 2000.0], [1000.0, 1000.0], [950.0, 200.0], KVM_CAP)
    got = make_policy("kvmscheduling").allocate(inp).amount[:, MEMORY]
    # VM1 available 800 (wasteful) gives half, 400, to VM0 (available 50, starved)
    np.testing.assert_allclose(got, [1400.0, 600.0])


def test_kvmscheduling_starved_without_wasteful_gets_300_from_host(kit):
    inp = mem_input(kit, [2000.0, 2000.0], [1000.0, 1000.0], [950.0, 800.0], KVM_CAP)
    got = make_policy("kvmscheduling").allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [1300.0, 1000.0])


def test_kvmscheduling_starved_without_wasteful_limited_by_host(kit):
    cap = np.array([NAN, 2100.0, NAN, NAN])
    inp = mem_input(kit, [2000.0, 2000.0], [1000.0, 1000.0], [950.0, 800.0], cap)
    got = make_policy("kvmscheduling").allocate(inp).amount[:, MEMORY]
    assert 1000.0 <= got[0] <= 1100.0 + 1e-9
    assert got.sum() <= 2100.0 + 1e-9


def test_kvmscheduling_wasteful_without_starved_returns_above_300(kit):
    inp = mem_input(kit, [2000.0, 2000.0], [1000.0, 1000.0], [500.0, 800.0], KVM_CAP)
    got = make_policy("kvmscheduling").allocate(inp).amount[:, MEMORY]
    np.testing.assert_allclose(got, [800.0, 1000.0])


# -- placement ----------------------------------------------------------------------------------


def place_input(kit, vcpus, pcpus, pins=None, pin_width=1, history=None, periods=1):
    n = len(vcpus)
    sizes = np.column_stack([np.asarray(vcpus, float), np.full(n, 1024.0), np.full((n, 2), NAN)])
    vms = kit.vms(n, sizes=sizes)
    cap = np.array([float(pcpus), 1024.0 * n, NAN, NAN])
    u = np.zeros((n, N_RES))
    u[:, 2:] = NAN
    return kit.input(vms, [u] * periods, cap, predictor="none", pcpus=pcpus, pins=pins,
                     pin_width=pin_width, history=history)


def test_make_placement_names():
    assert make_placement("none") is None
    for name in ("balance", "vm-balancer", "kvmscheduling"):
        assert make_placement(name).name == name
    with pytest.raises(ValueError):
        make_placement("bogus")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_balance_pins_busy_vcpus_floats_light_ones_and_balances(kit, vcpus, pcpus, seed):
    rng = np.random.default_rng(seed)
    inp = place_input(kit, vcpus, pcpus)
    load = rng.uniform(0, 1, len(vcpus)) * np.array(vcpus)
    p = BalancePlacement(float_above=np.inf)
    pins, width = p.place(inp, load)
    groups = pcpus // width
    assert pins.shape == (sum(vcpus),)
    per = np.repeat(np.minimum(load / np.array(vcpus), 1.0), vcpus)
    busy = per >= p.pin_above
    assert np.all((pins[busy] >= 0) & (pins[busy] < groups))
    assert np.all(pins[~busy] == -1)  # light vCPUs float
    if busy.any():
        loads = group_load(pins, per, groups)
        # greedy heaviest-first: no group exceeds the lightest by more than one vCPU's load
        assert loads.max() - loads.min() <= per.max() + 1e-9


def test_balance_unpins_a_vcpu_that_went_quiet_with_hysteresis(kit):
    p = BalancePlacement(float_above=np.inf)
    h = History(window=20)
    pins = np.array([0, 1])
    for _ in range(p.cooldown + 1):  # let the cooldown of the first placement pass
        inp = place_input(kit, [1, 1], 2, pins=pins, history=h)
        pins, _ = p.place(inp, np.array([0.9, 0.9]))
    np.testing.assert_array_equal(pins, [0, 1])
    # between the two thresholds nothing changes; below the lower one the vCPU floats
    inp = place_input(kit, [1, 1], 2, pins=pins, history=h)
    pins, _ = p.place(inp, np.array([0.2, 0.9]))
    np.testing.assert_array_equal(pins, [0, 1])
    inp = place_input(kit, [1, 1], 2, pins=pins, history=h)
    pins, _ = p.place(inp, np.array([0.05, 0.9]))
    np.testing.assert_array_equal(pins, [-1, 1])


def test_balance_moves_at_most_the_budget(kit):
    # 10 single-vCPU VMs, all pinned on pCPU 0 of a 2-pCPU host: badly imbalanced
    n = 10
    inp = place_input(kit, [1] * n, 2, pins=np.zeros(n, dtype=int))
    p = BalancePlacement(float_above=np.inf)
    pins, width = p.place(inp, np.full(n, 0.5))
    assert width == 1
    budget = max(1, int(p.moves_per_period * n))
    assert 1 <= (pins != 0).sum() <= budget


def test_balance_budget_scales_with_vcpus(kit):
    n = 400
    inp = place_input(kit, [1] * n, 4, pins=np.zeros(n, dtype=int))
    p = BalancePlacement(float_above=np.inf)
    pins, _ = p.place(inp, np.full(n, 0.5))
    budget = max(1, int(p.moves_per_period * n))
    assert budget == 4
    assert 1 <= (pins != 0).sum() <= budget


def test_balance_converges_with_fewest_moves(kit):
    # 8 VMs of 0.5 cores all on pCPU 0 of 4: balance is 2 per pCPU, so exactly 6 must move, once each
    p = BalancePlacement(float_above=np.inf)
    h = History(window=20)
    pins = np.zeros(8, dtype=int)
    moves = 0
    for _ in range(12):
        inp = place_input(kit, [1] * 8, 4, pins=pins, history=h)
        new, _ = p.place(inp, np.full(8, 0.5))
        moves += int((new != pins).sum())
        pins = new
    np.testing.assert_allclose(group_load(pins, np.full(8, 0.5), 4), [1.0, 1.0, 1.0, 1.0])
    assert moves == 6


def test_balance_small_imbalance_is_left_alone(kit):
    inp = place_input(kit, [1, 1], 2, pins=np.array([0, 1]))
    pins, _ = BalancePlacement(float_above=np.inf).place(inp, np.array([0.6, 0.5]))
    np.testing.assert_array_equal(pins, [0, 1])


def test_balance_does_not_move_a_vm_again_within_cooldown(kit):
    p = BalancePlacement(float_above=np.inf)
    h = History(window=20)
    # VM A (2 vCPUs, 0.8 each) and B (0.3: light, but not light enough to float), all on pCPU 0 of 2
    pins = np.array([0, 0, 0])
    inp = place_input(kit, [2, 1], 2, pins=pins, history=h)
    pins, _ = p.place(inp, np.array([1.6, 0.3]))
    moved = np.flatnonzero(pins != 0)
    assert moved.size == 1 and moved[0] in (0, 1)  # one of A's vCPUs went to pCPU 1
    a_stay = [i for i in (0, 1) if i != moved[0]][0]
    first = h.t
    # now A is lighter and B heavy: the best move is A's remaining vCPU (B alone would swap the imbalance)
    for _ in range(p.cooldown + 2):
        inp = place_input(kit, [2, 1], 2, pins=pins, history=h)
        new, _ = p.place(inp, np.array([1.2, 1.0]))
        if h.t - first < p.cooldown:
            np.testing.assert_array_equal(new, pins, err_msg=f"moved within cooldown at period {h.t}")
        pins = new
    assert pins[a_stay] == 1, "after the cooldown the move is allowed again"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=10), st.integers(2, 10), st.integers(0, 2**32 - 1))
def test_vm_balancer_placement_one_move_per_period(kit, vcpus, pcpus, seed):
    rng = np.random.default_rng(seed)
    m = sum(vcpus)
    start = rng.integers(0, pcpus, m)
    inp = place_input(kit, vcpus, pcpus, pins=start)
    pins, width = VmBalancerPlacement().place(inp, rng.uniform(0, 1, len(vcpus)) * np.array(vcpus))
    assert width == 1
    assert np.all((pins >= 0) & (pins < pcpus))
    assert (pins != start).sum() <= 1


def test_vm_balancer_placement_moves_from_busiest_to_freest(kit):
    inp = place_input(kit, [1, 1, 1], 3, pins=np.array([0, 0, 1]))
    pins, _ = VmBalancerPlacement().place(inp, np.array([0.9, 0.3, 0.2]))
    # pCPU 0 at 1.2, pCPU 2 at 0: the lighter vCPU on pCPU 0 moves to pCPU 2
    np.testing.assert_array_equal(pins, [0, 2, 1])


def test_balance_floats_every_vcpu_where_the_host_may_run_short(kit):
    """Pins bound a vCPU to its set while floating ones use any idle pCPU: past float_above, nothing is pinned."""
    p = BalancePlacement()
    inp = place_input(kit, [1, 1, 1], 4, pins=np.array([0, 1, 2]))
    pins, _ = p.place(inp, np.array([0.9, 0.9, 0.9]))  # 2.7 of 4 pCPUs: 0.675, under 0.75
    assert np.all(pins >= 0)
    inp = place_input(kit, [1, 1, 1, 1], 4, pins=np.array([0, 1, 2, 3]))
    pins, _ = p.place(inp, np.array([0.9, 0.9, 0.9, 0.9]))  # 3.6 of 4: 0.9
    assert np.all(pins == -1)


@pytest.mark.parametrize("pcpus", [12, 72])
@pytest.mark.parametrize("placement", [BalancePlacement, VmBalancerPlacement, KvmSchedulingPlacement])
def test_placement_beyond_8_pcpus(kit, pcpus, placement):
    # one busy single-vCPU VM per pCPU: balanced placement must use every pCPU, including those >= 8
    n = pcpus
    inp = place_input(kit, [1] * n, pcpus)
    made = placement(float_above=np.inf) if placement is BalancePlacement else placement()
    pins, width = made.place(inp, np.ones(n))
    groups = pcpus // width
    assert np.all((pins >= 0) & (pins < groups))
    assert pins.max() >= min(groups - 1, 8)
    loads = group_load(pins, np.ones(n), groups)
    np.testing.assert_allclose(loads, width)  # every pCPU (set) carries exactly its capacity


def test_kvmscheduling_placement_rebalances_past_threshold(kit):
    inp = place_input(kit, [1, 1, 1, 1], 2, pins=np.array([0, 0, 0, 1]))
    pins, _ = KvmSchedulingPlacement().place(inp, np.array([0.8, 0.8, 0.8, 0.8]))
    loads = group_load(pins, np.full(4, 0.8), 2)
    np.testing.assert_allclose(loads, [1.6, 1.6])


def test_kvmscheduling_placement_no_ping_pong_when_balanced(kit):
    start = np.array([0, 1, 0, 1])
    inp = place_input(kit, [1, 1, 1, 1], 2, pins=start)
    pins, _ = KvmSchedulingPlacement().place(inp, np.array([0.5, 0.5, 0.4, 0.4]))
    np.testing.assert_array_equal(pins, start)


def test_rescoin_caps_net_only_when_contended_and_someone_is_starved_below_entitlement(kit):
    # two VMs with equal net sizes sharing a 100 KiB/s link
    sizes = np.array([[1.0, 1024.0, NAN, 100.0], [1.0, 1024.0, NAN, 100.0]])
    vms = kit.vms(2, sizes=sizes)
    cap = np.array([2.0, 2048.0, NAN, 100.0])
    hog = np.array([[0.1, 100.0, NAN, 90.0], [0.1, 100.0, NAN, 10.0]])
    policy = make_policy("rescoin")
    # the link is busy (forecasts near capacity) but nobody below its entitlement is short: no cap
    calm = kit.input(vms, [hog] * 6, cap)
    assert calm.estimate()[:, NET].sum() > policy.cap_above * cap[NET]
    assert not policy.allocate(calm).caps[NET]
    # VM 1 uses 10 (below its entitlement of 50) yet shows 50% unmet demand: the hog gets capped
    sig = np.zeros((2, N_RES))
    sig[1, NET] = 0.5
    starved = kit.input(vms, [hog] * 6, cap, signals=[sig] * 6)
    alloc = policy.allocate(starved)
    assert alloc.caps[NET]  # (the guard keeps every cap at or above the VM's entitlement)
    # the same starvation on an idle link (forecasts far below capacity) caps nothing
    idle = np.array([[0.1, 100.0, NAN, 5.0], [0.1, 100.0, NAN, 5.0]])
    quiet = kit.input(vms, [idle] * 6, cap, signals=[sig] * 6)
    assert not policy.allocate(quiet).caps[NET]
