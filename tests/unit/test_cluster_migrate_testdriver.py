"""The executor's preconditions and the collector on libvirt's test driver (no daemon needed)."""
from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from rescoin.cluster.collect import Collector, vm_figures  # noqa: E402
from rescoin.cluster.migrate import Executor, Hosts, host_local_paths, parse_credits  # noqa: E402
from rescoin.cluster.model import ClusterState, HostInfo, Move, Rules, VmInfo  # noqa: E402
from rescoin.hosts.libvirt.ledger import credits_xml  # noqa: E402

A = B = "test:///default"


def _state(uuid: str, target_mib: float = 8192) -> ClusterState:
    return ClusterState(0.0, (HostInfo("a", 4, 8192, A), HostInfo("b", 4, target_mib, B)),
                        (VmInfo(uuid, "test", "a", 2, 8000 / 1024 * 1024),))


@pytest.fixture
def empty(tmp_path) -> str:
    """A test-driver host with no domains."""
    node = tmp_path / "node.xml"
    node.write_text("<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads>"
                    "<active>4</active></cpu><memory>8388608</memory></node>")
    return f"test://{node}"


@pytest.fixture
def uuid() -> str:
    return libvirt.open(A).lookupByName("test").UUIDString()


def test_already_on_target_is_refused_before_migrating(uuid):
    ex = Executor(Hosts({"a": A, "b": A}))  # the same daemon under two names: the VM is "on the target"
    out = ex.migrate(Move(uuid, "test", "a", "b", "t"), _state(uuid), Rules())
    assert out.outcome == "precondition" and "already on b" in out.detail


def test_unknown_vm_and_no_room_are_refused(uuid, empty):
    ex = Executor(Hosts({"a": A, "b": empty}))
    gone = ex.migrate(Move("00000000-0000-0000-0000-000000000001", "x", "a", "b", "t"), _state(uuid), Rules())
    assert gone.outcome == "precondition" and "no longer on a" in gone.detail
    full = ex.migrate(Move(uuid, "test", "a", "b", "t"), _state(uuid, target_mib=4096), Rules())
    assert full.outcome == "precondition" and "no room on b" in full.detail
    reserved = ex.migrate(Move(uuid, "test", "a", "b", "t"), _state(uuid), Rules(reserve_mib={"b": 1000}))
    assert reserved.outcome == "precondition" and "after reserve" in reserved.detail
    assert ex.counts["precondition"] == 3


def test_rules_are_rechecked(uuid, empty):
    ex = Executor(Hosts({"a": A, "b": empty}))
    out = ex.migrate(Move(uuid, "test", "a", "b", "t"), _state(uuid), Rules(pins={"test": frozenset({"a"})}))
    assert out.outcome == "precondition" and "rules forbid b" in out.detail


def test_unreachable_target_is_refused(uuid):
    ex = Executor(Hosts({"a": A, "b": "qemu+unix:///system?socket=/nonexistent/sock"}))
    out = ex.migrate(Move(uuid, "test", "a", "b", "t"), _state(uuid), Rules())
    assert out.outcome == "precondition" and "connect" in out.detail


def test_collector_reads_capacity_and_vms():
    state = Collector({"a": A}, capacity={"a": (2, 1000)}).collect()
    (host,) = state.hosts
    assert host.cpus == 2 and host.memory_mib == 1000
    assert [v.name for v in state.on("a")] == ["test"]


def test_memory_figures_and_host_paths():
    f = vm_figures({"balloon.current": 256 * 1024, "balloon.maximum": 384 * 1024, "balloon.rss": 300 * 1024,
                    "balloon.unused": 6 * 1024}, None)
    assert f["memory_mib"] == 384 and f["mem_used"] == 300
    assert f["mem_forecast"] == pytest.approx(250 * 1.1) and f["mem_unserved"] == pytest.approx(19)
    xml = "<domain><devices><channel><source path='/run/x/h0/vm.agent'/></channel></devices></domain>"
    assert "/run/x/h1/vm.agent" in host_local_paths(xml, "h0", "h1")
    assert host_local_paths(xml, "h5", "h1") is None
    assert parse_credits(credits_xml((1.5, 2.0))) == (1.5, 2.0)
