"""CgroupActuator on fake cgroup v1 and v2 trees laid out as the kernel and libvirt lay them out.

Each fake VM is found the way real ones are: a pid file in a fake
/run/libvirt/qemu and a fake /proc/<pid>/cgroup naming its groups.
"""
from __future__ import annotations

import errno
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.hosts.actuators import quota_us
from rescoin.hosts.cgroupfs import (
    CgroupActuator,
    blkio_to_io_weight,
    cpulist,
    io_weight_to_blkio,
    parse_cpulist,
    shares_to_weight,
    weight_to_shares,
)

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
V1_DIR = "machine/qemu-3-vm1.libvirt-qemu"
V2_SCOPE = "machine.slice/machine-qemu\\x2d3\\x2dvm1.scope"


class Fake:
    """A fake host: cgroup root, libvirt run dir and /proc, all under tmp_path."""

    def __init__(self, tmp: Path, version: int) -> None:
        self.tmp, self.version = tmp, version
        self.root, self.run, self.proc = tmp / "cgroup", tmp / "run", tmp / "proc"
        for d in (self.root, self.run, self.proc):
            d.mkdir(parents=True, exist_ok=True)
        if version == 2:
            (self.root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")

    def actuator(self) -> CgroupActuator:
        return CgroupActuator(self.root, run_dir=self.run, proc=self.proc)

    def file(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> str:
        return self.file(rel).read_text().strip()

    def put(self, rel: str, value: str) -> None:
        p = self.file(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")

    def vm_v1(self, name: str = "vm1", pid: int = 4242, vm_dir: str = V1_DIR, vcpus: int = 2,
              blkio_file: str | None = "blkio.bfq.weight") -> None:
        """A running VM on cgroup v1 (no systemd): cpu/cpuset with emulator + vcpuN, blkio flat."""
        for c in ("cpu", "cpuset"):
            for sub in ["emulator"] + [f"vcpu{v}" for v in range(vcpus)]:
                (self.root / c / vm_dir / sub).mkdir(parents=True, exist_ok=True)
        self.put(f"cpu/{vm_dir}/cpu.shares", "1024")
        for sub in ["", "emulator"] + [f"vcpu{v}" for v in range(vcpus)]:
            d = f"cpu/{vm_dir}/{sub}".rstrip("/")
            self.put(f"{d}/cpu.cfs_quota_us", "-1")
            self.put(f"{d}/cpu.cfs_period_us", "100000")
            self.put(f"cpuset/{vm_dir}/{sub}/cpuset.cpus".replace("//", "/"), "0-15")
        (self.root / "blkio" / vm_dir).mkdir(parents=True, exist_ok=True)
        if blkio_file:
            self.put(f"blkio/{vm_dir}/{blkio_file}", "100")
        self.pid(name, pid, "\n".join([
            "9:name=systemd:/", "8:pids:/", f"7:blkio:/{vm_dir}", f"6:freezer:/{vm_dir}", "5:devices:/",
            f"4:memory:/{vm_dir}", f"3:cpuset:/{vm_dir}/emulator", "2:cpuacct:/", f"1:cpu:/{vm_dir}/emulator",
            f"0::/{vm_dir}/emulator"]))

    def vm_v2(self, name: str = "vm1", pid: int = 4242, scope: str = V2_SCOPE, nested: bool = True,
              vcpus: int = 2, io_file: str = "io.weight") -> None:
        """A running VM on cgroup v2: a systemd scope, libvirt's groups nested in <scope>/libvirt/."""
        inner = f"{scope}/libvirt" if nested else scope
        for sub in ["emulator"] + [f"vcpu{v}" for v in range(vcpus)]:
            self.put(f"{inner}/{sub}/cpu.max", "max 100000")
            self.put(f"{inner}/{sub}/cpuset.cpus", "")
        self.put(f"{scope}/cpu.weight", "100")
        self.put(f"{scope}/cpu.max", "max 100000")
        self.put(f"{scope}/{io_file}", "default 100" if io_file == "io.weight" else "100")
        self.pid(name, pid, f"0::/{inner}/emulator")

    def pid(self, name: str, pid: int, cgroup_text: str) -> None:
        (self.run / f"{name}.pid").write_text(str(pid))
        (self.proc / str(pid)).mkdir(exist_ok=True)
        (self.proc / str(pid) / "cgroup").write_text(cgroup_text + "\n")


def vm(name: str = "vm1", vcpus: int = 2, uuid: str = UUID) -> SimpleNamespace:
    return SimpleNamespace(uuid=uuid, name=name, vcpus=vcpus)


class Dom:
    def __init__(self, dom_id: int = 3) -> None:
        self.dom_id = dom_id

    def ID(self) -> int:
        return self.dom_id


def run(call) -> object:
    name, fn, args = call
    assert name.startswith("cgroup.")
    return fn(*args)


# -- pure helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, on, expect", [
    (1, [0], "0"),
    (70, range(0, 70), "0-69"),
    (70, [3], "3"),
    (70, [0, 1, 2, 3, 8, 64, 65, 69], "0-3,8,64-65,69"),
    (200, range(150, 200), "150-199"),
    (200, list(range(0, 8)) + list(range(100, 108)) + [199], "0-7,100-107,199"),
    (200, range(0, 200, 2), ",".join(str(c) for c in range(0, 200, 2))),
    (200, [], ""),
])
def test_cpulist_formats_maps_of_any_length(n, on, expect):
    on = set(on)
    cpumap = tuple(c in on for c in range(n))
    assert cpulist(cpumap) == expect
    assert parse_cpulist(expect) == on


def test_cpulist_matches_the_maps_libvirt_host_builds():
    from rescoin.hosts.libvirt import _cpumap

    assert cpulist(_cpumap(1, 0, 1)) == "0"
    assert cpulist(_cpumap(70, 64, 4)) == "64-67"
    assert cpulist(_cpumap(200, 3 * 50, 50)) == "150-199"
    assert cpulist(_cpumap(200, 199, 1)) == "199"


def test_shares_to_weight_is_the_current_runc_mapping():
    # fixed points of runc PR 4785 / kubernetes issue 131216: min, v1 default -> v2 default, max
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 100  # the old linear mapping gave 39
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(1) == 1 and shares_to_weight(10**9) == 10000  # clamped
    assert shares_to_weight(2048) == 174  # the value runc 1.4 writes for --cpu-shares 2048 (ceil of 173.2)
    ws = [shares_to_weight(s) for s in range(2, 262145)]
    assert all(a <= b for a, b in zip(ws, ws[1:], strict=False))  # monotonic
    assert set(ws) == set(range(1, 10001))  # every weight is reachable
    for w in (1, 2, 39, 99, 100, 101, 5000, 9999, 10000):
        s = weight_to_shares(w)
        assert shares_to_weight(s) == w and (s == 2 or shares_to_weight(s - 1) < w)


def test_blkio_weights_keep_their_share_next_to_the_v2_default():
    assert blkio_to_io_weight(500) == 100  # rescoin's default blkio weight = io.weight's default
    assert blkio_to_io_weight(10) == 2 and blkio_to_io_weight(1000) == 200
    assert blkio_to_io_weight(1) == 2 and blkio_to_io_weight(10**6) == 200  # clamped to 10..1000 first
    io = [blkio_to_io_weight(w) for w in range(10, 1001)]
    assert all(a <= b for a, b in zip(io, io[1:], strict=False)) and min(io) >= 1 and max(io) <= 10000
    for a, b in ((250, 500), (100, 1000), (300, 600)):  # ratios between VMs are kept
        assert blkio_to_io_weight(b) / blkio_to_io_weight(a) == pytest.approx(b / a, rel=0.05)
    for w in (10, 100, 250, 500, 995, 1000):
        assert io_weight_to_blkio(blkio_to_io_weight(w)) == pytest.approx(w, abs=2.5)
    assert io_weight_to_blkio(100) == 500


# -- cgroup v1 ----------------------------------------------------------------------------------------
@pytest.fixture
def v1(tmp_path):
    fake = Fake(tmp_path, 1)
    fake.vm_v1()
    return fake


def test_v1_detected_and_shares_go_to_the_vm_group(v1):
    act = v1.actuator()
    assert act.version == 1 and act.name == "cgroup"
    run(act.cpu(vm(), Dom(), 2048, None))
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "2048"
    # quota untouched when None
    assert v1.read(f"cpu/{V1_DIR}/vcpu0/cpu.cfs_quota_us") == "-1"
    run(act.cpu(vm(), Dom(), 1, None))  # below the kernel's minimum: clamped, not refused
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "2"


def test_v1_quota_is_per_vcpu_with_period_100ms(v1):
    act = v1.actuator()
    v1.put(f"cpu/{V1_DIR}/vcpu1/cpu.cfs_period_us", "50000")
    run(act.cpu(vm(vcpus=2), Dom(), None, 1.5))  # 1.5 cores over 2 vCPUs: 75 ms per 100 ms each
    for v in (0, 1):
        assert v1.read(f"cpu/{V1_DIR}/vcpu{v}/cpu.cfs_quota_us") == "75000" == str(quota_us(1.5, 2))
        assert v1.read(f"cpu/{V1_DIR}/vcpu{v}/cpu.cfs_period_us") == "100000"
    assert v1.read(f"cpu/{V1_DIR}/cpu.cfs_quota_us") == "-1"  # the VM group itself stays uncapped
    assert v1.read(f"cpu/{V1_DIR}/emulator/cpu.cfs_quota_us") == "-1"
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "1024"  # shares None: unchanged
    run(act.cpu(vm(vcpus=2), Dom(), None, math.nan))  # NaN removes the cap
    assert [v1.read(f"cpu/{V1_DIR}/vcpu{v}/cpu.cfs_quota_us") for v in (0, 1)] == ["-1", "-1"]


def test_v1_blkio_weight_prefers_bfq_unscaled_as_libvirt_writes_it(v1):
    act = v1.actuator()
    run(act.blkio(vm(), Dom(), 700))
    # v1: the value libvirt's own blkiotune would write, so libvirt reads back what rescoin planned
    assert v1.read(f"blkio/{V1_DIR}/blkio.bfq.weight") == "700"
    assert not v1.file(f"blkio/{V1_DIR}/blkio.weight").exists()


def test_v1_blkio_weight_falls_back_to_cfq_file(tmp_path):
    fake = Fake(tmp_path, 1)
    fake.vm_v1(blkio_file="blkio.weight")
    run(fake.actuator().blkio(vm(), Dom(), 250))
    assert fake.read(f"blkio/{V1_DIR}/blkio.weight") == "250"


def test_v1_blkio_without_any_weight_file_is_an_oserror(tmp_path):
    fake = Fake(tmp_path, 1)
    fake.vm_v1(blkio_file=None)
    with pytest.raises(OSError):
        run(fake.actuator().blkio(vm(), Dom(), 250))


def test_v1_pin_writes_the_vcpu_cpuset(v1):
    act = v1.actuator()
    run(act.pin(vm(), Dom(), 1, tuple(c in (2, 3) for c in range(16))))
    assert v1.read(f"cpuset/{V1_DIR}/vcpu1/cpuset.cpus") == "2-3"
    assert v1.read(f"cpuset/{V1_DIR}/vcpu0/cpuset.cpus") == "0-15"
    with pytest.raises(OSError) as e:  # an empty map is refused before the kernel sees it
        run(act.pin(vm(), Dom(), 0, (False,) * 16))
    assert e.value.errno == errno.EINVAL


def test_v1_read_back(v1):
    act = v1.actuator()
    run(act.cpu(vm(), Dom(), 512, 0.5))
    run(act.blkio(vm(), Dom(), 300))
    run(act.pin(vm(), Dom(), 0, tuple(c == 5 for c in range(16))))
    got = act.read_back(vm(), Dom())
    assert got["version"] == 1 and got["pid"] == 4242
    assert got["shares"] == 512
    assert got["quota"] == [25000, 25000] and got["period"] == [100000, 100000]
    assert got["blkio"] == 300
    assert got["cpuset"] == ["5", "0-15"]
    assert got["paths"]["cpu"] == str(v1.root / "cpu" / V1_DIR)


def test_paths_are_cached_and_a_restarted_vm_is_found_again(v1):
    act = v1.actuator()
    run(act.cpu(vm(), Dom(), 600, None))
    (v1.run / "vm1.pid").write_text("garbage")  # cached: the pid file is not read again
    run(act.cpu(vm(), Dom(), 700, None))
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "700"
    # the VM restarts: new pid, new id, new directories; the old ones are gone
    for c in ("cpu", "cpuset", "blkio"):
        import shutil

        shutil.rmtree(v1.root / c / V1_DIR)
    new_dir = "machine/qemu-9-vm1.libvirt-qemu"
    v1.vm_v1(pid=5555, vm_dir=new_dir)
    run(act.cpu(vm(), Dom(9), 800, None))
    assert v1.read(f"cpu/{new_dir}/cpu.shares") == "800"
    assert act.read_back(vm())["pid"] == 5555


def test_a_vanished_vm_is_an_oserror(v1):
    import shutil

    act = v1.actuator()
    run(act.cpu(vm(), Dom(), 600, None))  # paths cached
    for c in ("cpu", "cpuset", "blkio"):
        shutil.rmtree(v1.root / c / V1_DIR)
    (v1.run / "vm1.pid").unlink()
    for call in (act.cpu(vm(), Dom(), 700, None), act.blkio(vm(), Dom(), 200),
                 act.pin(vm(), Dom(), 0, (True, False)), act.cpu(vm(), Dom(), None, 1.0)):
        with pytest.raises(OSError) as e:
            run(call)
        assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError):
        act.read_back(vm(), Dom())
    with pytest.raises(OSError):  # never seen, never started
        run(act.cpu(vm("other", uuid="x"), Dom(77), 100, None))


def test_a_stale_pid_file_is_not_trusted_and_the_vm_is_found_by_its_id(v1):
    # the pid now belongs to some other process, outside any machine cgroup
    v1.pid("vm1", 4242, "4:memory:/system.slice/cron.service\n1:cpu:/system.slice/cron.service")
    act = v1.actuator()
    run(act.cpu(vm(), Dom(3), 333, None))  # found by scanning for qemu-3-*.libvirt-qemu
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "333"
    run(act.pin(vm(), Dom(3), 0, (True, True)))
    assert v1.read(f"cpuset/{V1_DIR}/vcpu0/cpuset.cpus") == "0-1"
    act.forget()
    with pytest.raises(OSError):  # no pid file, and no directory for id 4
        run(act.cpu(vm(), Dom(4), 333, None))


def test_garbled_pid_file_is_an_oserror(v1):
    (v1.run / "vm1.pid").write_text("not a pid")
    with pytest.raises(OSError) as e:
        run(v1.actuator().cpu(vm(), Dom(), 100, None))
    assert e.value.errno == errno.EINVAL


# -- cgroup v2 ----------------------------------------------------------------------------------------
@pytest.fixture
def v2(tmp_path):
    fake = Fake(tmp_path, 2)
    fake.vm_v2()
    return fake


def test_v2_detected_and_shares_become_cpu_weight_on_the_scope(v2):
    act = v2.actuator()
    assert act.version == 2
    run(act.cpu(vm(), Dom(), 1024, None))
    assert v2.read(f"{V2_SCOPE}/cpu.weight") == "100"  # the v1 default weighs as much as an unmanaged sibling
    run(act.cpu(vm(), Dom(), 262144, None))
    assert v2.read(f"{V2_SCOPE}/cpu.weight") == "10000"
    run(act.cpu(vm(), Dom(), 2, None))
    assert v2.read(f"{V2_SCOPE}/cpu.weight") == "1"
    assert not v2.file(f"{V2_SCOPE}/libvirt/cpu.weight").exists()


def test_v2_quota_is_cpu_max_of_each_vcpu(v2):
    act = v2.actuator()
    run(act.cpu(vm(), Dom(), None, 0.5))
    for v in (0, 1):
        assert v2.read(f"{V2_SCOPE}/libvirt/vcpu{v}/cpu.max") == "25000 100000"
    assert v2.read(f"{V2_SCOPE}/cpu.max") == "max 100000"
    assert v2.read(f"{V2_SCOPE}/cpu.weight") == "100"  # shares None: unchanged
    run(act.cpu(vm(), Dom(), None, math.inf))
    assert v2.read(f"{V2_SCOPE}/libvirt/vcpu0/cpu.max") == "max 100000"
    run(act.cpu(vm(), Dom(), None, 0.001))  # tiny caps stop at the kernel's 1 ms minimum
    assert v2.read(f"{V2_SCOPE}/libvirt/vcpu1/cpu.max") == "1000 100000"


def test_v2_io_weight_default_is_the_v2_default(v2):
    act = v2.actuator()
    run(act.blkio(vm(), Dom(), 500))
    assert v2.read(f"{V2_SCOPE}/io.weight") == "default 100"  # libvirt writes 500: 5x an unmanaged sibling
    run(act.blkio(vm(), Dom(), 1000))
    assert v2.read(f"{V2_SCOPE}/io.weight") == "default 200"
    assert act.read_back(vm())["blkio"] == 1000 and act.read_back(vm())["io_weight"] == 200


def test_v2_io_bfq_weight_is_preferred(tmp_path):
    fake = Fake(tmp_path, 2)
    fake.vm_v2(io_file="io.bfq.weight")
    run(fake.actuator().blkio(vm(), Dom(), 800))
    assert fake.read(f"{V2_SCOPE}/io.bfq.weight") == "160"


def test_v2_pin_writes_the_vcpu_cpuset(v2):
    act = v2.actuator()
    run(act.pin(vm(), Dom(), 0, tuple(c >= 64 for c in range(70))))
    assert v2.read(f"{V2_SCOPE}/libvirt/vcpu0/cpuset.cpus") == "64-69"


def test_v2_without_nesting_and_read_back(tmp_path):
    fake = Fake(tmp_path, 2)
    scope = "machine.slice/machine-qemu\\x2d3\\x2dvm1.scope"
    fake.vm_v2(nested=False)
    act = fake.actuator()
    run(act.cpu(vm(), Dom(), 2048, 2.0))
    run(act.blkio(vm(), Dom(), 600))
    run(act.pin(vm(), Dom(), 1, (False, True, True)))
    assert fake.read(f"{scope}/cpu.weight") == str(shares_to_weight(2048))
    assert fake.read(f"{scope}/vcpu0/cpu.max") == "100000 100000"
    got = act.read_back(vm())
    assert got["version"] == 2
    assert got["cpu_weight"] == shares_to_weight(2048)
    assert shares_to_weight(got["shares"]) == got["cpu_weight"]
    assert got["quota"] == [100000, 100000] and got["period"] == [100000, 100000]
    assert got["blkio"] == 600
    assert got["cpuset"] == ["", "1-2"]


def test_v2_vanished_vm_is_an_oserror(v2):
    import shutil

    act = v2.actuator()
    run(act.cpu(vm(), Dom(), 100, None))
    shutil.rmtree(v2.root / "machine.slice")
    (v2.run / "vm1.pid").unlink()
    with pytest.raises(OSError):
        run(act.cpu(vm(), Dom(), 200, None))


# -- through LibvirtHost: failures are recorded, the loop goes on --------------------------------------------
def test_libvirt_host_applies_through_cgroups_and_survives_a_vanished_vm(tmp_path):
    pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")
    from rescoin.core.loop import ControlLoop
    from rescoin.core.registry import build
    from rescoin.hosts.config import HostConfig
    from rescoin.hosts.libvirt import LibvirtHost, _cpumap

    fake = Fake(tmp_path, 1)
    fake.vm_v1(name="test", vm_dir="machine/qemu-1-test.libvirt-qemu", vcpus=2)
    fake.put("cpu/machine/qemu-1-test.libvirt-qemu/cpu.shares", "7")  # far from any plan
    vm_dir = "machine/qemu-1-test.libvirt-qemu"
    act = fake.actuator()
    host = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0), actuator=act)
    try:
        step = ControlLoop(host, build("rescoin"), period=1.0).step()
        plan = step.plan
        assert step.result.failed == {}, step.result.errors
        assert plan.changed["shares"][0] and step.result.applied["shares"] == 1
        assert fake.read(f"cpu/{vm_dir}/cpu.shares") == str(int(plan.controls.shares[0]))
        assert plan.changed["blkio"][0]
        assert fake.read(f"blkio/{vm_dir}/blkio.bfq.weight") == str(int(plan.controls.blkio[0]))  # v1: unscaled
        pcpus = host.capacity.pcpus
        width = plan.controls.pin_width
        for v, group in enumerate(plan.controls.pins[:2]):
            if plan.changed["pin"][v]:
                assert fake.read(f"cpuset/{vm_dir}/vcpu{v}/cpuset.cpus") == cpulist(
                    _cpumap(pcpus, int(group) * width, width))
        # the VM's cgroups vanish (it stopped) between two periods
        import shutil

        for c in ("cpu", "cpuset", "blkio"):
            shutil.rmtree(fake.root / c / vm_dir)
        (fake.run / "test.pid").unlink()
        host.observe()
        result = host.apply(plan)
        assert result.applied.get("shares", 0) == 0 and result.failed["shares"] == 1
        assert result.failed.get("blkio") == 1
        assert any("cgroup.cpu" in e for e in result.errors)
        assert host.lv.errors["cgroup.cpu"] == 1
    finally:
        host.close()


def test_plan_values_round_trip_through_numpy_types(v1):
    act = v1.actuator()
    run(act.cpu(vm(), Dom(), np.float64(1500.0), np.float64(0.25)))
    run(act.blkio(vm(), Dom(), np.int64(400)))
    run(act.pin(vm(), Dom(), np.int64(1), tuple(np.arange(16) == 7)))
    got = act.read_back(vm())
    assert (got["shares"], got["quota"], got["blkio"], got["cpuset"]) == (1500, [12500, 12500], 400, ["0-15", "7"])


def test_a_controller_libvirt_does_not_manage_is_an_oserror_for_its_writes_only(v1):
    # libvirt configured without blkio (qemu.conf cgroup_controllers): the QEMU process stays in blkio's root
    text = (v1.proc / "4242" / "cgroup").read_text().replace(f"7:blkio:/{V1_DIR}", "7:blkio:/")
    (v1.proc / "4242" / "cgroup").write_text(text)
    act = v1.actuator()
    run(act.cpu(vm(), Dom(), 900, None))
    assert v1.read(f"cpu/{V1_DIR}/cpu.shares") == "900"
    with pytest.raises(OSError) as e:
        run(act.blkio(vm(), Dom(), 500))
    assert e.value.errno == errno.EOPNOTSUPP
    assert v1.read(f"blkio/{V1_DIR}/blkio.bfq.weight") == "100"
    got = act.read_back(vm())
    assert got["blkio"] is None and got["shares"] == 900 and "blkio" not in got["paths"]
