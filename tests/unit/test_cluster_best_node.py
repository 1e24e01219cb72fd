"""``rescoin balance best-node``: the host a new VM should start on (pure, no libvirt)."""
from __future__ import annotations

import pytest

from rescoin.cluster.balance import BalanceError, best_node
from rescoin.cluster.model import ClusterState, HostInfo, Rules, VmInfo


def state(*, a_used: float = 6000, b_used: float = 2000) -> ClusterState:
    hosts = (HostInfo("a", 8, 8192), HostInfo("b", 8, 8192))
    vms = (VmInfo("u1", "v1", "a", 2, a_used), VmInfo("u2", "v2", "b", 2, b_used))
    return ClusterState(0.0, hosts, vms)


def test_the_host_with_more_memory_left_wins():
    host, why = best_node(state(), Rules(), vcpus=2, memory_mib=1024)
    assert host == "b" and "memory left" in why
    host, _ = best_node(state(a_used=1000, b_used=6000), Rules(), vcpus=2, memory_mib=1024)
    assert host == "a"


def test_reserve_and_maintenance_are_respected():
    # b has the room, but its reserve leaves too little; a is then the only host
    host, _ = best_node(state(a_used=4000), Rules(reserve_mib={"b": 5000}), vcpus=1, memory_mib=2048)
    assert host == "a"
    host, _ = best_node(state(), Rules(maintenance=frozenset({"b"})), vcpus=1, memory_mib=1024)
    assert host == "a"


def test_no_host_with_room_is_one_clear_error_naming_each_refusal():
    with pytest.raises(BalanceError) as e:
        best_node(state(), Rules(), vcpus=1, memory_mib=7000)
    assert "no host can take the VM" in str(e.value) and "a" in str(e.value) and "b" in str(e.value)
