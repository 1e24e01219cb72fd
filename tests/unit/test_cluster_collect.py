"""The collector's host contention: what a host's VMs want that it cannot give (pure, no libvirt)."""
from __future__ import annotations

import pytest

from rescoin.cluster.collect import contention
from rescoin.cluster.model import VmInfo


def vm(used: float, forecast: float, unserved: float = 0.0, cpu_unserved: float = 0.0) -> VmInfo:
    return VmInfo("u", "v", "h", 2, 4096, mem_used=used, mem_forecast=forecast, mem_unserved=unserved,
                  cpu_unserved=cpu_unserved)


def test_a_host_that_serves_every_vm_within_its_memory_has_none():
    assert contention([vm(1000, 1100), vm(500, 550)], cpus=4, mem=4096, reserve=512) == 0.0
    assert contention([], cpus=4, mem=4096, reserve=0) == 0.0


def test_resident_memory_past_the_host_counts_even_when_no_vm_reports_a_shortfall():
    """The declared-capacity host of the lab: guests fine so far, but their footprint does not fit."""
    got = contention([vm(300, 330), vm(200, 220)], cpus=2, mem=300, reserve=0)
    assert got == pytest.approx(200 / 500)
    assert contention([vm(300, 330)], cpus=2, mem=400, reserve=200) == pytest.approx(100 / 300)


def test_unserved_memory_and_cpu_count_and_the_share_is_clipped():
    assert contention([vm(100, 200, unserved=50)], cpus=4, mem=4096, reserve=0) == pytest.approx(0.25)
    assert contention([vm(100, 200, cpu_unserved=2.0)], cpus=4, mem=4096, reserve=0) == pytest.approx(0.5)
    assert contention([vm(100, 200, cpu_unserved=9.0)], cpus=4, mem=4096, reserve=0) == 1.0


def test_the_cpu_forecast_is_the_peak_of_the_last_rounds():
    from rescoin.cluster.collect import CPU_PEAK_ROUNDS, cpu_peak

    recent: tuple[float, ...] = ()
    for rate in (0.2, 3.0, 0.1):
        recent = cpu_peak(recent, rate)
    assert max(recent) == 3.0  # a burst two rounds ago still counts
    for _ in range(CPU_PEAK_ROUNDS - 1):
        recent = cpu_peak(recent, 0.1)
    assert len(recent) == CPU_PEAK_ROUNDS and max(recent) == 0.1  # and is forgotten after the window
