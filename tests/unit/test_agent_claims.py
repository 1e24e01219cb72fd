"""Agent data is a claim: the cross-check against what the host measures (rescoin.hosts.claims)."""
from __future__ import annotations

import math

import pytest

from rescoin.hosts.claims import USED_MARGIN_FRAC, USED_MARGIN_MIB, HostMemory, cross_check

MIB = 1024  # KiB


def stats(used_mib=198.0, total_mib=480.0, rss_mib=300.0, swap_in_kib=0, major_fault=100):
    """One VM's balloon statistics as libvirt's getAllDomainStats gives them (KiB, counters)."""
    return {"balloon.current": int(total_mib * MIB), "balloon.available": int(total_mib * MIB),
            "balloon.usable": int((total_mib - used_mib) * MIB), "balloon.unused": int(50 * MIB),
            "balloon.rss": int(rss_mib * MIB), "balloon.swap_in": swap_in_kib, "balloon.major_fault": major_fault}


def test_host_memory_from_libvirt_balloon_stats():
    m = HostMemory.from_stats(stats())
    assert m.used_mib == pytest.approx(198.0) and m.rss_mib == pytest.approx(300.0)
    assert (m.swap_in_kib, m.major_faults) == (0, 100)
    # an older guest without "usable": used = available - unused
    old = {k: v for k, v in stats().items() if k != "balloon.usable"}
    assert HostMemory.from_stats(old).used_mib == pytest.approx(430.0)
    none = HostMemory.from_stats({})
    assert all(math.isnan(x) for x in (none.used_mib, none.rss_mib, none.swap_in_kib, none.major_faults))


def test_lying_agent_is_capped_at_what_the_host_sees():
    # idle guest using 198 MiB claims 475 of 480 MiB used and 90% memory pressure
    before, now = HostMemory.from_stats(stats()), HostMemory.from_stats(stats(major_fault=104))
    c = cross_check(475.0, 0.9, now, before, 2.0)
    assert c.used_mib == pytest.approx(198.0 + USED_MARGIN_MIB + USED_MARGIN_FRAC * 198.0)
    assert c.signal < 0.01  # 2 major faults/s: no pressure the host can see
    assert c.confirmed
    assert "claims 475 MiB used, the host sees 198 MiB" in c.note and "pressure 0.90" in c.note


def test_honest_agent_passes_unchanged():
    before = HostMemory.from_stats(stats(swap_in_kib=0, major_fault=0))
    now = HostMemory.from_stats(stats(swap_in_kib=8 * MIB, major_fault=4000))  # real swapping: 1 MiB/s ...
    c = cross_check(205.0, 0.3, now, before, 2.0)  # ... and 2000 major faults/s
    assert c.used_mib == 205.0  # within the margin of the host's 198
    assert c.signal == 0.3  # the host's counters show at least as much pressure
    assert c.confirmed and c.note == ""


def test_pressure_is_backed_when_the_host_sees_the_guest_nearly_full():
    # no swap, no major faults (rootfs in RAM), but the balloon statistics show 460 of 480 MiB used
    before = HostMemory.from_stats(stats(used_mib=455.0, rss_mib=500.0))
    now = HostMemory.from_stats(stats(used_mib=460.0, rss_mib=500.0))
    c = cross_check(465.0, 0.4, now, before, 2.0)
    assert (c.used_mib, c.signal, c.confirmed, c.note) == (465.0, 0.4, True, "")


def test_rss_bounds_the_claim_without_balloon_usage():
    # no usable/unused figures (balloon driver without stats): the QEMU process's resident memory bounds
    now = HostMemory.from_stats({"balloon.rss": 250 * MIB})
    c = cross_check(475.0, math.nan, now, None, 2.0)
    assert c.used_mib == pytest.approx(250.0 + USED_MARGIN_MIB + USED_MARGIN_FRAC * 250.0)
    assert not c.confirmed  # bounded from above, but nothing the host saw backs the figure itself


def test_what_the_host_cannot_check_is_unconfirmed():
    nothing = HostMemory.from_stats({})
    c = cross_check(475.0, 0.9, nothing, nothing, 2.0)
    assert (c.used_mib, c.signal, c.confirmed) == (475.0, 0.9, False)
    # no counters yet (first period): a pressure claim cannot be backed
    assert not cross_check(100.0, 0.5, HostMemory.from_stats(stats()), None, 2.0).confirmed
    # no claim at all is nothing to confirm
    assert cross_check(math.nan, math.nan, nothing, None, 2.0).confirmed


def test_counter_reset_says_nothing():
    before = HostMemory.from_stats(stats(major_fault=10**6))
    now = HostMemory.from_stats(stats(major_fault=5))  # guest rebooted
    c = cross_check(150.0, 0.8, now, before, 2.0)
    assert c.signal == 0.8 and not c.confirmed
