"""End-to-end: ``rescoin balance`` live-migrates real TCG guests between the two lab libvirt hosts.

The lab cluster (two namespaced libvirtds, DESIGN 13b) comes up once for the
module and is always torn down, and the teardown is checked to leave no
namespace, daemon, cgroup or file. Every effect is read back from both
daemons or from inside the guest (its agent), never from rescoin's bookkeeping.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from rescoin.cluster.migrate import CREDITS_NS, parse_credits, write_credits  # noqa: E402
from rescoin.hosts.libvirt.connection import Libvirt  # noqa: E402
from rescoin.lab import cluster as lc  # noqa: E402
from rescoin.lab.lifecycle import agent_stats  # noqa: E402

H0, H1 = lc.host_names(2)
HUNGRY, IDLE = f"{lc.VM_PREFIX}0", f"{lc.VM_PREFIX}1"
LOADS = ["mem:grow:step=16,max=200,every=1", "idle"]
CREDITS = (1.25, 3.5, 0.0, 2.0)
REPO = Path(__file__).resolve().parents[2]


def rescoin(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rescoin", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def where(state: dict, name: str) -> dict[str, tuple[bool, bool]]:
    """Host -> (running, persistent) for every host that knows the domain ``name``."""
    out = {}
    for h in state["hosts"]:
        conn = libvirt.open(h["uri"])
        try:
            dom = conn.lookupByName(name)
            out[h["name"]] = (bool(dom.isActive()), bool(dom.isPersistent()))
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return out


def ticks(state: dict, host: str, name: str) -> float:
    report = agent_stats(lc.vm_paths(lc.host_of(state, host), name)["socket"], timeout=3.0)
    assert report is not None, f"{name}'s agent does not answer on {host}"
    return report.cpu_total_ticks


def leftovers() -> list[str]:
    """Anything of the lab cluster still on the machine."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {n}" for n in lc.host_names(2) if n in netns]
    pgrep = subprocess.run(["pgrep", "-a", "libvirtd|virtlogd|qemu-system"], capture_output=True, text=True)
    found += [f"process {line}" for line in pgrep.stdout.splitlines() if str(lc.CLUSTER_ROOT) in line
              or lc.VM_PREFIX in line]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {m}" for m in mounts.splitlines() if str(lc.CLUSTER_ROOT) in m or "/run/netns/rescoin" in m]
    found += [f"cgroup {c}" for c in Path("/sys/fs/cgroup").glob(f"*/**/{lc.HOST_PREFIX}*")]
    found += [f"path {p}" for p in (lc.CLUSTER_ROOT, lc.CLUSTER_SOCKETS) if p.exists()]
    return found


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.fail("the lab cluster needs root")
    try:
        state = lc.cluster_up(2, 2, loads=LOADS)
        yield state
    finally:
        t0 = time.monotonic()
        lc.cluster_down()
        print(f"lab cluster down in {time.monotonic() - t0:.1f} s")
    assert leftovers() == []


def hosts_arg(state: dict) -> str:
    return ",".join(h["uri"] for h in state["hosts"])


def test_plan_and_dry_run_move_nothing(lab):
    crowded = ["--capacity", f"{H0}=2:300", "--capacity", f"{H1}=2:1000", "--hold", "1"]
    r = rescoin("balance", "plan", "--json", "--hosts", hosts_arg(lab), *crowded)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert set(plan["hosts"]) == {H0, H1}
    r = rescoin("balance", "run", "--once", "--dry-run", "--hosts", hosts_arg(lab), *crowded)
    assert r.returncode == 0, r.stderr
    assert where(lab, HUNGRY) == {H0: (True, True)} and where(lab, IDLE) == {H0: (True, True)}
    table = rescoin("balance", "plan", "--hosts", hosts_arg(lab), *crowded)
    assert table.returncode == 0 and all(len(line) <= 80 for line in table.stdout.splitlines())


def test_hungry_guest_moves_and_keeps_running(lab):
    lv = Libvirt(lc.host_of(lab, H0)["uri"])
    dom = lv.connect().lookupByName(HUNGRY)
    assert write_credits(lv, dom, CREDITS)
    lv.close()
    before = ticks(lab, H0, HUNGRY)
    time.sleep(4)  # the load grows its working set past the small host
    t0 = time.monotonic()
    r = rescoin("balance", "run", "--once", "--hosts", hosts_arg(lab), "--hold", "1",
                "--capacity", f"{H0}=2:300", "--capacity", f"{H1}=2:1000")
    print(r.stdout, r.stderr[-2000:], f"run --once took {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr
    assert f"{HUNGRY}: {H0} -> {H1}: ok" in r.stdout
    assert where(lab, HUNGRY) == {H1: (True, True)}
    assert where(lab, IDLE) == {H0: (True, True)}
    after = ticks(lab, H1, HUNGRY)
    assert after > before
    conn = libvirt.open(lc.host_of(lab, H1)["uri"])
    text = conn.lookupByName(HUNGRY).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CREDITS_NS, 0)
    conn.close()
    assert parse_credits(text) == CREDITS


def test_anti_affinity_pair_never_on_one_host(lab):
    # now the hungry VM is on H1 and H1 is made the crowded one; H0 holds its anti-affine partner
    r = rescoin("balance", "run", "--once", "--hosts", hosts_arg(lab), "--hold", "1",
                "--capacity", f"{H0}=2:2000", "--capacity", f"{H1}=2:300", "--anti-affinity", f"{HUNGRY},{IDLE}")
    assert r.returncode == 0, r.stderr
    a, b = where(lab, HUNGRY), where(lab, IDLE)
    assert len(a) == 1 and len(b) == 1 and set(a) != set(b)


def test_refused_migration_keeps_vm_on_source(lab, tmp_path):
    conn = libvirt.open(lc.host_of(lab, H1)["uri"])
    blocker = conn.defineXML(f"<domain type='qemu'><name>{IDLE}</name><memory unit='MiB'>64</memory>"
                             "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        uuid = libvirt.open(lc.host_of(lab, H0)["uri"]).lookupByName(IDLE).UUIDString()
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"moves": [{"vm": uuid, "name": IDLE, "source": H0, "target": H1,
                                               "reason": "test: the target already has this name"}]}))
        r = rescoin("balance", "apply", str(plan), "--hosts", hosts_arg(lab))
        print(r.stdout, r.stderr[-1000:])
        assert r.returncode == 1
        assert f"{IDLE}: {H0} -> {H1}: refused" in r.stdout and "still running on the source" in r.stdout
        assert where(lab, IDLE)[H0] == (True, True)
    finally:
        blocker.undefine()
        conn.close()
