"""No policy beats the oracle on slices of the shared trace (satisfaction, worst-off, violations)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rescoin.offline.simulate import DEFAULT_POLICIES, SimSettings, simulate

TRACE = Path("/work/shared/traces/bitbrains_rnd")
SLICES = [(off, oc) for off in (0, 100) for oc in (1.5, 3.0, {"cpu": 4.0, "memory": 2.0})]


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
