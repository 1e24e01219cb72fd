"""The peers as their real counterparts behave: none, static, the guard profiles of the recipes."""
from __future__ import annotations

import numpy as np
import pytest

from rescoin.core.registry import GUARDED, POLICIES, RECIPES, build, recipe
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.offline.simulate import SimSettings, build_loop, parse_policies

NAN = np.nan


def busy_trace(kit, periods=24, n=5, seed=3):
    """Memory and CPU that move every period, on a host that is overcommitted."""
    rng = np.random.default_rng(seed)
    demand = np.empty((periods, n, N_RES))
    demand[:, :, CPU] = rng.uniform(0.1, 2.0, (periods, n))
    demand[:, :, MEMORY] = rng.uniform(200, 3000, (periods, n))
    demand[:, :, DISK] = rng.uniform(10, 500, (periods, n))
    demand[:, :, NET] = rng.uniform(10, 500, (periods, n))
    sizes = np.tile([2.0, 4096.0, NAN, NAN], (n, 1))
    return kit.trace(demand, sizes)


def test_default_order():
    assert POLICIES == ("none", "static", "mom", "drf", "vm-balancer", "kvmscheduling", "rescoin-paper",
                        "rescoin", "oracle")


def test_recipes_name_their_guard():
    assert recipe("rescoin").guard == "rescoin"
    assert all(recipe(p).guard == "physical" for p in POLICIES if p != "rescoin")
    assert build("mom").guard == "physical" and build("rescoin").guard == "rescoin"


@pytest.mark.parametrize("peer", [p for p in RECIPES if p != "rescoin"])
def test_guarded_variant_of_every_peer(peer):
    name = peer + GUARDED
    assert recipe(name).guard == "rescoin" and build(name).guard == "rescoin"
    assert build(name).policy.name == peer
    assert parse_policies(f"{peer},{name}") == [peer, name]
    assert name not in POLICIES


def test_guarded_variant_runs_with_rescoins_guard(kit):
    trace = busy_trace(kit)
    assert build_loop(trace, "mom+guard", SimSettings(overcommit=2.0)).guard.profile == "rescoin"
    assert build_loop(trace, "mom", SimSettings(overcommit=2.0)).guard.profile == "physical"


@pytest.mark.parametrize("bad", ["nope", "rescoin+guard", "+guard", "mom+guard+guard"])
def test_unknown_names_say_which_exist(bad):
    with pytest.raises(ValueError) as e:
        recipe(bad)
    assert all(p in str(e.value) for p in POLICIES)
    with pytest.raises(ValueError):
        parse_policies(bad)


def test_none_changes_nothing_over_a_replay(kit):
    loop = build_loop(busy_trace(kit), "none", SimSettings(overcommit=2.0))
    steps = list(loop.steps())
    assert steps and all(sum(s.plan.counts().values()) == 0 for s in steps)
    c = steps[-1].plan.controls
    assert (c.shares == 1024).all() and (c.blkio == 500).all()
    np.testing.assert_array_equal(c.balloon, steps[-1].obs.vms.sizes[:, MEMORY])  # at maximum
    assert (c.pins < 0).all()


@pytest.mark.parametrize("over", [1.0, 2.0, 4.0])
def test_static_changes_balloons_only_at_first_sight(kit, over):
    presence = np.ones((24, 5), dtype=bool)
    presence[10:13, 3] = False  # VM3 leaves and comes back (as a new VM, fixed anew)
    loop = build_loop(busy_trace(kit), "static", SimSettings(overcommit=over), presence=presence)
    moves = 0
    for s in loop.steps():
        later = s.obs.age > 0
        assert not s.plan.changed["balloon"][later].any(), "a fixed target moved"
        assert not s.plan.changed["shares"][later].any(), "fixed shares moved"
        moves += int(s.plan.changed["balloon"].sum())
        cap = s.obs.host.capacity[MEMORY]
        assert s.plan.controls.balloon.sum() <= cap + 1e-6  # newcomers get only what the fixed ones leave
    assert (moves > 0) == (over > 1)  # at 1:1 every entitlement is the whole VM: the default already


def test_static_targets_are_first_sight_entitlements(kit):
    loop = build_loop(busy_trace(kit), "static", SimSettings(overcommit=2.0))
    first = next(loop.steps())
    np.testing.assert_allclose(first.plan.controls.balloon, first.entitlement[:, MEMORY])
    np.testing.assert_allclose(first.plan.controls.shares, np.round(first.entitlement[:, CPU] * 1024))


@pytest.mark.parametrize("peer", ["mom", "vm-balancer", "kvmscheduling"])
def test_reactive_peers_leave_a_guest_without_memory_stats_alone(kit, peer):
    """They read used memory from the guest: unknown, they do not balloon it (not as if it used none)."""
    trace = busy_trace(kit)
    trace.demand[:, 2, MEMORY] = NAN
    # (at 1:1 the targets fit the host: the physical guard scales none of them into it)
    loop = build_loop(trace, peer, SimSettings(overcommit=1.0))
    moved = 0
    for s in loop.steps():
        assert not s.plan.changed["balloon"][2]
        moved += int(s.plan.changed["balloon"].sum())
    assert moved > 0  # the others are ballooned


@pytest.mark.parametrize(("uri", "profile"), [("sim:", "physical"), ("qemu:///system", "rescoin")])
def test_daemon_guard_is_rescoins_on_a_real_host(tmp_path, monkeypatch, uri, profile):
    """Safety first on a real host: a peer runs there as its "+guard" variant; a replay as simulate runs it."""
    from rescoin.hosts.sim import SimHost
    from rescoin.offline.traces import load_trace, sample_trace_path
    from rescoin.ops import daemon as daemon_mod
    from rescoin.ops.config import parse

    host = SimHost(load_trace(sample_trace_path(), vms=3, days=0.1))
    monkeypatch.setattr(daemon_mod, "build_host", lambda cfg, sim=None, setup=None: host)
    text = (f'[daemon]\nuri = "{uri}"\npolicy = "mom"\nperiod = 1\nstate_file = ""\nhistory_dir = ""\n'
            'status_socket = ""\n[metrics]\nenabled = false\n')
    d = daemon_mod.Daemon(parse(text))
    try:
        assert d.loop.guard.profile == profile
    finally:
        d._close_paths()


def test_ablations_resolve_by_name_but_are_not_in_the_default_order(kit):
    from rescoin.core.registry import ABLATIONS

    for name in ABLATIONS:
        assert name not in POLICIES and recipe(name).guard == "rescoin"
        assert build(name).policy.name == name
    assert build("rescoin-nopin").placement is None and build("rescoin").placement is not None
    assert build("rescoin-nocredit").policy.credits == "off" and build("rescoin").policy.credits == "saved"
    assert build("rescoin-coins").policy.credits == "coins"


def test_without_credits_the_excess_follows_entitlements_not_coins(kit):
    from rescoin.core.policies.rescoin import RescoinPolicy
    from tests.unit.test_policies import cpu_input

    # 10 cores, three 4-vCPU VMs (entitlement 10/3 each); VM 0 saved its entitlement, VM 1 spent beyond it
    inp = cpu_input(kit, [4.0, 4.0, 4.0], [4.0, 4.0, 2.5], [[0.5, 4.0, 2.5]] * 5)
    coins = RescoinPolicy(credits="coins").allocate(inp).amount[:, CPU]
    saved = RescoinPolicy().allocate(inp).amount[:, CPU]
    plain = RescoinPolicy(credits="off").allocate(inp).amount[:, CPU]
    assert coins[0] > coins[1] + 0.3  # the prototype's: all the excess goes to the VM with coins
    # saved: VM 0 weighs its entitlement plus what it left unused, VM 1 its entitlement: between the two
    assert plain[0] + 0.05 < saved[0] < coins[0] - 0.05 and saved[0] > saved[1] + 0.1
    assert plain[0] == pytest.approx(plain[1])  # without credits: by (equal) entitlement
    for a in (coins, saved, plain):
        assert a.sum() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="credits must be one of"):
        RescoinPolicy(credits="karma")
