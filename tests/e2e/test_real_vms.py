"""End-to-end: the rescoin daemon on real QEMU guests under a real libvirtd.

Each check reads its effect back from libvirt or from inside the guest (its
agent), never from rescoin's own bookkeeping. The lab (4 tiny software-
emulated guests) is started once for the module; the daemon runs as a real
subprocess, as an operator would run it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.e2e

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test` (scripts/setup-host)")

from raw_agent import agent_request  # noqa: E402  (tests/e2e/raw_agent.py)

from rescoin import lab  # noqa: E402
from rescoin.core.guard import blkio_weights  # noqa: E402

URI = "qemu:///system"
PERIOD = 2.0
HOST_MEMORY = 1200  # MiB the lab VMs share: 4 x 512 MiB max, so rescoin must choose
DISK_KIBS = 2048  # disk bandwidth to share: the 1 MiB/s writer is more than its quarter
SPECS = [
    "mem:grow:step=16,max=320,every=2",  # 0: memory grows
    "cpu:0.9+disk:write:kibs=1024",  # 1: CPU-busy, writes to disk
    "cpu:0.9",  # 2: CPU-busy
    "idle",  # 3: idle
]
NAMES = [f"{lab.LAB_PREFIX}{i}" for i in range(len(SPECS))]


def wait_for(what: str, check, timeout: float = 90.0, every: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what} (last: {last!r})")


class Daemon:
    """``rescoin run`` as a subprocess, with its log and history directory."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.history = tmp / "history"
        self.log = tmp / "daemon.log"
        cmd = [sys.executable, "-m", "rescoin.cli", "run", "--uri", URI, "--vm-filter", f"{lab.LAB_PREFIX}*",
               "--period", str(PERIOD), "--history", str(self.history), "--host-memory", str(HOST_MEMORY),
               "--disk-kibs", str(DISK_KIBS), "--agent-timeout", "0.8", *extra]
        self.fh = open(self.log, "w")  # noqa: SIM115 - the daemon's log, open for its lifetime; closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def periods(self) -> int:
        return len(re.findall(r"period \d+:", self.text()))

    def frame(self) -> pd.DataFrame:
        files = sorted(self.history.glob("history-*.csv"))
        return pd.concat([pd.read_csv(f) for f in files]) if files else pd.DataFrame()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def conn():
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests need root (run `make e2e` as root)")
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture(scope="module")
def vms(conn):
    lab.SCENARIOS["e2e"] = SPECS
    names = lab.lab_up(vms=len(SPECS), scenario="e2e", memory_mib=512, max_memory_mib=512)
    yield names
    lab.lab_down()


def dom(conn, name):
    return conn.lookupByName(name)


def balloon_mib(conn, name) -> float:
    return dom(conn, name).info()[2] / 1024.0


def agent(name: str) -> dict | None:
    return agent_request(lab.SOCKET_DIR / f"{name}.agent", timeout=5.0)


@pytest.fixture(scope="module")
def originals(conn, vms):
    return {n: (dom(conn, n).schedulerParameters()["cpu_shares"], [tuple(p) for p in dom(conn, n).vcpuPinInfo(0)],
                dom(conn, n).info()[2]) for n in vms}


@pytest.fixture(scope="module")
def daemon(vms, originals, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon"), "--restore-on-exit")
    wait_for("the daemon's first periods", lambda: d.periods() >= 3, timeout=60)
    yield d
    d.stop()


def test_growing_guest_gets_memory_and_idle_guest_is_reclaimed(conn, vms, daemon):
    idle, grower = NAMES[3], NAMES[0]
    wait_for("the idle guest reclaimed from", lambda: balloon_mib(conn, idle) < 480)
    low = [balloon_mib(conn, grower)]
    total = [(agent(grower) or {}).get("mem", {}).get("total_kib", 0) / 1024]

    starved_at: list[float] = []
    grew_at: list[float] = []

    def grown():
        b = balloon_mib(conn, grower)
        rep = agent(grower) or {}
        mem = rep.get("mem", {})
        t = mem.get("total_kib", 0) / 1024
        psi = rep.get("psi", {}).get("memory", {}).get("some_avg10", 0.0)
        # starving as the daemon sees it: used at 95% of what the guest has, or memory pressure
        if t and not starved_at and (mem.get("available_kib", t * 1024) <= 0.05 * mem["total_kib"] or psi > 1.0):
            starved_at.append(time.monotonic())
        if not grew_at and b > low[0] + 8:
            grew_at.append(time.monotonic())
        low[0], total[0] = min(low[0], b), min(total[0], t) if t else total[0]
        return b > low[0] + 32 and t > total[0] + 16

    wait_for("balloon up and the guest's own MemTotal up (agent) for the growing guest", grown, timeout=150, every=0.5)
    assert grew_at, "the balloon never grew"
    if not starved_at or grew_at[0] <= starved_at[0]:
        print("\nstarving to balloon growth: the balloon grew before the guest starved (forecast)")
    else:
        periods = (grew_at[0] - starved_at[0]) / PERIOD
        print(f"\nstarving to balloon growth: {periods:.2f} periods ({grew_at[0] - starved_at[0]:.1f} s)")
        # two periods, plus the time one agent query and one libvirt read take here
        assert periods <= 2.0 + 1.5 / PERIOD, f"balloon grew {periods:.1f} periods after the guest starved"
    for n in vms:
        assert balloon_mib(conn, n) >= 256 - 1, f"{n} below the 256 MiB floor"
    assert balloon_mib(conn, idle) < 480


def test_busy_vcpus_never_share_one_pcpu_and_shares_follow_allocation(conn, vms, daemon):
    """Both busy guests put on pCPU 0 behind rescoin's back: it floats them (the host may run short:
    forecast load past 0.75 of the pCPUs, bench/pinning.py) or pins them apart, never leaves them stuck."""
    pcpus = conn.getInfo()[2]
    only0 = tuple(k == 0 for k in range(pcpus))
    for n in NAMES[1:3]:
        dom(conn, n).pinVcpuFlags(0, only0, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def unstuck():
        p1 = dom(conn, NAMES[1]).vcpuPinInfo(0)[0]
        p2 = dom(conn, NAMES[2]).vcpuPinInfo(0)[0]
        floating = all(p1) and all(p2)
        apart = not any(a and b for a, b in zip(p1, p2, strict=False))
        return ("floating" if floating else "apart") if floating or apart else None

    how = wait_for("busy vCPUs no longer sharing pCPU 0 alone", unstuck, timeout=90)
    print(f"\nbusy vCPUs: {how}")

    def shares_follow():
        shares = {n: dom(conn, n).schedulerParameters()["cpu_shares"] for n in vms}
        h = daemon.frame()
        cpu = h[h.resource == "cpu"]
        recent = cpu[cpu.ts >= sorted(cpu.ts.unique())[-3]]  # the shares in force were decided in one of these
        if set(vms) - set(recent.vm_name):
            return None
        # cpu_shares = 1024 x allocated cores (never below the entitlement), within the 10% dead-band
        weight = recent[["allocation", "entitlement"]].max(axis=1)
        follow = all(((weight[recent.vm_name == n] * 1024 - shares[n]).abs() <= 0.1 * shares[n] + 2).any()
                     for n in vms)
        busier = all(shares[b] > shares[NAMES[3]] for b in NAMES[1:3])
        return shares if follow and busier else None

    wait_for("cpu shares following the allocation, busy guests above the idle one", shares_follow, timeout=90)
    cpu = daemon.frame()
    cpu = cpu[cpu.resource == "cpu"]
    busy = cpu[cpu.vm_name == NAMES[1]].usage.dropna().tail(5).mean()
    assert busy > 0.3, f"the busy guest's CPU use is seen ({busy:.2f} cores)"


def test_disk_writer_gets_the_blkio_weight_its_allocation_implies(conn, vms, daemon):
    def implied():
        h = daemon.frame()
        disk = h[h.resource == "disk"]
        last = disk[disk.ts == disk.ts.max()].set_index("vm_name")
        if set(vms) - set(last.index) or last.allocation.isna().any():
            return None
        # the allocation decided in the last period, as the guard turns it into weights
        weight = np.maximum(last.allocation.to_numpy(), last.entitlement.fillna(0.0).to_numpy())
        want = dict(zip(last.index, blkio_weights(weight), strict=False))
        have = {n: dom(conn, n).blkioParameters()["weight"] for n in vms}
        close = all(abs(have[n] - want[n]) <= 0.1 * want[n] + 1 for n in vms)  # within the guard's dead-band
        return (have, want) if close and have[NAMES[1]] > have[NAMES[3]] else None

    have, want = wait_for("blkio weights as the allocations imply, the writer above the idle guest", implied,
                          timeout=90)
    h = daemon.frame()
    disk = h[h.resource == "disk"]
    writer = disk[disk.vm_name == NAMES[1]].usage.dropna().tail(5).mean()
    assert writer > 100, f"the writer's disk use is seen ({writer:.0f} KiB/s)"
    assert all(10 <= w <= 1000 for w in have.values())


def test_agent_killed_garbage_hang_loop_goes_on(conn, vms, daemon):
    sock = lab.SOCKET_DIR / f"{NAMES[3]}.agent"
    for mode in ("garbage", "hang"):
        before = daemon.periods()
        agent_request(sock, op="chaos", mode=mode, timeout=5.0)
        wait_for(f"periods going on with the agent in mode {mode}",
                 lambda before=before: daemon.periods() >= before + 3, timeout=30)
        agent_request(sock, op="chaos", mode="normal", timeout=5.0)
    before = daemon.periods()
    agent_request(sock, op="chaos", mode="exit", timeout=5.0)
    wait_for("periods going on after the agent died", lambda: daemon.periods() >= before + 3, timeout=30)
    h = daemon.frame()
    mem = h[(h.resource == "memory") & (h.vm_name == NAMES[3])].sort_values("ts")
    assert mem.usage.tail(3).notna().all(), "memory falls back to balloon statistics without the agent"
    assert "Traceback" not in daemon.text()


def test_vm_destroyed_and_started_mid_run(conn, vms, daemon):
    def names_in_last_period():
        h = daemon.frame()
        return set(h[h.ts == h.ts.max()].vm_name)

    dom(conn, NAMES[2]).destroy()
    wait_for("the destroyed VM gone from the next period", lambda: NAMES[2] not in names_in_last_period(), timeout=30)
    dom(conn, NAMES[2]).create()
    wait_for("the restarted VM back in a later period", lambda: NAMES[2] in names_in_last_period(), timeout=60)


def test_libvirtd_restart_daemon_reconnects(conn, vms, daemon):
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    time.sleep(2)
    subprocess.run(["libvirtd", "-d"], check=True)
    before = daemon.periods()
    wait_for("periods after libvirtd restarted", lambda: daemon.periods() >= before + 3, timeout=90)
    assert daemon.proc.poll() is None
    assert "reconnected" in daemon.text()


def test_sigterm_flushes_history_and_restores_originals(vms, daemon, originals):
    code = daemon.stop()
    assert code == 0, daemon.text()[-3000:]
    h = daemon.frame()
    per_period = h.groupby("ts").size()
    assert (per_period % 4 == 0).all(), "every period has complete rows (4 resources per VM)"
    assert len(per_period) >= daemon.periods() - 1
    c2 = libvirt.open(URI)
    try:
        for n in vms:
            if n == NAMES[2]:
                continue  # restarted mid-run: libvirt reset it to its defaults
            dm = c2.lookupByName(n)
            now = (dm.schedulerParameters()["cpu_shares"], [tuple(p) for p in dm.vcpuPinInfo(0)], dm.info()[2])
            assert now[0] == originals[n][0] and now[1] == originals[n][1], n
            # the guest gives its balloon back in its own time: wait for it
            wait_for(f"{n}'s balloon back to {originals[n][2]} KiB",
                     lambda dm=dm, n=n: abs(dm.info()[2] - originals[n][2]) <= 4096, timeout=30)
    finally:
        c2.close()
