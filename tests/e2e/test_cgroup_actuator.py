"""End-to-end: CgroupActuator on this machine's real cgroups, with one real QEMU guest.

The guest is this module's own (``rescoin-cg-0``, not a ``rescoin-lab-*`` VM,
which the lab's tests remove and recreate). Every check reads the kernel's
cgroup files, found independently of the actuator (from the vCPU threads'
own /proc entries), and libvirt where it reads the same files back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.e2e

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test` (scripts/setup-host)")

from rescoin import lab  # noqa: E402
from rescoin.core.loop import ControlLoop  # noqa: E402
from rescoin.core.placement import BalancePlacement  # noqa: E402
from rescoin.core.registry import build  # noqa: E402
from rescoin.hosts.actuators import quota_us  # noqa: E402
from rescoin.hosts.cgroupfs import CgroupActuator, cpulist  # noqa: E402
from rescoin.hosts.libvirt import LibvirtHost, _cpumap  # noqa: E402

URI = "qemu:///system"
NAME = "rescoin-cg-0"
VCPUS = 2
CGROUP = Path("/sys/fs/cgroup")


def _remove(conn) -> None:
    try:
        dom = conn.lookupByName(NAME)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()


@pytest.fixture(scope="module")
def guest():
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirtd and the cgroup files)")
    if (CGROUP / "cgroup.controllers").exists() or not (CGROUP / "cpu" / "cpu.shares").exists():
        pytest.skip("needs the cgroup v1 hierarchy mounted at /sys/fs/cgroup/<controller>")
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.skip(f"no libvirtd at {URI}: {e.get_error_message()}")
    files = [lab.DISK_DIR / f"{NAME}.img", lab.SOCKET_DIR / f"{NAME}.agent", lab.LOG_DIR / f"{NAME}.console.log"]
    try:
        _remove(conn)  # left over from an interrupted run
        image = lab.build_image()
        for d in (lab.DISK_DIR, lab.LOG_DIR, lab.SOCKET_DIR):
            d.mkdir(parents=True, exist_ok=True)
        with open(files[0], "wb") as f:
            f.truncate(lab.DISK_MIB * 2**20)
        files[1].unlink(missing_ok=True)
        xml = lab.domain_xml(NAME, image.kernel, image.initrd, files[0], files[1], 256, 384, VCPUS,
                             load="cpu:0.5", console_log=files[2], disk_cache="writeback")
        dom = conn.defineXML(xml)
        dom.create()
        yield SimpleNamespace(conn=conn, dom=dom)
    finally:
        _remove(conn)
        for f in files:
            f.unlink(missing_ok=True)
        conn.close()


# -- the kernel's view, found without the actuator -----------------------------------------------------
def vcpu_threads() -> dict[int, int]:
    """vCPU index -> thread id of the QEMU vCPU thread ("CPU 0/TCG", "CPU 0/KVM")."""
    pid = int(Path(f"/run/libvirt/qemu/{NAME}.pid").read_text())
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        if comm.startswith("CPU ") and "/" in comm:
            out[int(comm.split()[1].split("/")[0])] = int(task.name)
    assert len(out) == VCPUS, f"vCPU threads of {NAME}: {out}"
    return out


def thread_cgroup(tid: int, controller: str) -> Path:
    for line in Path(f"/proc/{tid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP / controller / path.lstrip("/")
    raise AssertionError(f"thread {tid} is in no {controller} cgroup")


def kernel_view() -> dict:
    """shares, blkio weight, per-vCPU quota and cpuset, and each vCPU thread's allowed CPUs."""
    threads = vcpu_threads()
    vcpu_cpu = {v: thread_cgroup(t, "cpu") for v, t in threads.items()}
    vcpu_set = {v: thread_cgroup(t, "cpuset") for v, t in threads.items()}
    assert all(p.name == f"vcpu{v}" for v, p in vcpu_cpu.items()), vcpu_cpu
    vm_cpu = vcpu_cpu[0].parent
    assert vm_cpu.name.endswith(".libvirt-qemu") or vm_cpu.name.endswith(".scope") or vm_cpu.name == "libvirt"
    pid = int(Path(f"/run/libvirt/qemu/{NAME}.pid").read_text())
    vm_blkio = thread_cgroup(pid, "blkio")
    weight_file = next(f for f in (vm_blkio / "blkio.bfq.weight", vm_blkio / "blkio.weight") if f.exists())
    allowed = {}
    for v, t in threads.items():
        line = next(ln for ln in Path(f"/proc/{pid}/task/{t}/status").read_text().splitlines()
                    if ln.startswith("Cpus_allowed_list:"))
        allowed[v] = line.split(":", 1)[1].strip()
    return {
        "shares": int((vm_cpu / "cpu.shares").read_text()),
        "blkio": int(weight_file.read_text().split()[-1]),
        "quota": [int((vcpu_cpu[v] / "cpu.cfs_quota_us").read_text()) for v in range(VCPUS)],
        "period": [int((vcpu_cpu[v] / "cpu.cfs_period_us").read_text()) for v in range(VCPUS)],
        "cpuset": [(vcpu_set[v] / "cpuset.cpus").read_text().strip() for v in range(VCPUS)],
        "allowed": [allowed[v] for v in range(VCPUS)],
        "dirs": {"cpu": vm_cpu, "blkio": vm_blkio, "cpuset": vcpu_set[0].parent},
    }


# -- tests -------------------------------------------------------------------------------------------------
def test_control_loop_through_cgroups_writes_what_the_plan_decided(guest):
    dom = guest.dom
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    # start far from anything the policy decides, so every kind of action happens
    dom.setSchedulerParametersFlags({"cpu_shares": 7}, live)
    dom.setBlkioParameters({"weight": 10}, live)
    host = LibvirtHost(URI, actuator=CgroupActuator(), managed=lambda u, n: n == NAME)
    try:
        # this test is about the actuator: pin whatever the load (a booting 2-vCPU guest is busy
        # enough that rescoin's default would float every vCPU, and no pin would be written)
        parts = dataclasses.replace(build("rescoin"), placement=BalancePlacement(float_above=math.inf))
        loop = ControlLoop(host, parts, period=1.0)
        pcpus = host.capacity.pcpus
        seen = {"shares": 0, "blkio": 0, "pin": 0}
        for _ in range(3):
            step = loop.step()
            plan, result = step.plan, step.result
            assert plan.vms.names.tolist() == [NAME]
            assert result.failed == {}, result.errors
            k = kernel_view()
            c = plan.controls
            if plan.changed["shares"][0]:
                seen["shares"] += 1
                assert k["shares"] == int(c.shares[0])
                assert dom.schedulerParameters()["cpu_shares"] == int(c.shares[0])  # libvirt reads the file
            if plan.changed["blkio"][0]:
                seen["blkio"] += 1
                assert k["blkio"] == int(c.blkio[0])
                assert dom.blkioParameters(0)["weight"] == int(c.blkio[0])
            for v in range(VCPUS):
                if plan.changed["pin"][v] and c.pins[v] >= 0:
                    seen["pin"] += 1
                    want = cpulist(_cpumap(pcpus, int(c.pins[v]) * c.pin_width, c.pin_width))
                    assert k["cpuset"][v] == want
                    assert k["allowed"][v] == want  # the kernel applied it to the vCPU thread
            time.sleep(1.0)
        assert all(seen.values()), f"the plans never changed some kinds: {seen}"
        assert k["shares"] != 7 and k["blkio"] != 10  # nothing undid the writes after the last step
        assert host.lv.errors == {}
    finally:
        host.close()


def test_direct_quota_call_writes_cfs_quota_of_every_vcpu(guest):
    dom = guest.dom
    act = CgroupActuator()
    state = SimpleNamespace(uuid=dom.UUIDString(), name=NAME, vcpus=VCPUS)
    name, fn, args = act.cpu(state, dom, 3000, 0.5)
    assert name == "cgroup.cpu"
    fn(*args)
    k = kernel_view()
    assert k["quota"] == [quota_us(0.5, VCPUS)] * VCPUS == [25000, 25000]
    assert k["period"] == [100000, 100000]
    assert k["shares"] == 3000
    sched = dom.schedulerParameters()
    assert sched["vcpu_quota"] == 25000 and sched["vcpu_period"] == 100000 and sched["cpu_shares"] == 3000
    got = act.read_back(state, dom)
    assert (got["shares"], got["quota"], got["cpuset"]) == (3000, k["quota"], k["cpuset"])
    assert got["blkio"] == k["blkio"]
    assert Path(got["paths"]["cpu"]) == k["dirs"]["cpu"] and Path(got["paths"]["blkio"]) == k["dirs"]["blkio"]
    name, fn, args = act.cpu(state, dom, None, math.nan)  # NaN removes the cap
    fn(*args)
    assert kernel_view()["quota"] == [-1, -1]
    assert dom.schedulerParameters()["vcpu_quota"] == -1


def test_restarted_guest_is_found_again(guest):
    dom = guest.dom
    act = CgroupActuator()
    state = SimpleNamespace(uuid=dom.UUIDString(), name=NAME, vcpus=VCPUS)
    name, fn, args = act.blkio(state, dom, 400)
    fn(*args)
    old = kernel_view()["dirs"]["blkio"]
    dom.destroy()
    dom.create()  # new QEMU pid, new domain id, new cgroup directories
    assert not old.exists()
    name, fn, args = act.blkio(state, dom, 600)
    fn(*args)  # the cached paths fail with ENOENT; the actuator looks them up again
    k = kernel_view()
    assert k["dirs"]["blkio"] != old and k["blkio"] == 600
    assert dom.blkioParameters(0)["weight"] == 600
