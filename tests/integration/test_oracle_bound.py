"""No policy beats the oracle on slices of the shared trace (satisfaction, worst-off, violations)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rescoin.offline.simulate import DEFAULT_POLICIES, SimSettings, simulate

TRACE = Path("/work/shared/traces/bitbrains_rnd")
FACTORS = (1.5, 3.0, {"cpu": 4.0, "memory": 2.0}, {"cpu": 6.0, "memory": 1.0}, {"cpu": 8.0, "memory": 1.0})
SLICES = [(off, oc) for off in (0, 100) for oc in FACTORS]


@pytest.mark.slow
@pytest.mark.skipif(not TRACE.is_dir(), reason="the shared trace is not on this machine")
@pytest.mark.parametrize(("offset", "overcommit"), SLICES)
def test_no_policy_beats_the_oracle(offset, overcommit):
    from rescoin.offline.traces import load_trace

    trace = load_trace(str(TRACE), vms=30, vm_offset=offset, days=1, start_day=0)
    res = simulate(trace, DEFAULT_POLICIES, SimSettings(overcommit=overcommit))["policies"]
    o = res["oracle"]
    for r in ("cpu", "memory"):
        assert o[r]["breaches"] == 0.0
        for name, m in res.items():
            assert m[r]["satisfaction"] <= o[r]["satisfaction"] + 1e-9, (name, r)
            assert m[r]["worst_off"] <= o[r]["worst_off"] + 1e-9, (name, r)
            assert m[r]["violations"] >= o[r]["violations"] - 1e-9, (name, r)


@pytest.mark.slow
@pytest.mark.skipif(not TRACE.is_dir(), reason="the shared trace is not on this machine")
@pytest.mark.parametrize(("offset", "start", "days", "cpu"), [(175, 15, 2, 6.0), (175, 15, 2, 8.0), (212, 18, 7, 8.0)])
def test_the_oracle_bounds_cpu_violations_where_cpu_is_short(offset, start, days, cpu):
    """100 VMs of the evaluation part where CPU is short: the line-first oracle had more CPU violations
    than ``none`` at 175:15, the spreading one a lower worst-off at 212:18 (0.99987 against 0.99998)."""
    from rescoin.offline.traces import load_trace

    trace = load_trace(str(TRACE), vms=100, vm_offset=offset, days=days, start_day=start)
    res = simulate(trace, ["none", "static", "mom", "drf", "oracle"],
                   SimSettings(overcommit={"cpu": cpu, "memory": 1.0}))["policies"]
    o = res["oracle"]["cpu"]
    assert o["violations"] > 0.0, "CPU was not short: the test shows nothing"
    for name, m in res.items():
        assert m["cpu"]["violations"] >= o["violations"] - 1e-9, name
        assert m["cpu"]["worst_off"] <= o["worst_off"] + 1e-9, name
        assert m["cpu"]["satisfaction"] <= o["satisfaction"] + 1e-9, name
