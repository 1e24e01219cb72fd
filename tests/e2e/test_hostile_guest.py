"""End-to-end: a guest whose agent lies cannot take memory from honest guests.

Three real QEMU guests under libvirtd; the daemon runs as a subprocess. Guest 0's
agent is switched to the test hook ``lie``: it claims MemAvailable at 1% of
MemTotal, memory PSI at 90% and racing swap-in and major faults, while the
guest is idle. The host's own balloon statistics say otherwise, so the liar
must not grow to its maximum, and the honest guests keep their use plus the
guard's reserve. Everything is read back from libvirt and from the honest
guests' own agents.
"""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test` (scripts/setup-host)")

from raw_agent import agent_request  # noqa: E402  (tests/e2e/raw_agent.py)
from test_real_vms import PERIOD, Daemon, agent, balloon_mib, conn, dom, wait_for  # noqa: E402,F401 - conn: fixture

from rescoin import lab  # noqa: E402
from rescoin.core.guard import GuardConfig  # noqa: E402

SPECS = ["idle", "mem:hold:96", "idle"]  # 0: the liar (idle); 1, 2: honest
NAMES = [f"{lab.LAB_PREFIX}{i}" for i in range(len(SPECS))]
START_MIB, MAX_MIB = 288, 512
HOST_MEMORY = 960  # MiB the guests share: 320 each, well under the liar's maximum


@pytest.fixture(scope="module")
def guests(conn):  # noqa: F811 - the fixture imported above
    lab.SCENARIOS["hostile"] = SPECS
    names = lab.lab_up(vms=len(SPECS), scenario="hostile", memory_mib=START_MIB, max_memory_mib=MAX_MIB)
    # the guests boot with their balloons at the maximum: start them where the liar has room to grow
    for n in names:
        dom(conn, n).setMemoryFlags(START_MIB * 1024, 0)
    for n in names:
        wait_for(f"{n}'s balloon at {START_MIB} MiB", lambda n=n: balloon_mib(conn, n) <= START_MIB + 1, timeout=30)
    yield names
    lab.lab_down()


def used_mib(name: str) -> float | None:
    """What an honest guest's own agent says it uses (MemTotal - MemAvailable)."""
    mem = (agent(name) or {}).get("mem", {})
    if "total_kib" not in mem or "available_kib" not in mem:
        return None
    return (mem["total_kib"] - mem["available_kib"]) / 1024.0


def test_lying_agent_neither_reaches_its_maximum_nor_squeezes_honest_guests(conn, guests, tmp_path):  # noqa: F811
    liar, honest = NAMES[0], NAMES[1:]
    reply = agent_request(lab.SOCKET_DIR / f"{liar}.agent", op="chaos", mode="lie", timeout=5.0)
    assert reply and reply.get("chaos") == "lie", reply
    daemon = Daemon(tmp_path, "--host-memory", str(HOST_MEMORY))
    g = GuardConfig()
    try:
        wait_for("the daemon's first periods", lambda: daemon.periods() >= 2, timeout=60)
        liar_top = 0.0
        short: list[str] = []
        end = time.monotonic() + 12 * PERIOD  # the unguarded liar reached its maximum in about 3 periods
        while time.monotonic() < end:
            liar_top = max(liar_top, balloon_mib(conn, liar))
            for n in honest:
                use = used_mib(n)
                if use is None:
                    continue
                need = use + max(g.mem_reserve_mib, g.mem_reserve_frac * use)
                have = balloon_mib(conn, n)
                # the daemon acts on the previous period's figures: allow a little drift since then
                if have < need - 16:
                    short.append(f"{n}: balloon {have:.0f} MiB < use {use:.0f} + reserve")
            time.sleep(1.0)
        periods = daemon.periods()
    finally:
        code = daemon.stop()
    log = daemon.text()
    print(f"\nliar's balloon at most {liar_top:.0f} of {MAX_MIB} MiB over {periods} periods; "
          f"honest guests short of use + reserve {len(short)} times")
    assert code == 0, log[-3000:]
    assert periods >= 8, f"only {periods} periods ran"
    assert liar_top < MAX_MIB - 32, f"the liar's balloon reached {liar_top:.0f} of {MAX_MIB} MiB"
    assert not short, short[:5]
    assert f"VM {liar}: agent data not trusted" in log
    assert "Traceback" not in log
