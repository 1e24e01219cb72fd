"""The metrics added for an honest evaluation: weighted worst-off, raw vs padded forecast error, host swap."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.core.history import History
from rescoin.core.resources import CPU, MEMORY, N_RES
from rescoin.offline.evaluate import Metrics
from rescoin.offline.simulate import SimSettings, run_policy


def _run(kit, periods, weight=None):
    """Feed Metrics the way the replay does: push, update, decide. ``periods``: dicts of per-period facts."""
    n = periods[0]["truth"].shape[0]
    vms = kit.vms(n, sizes=np.tile([4.0, 4096.0, 100.0, 100.0], (n, 1)), weight=weight)
    h, m = History(window=10), Metrics()
    for p in periods:
        obs = kit.obs(vms, p["usage"], p.get("capacity", [4.0, 8192.0, 200.0, 200.0]), truth=p["truth"])
        obs.host_swap = p.get("swap")
        h.push(obs)
        point = p.get("point")
        forecast = None if point is None else SimpleNamespace(point=point, value=p["value"])
        step = SimpleNamespace(obs=obs, forecast=forecast, plan=SimpleNamespace(controls=obs.controls, counts=dict))
        m.update(step, h)
        ent = np.full((n, N_RES), 1e9)
        h.decide(forecast=np.full((n, N_RES), np.nan) if point is None else p["value"], allocation=ent,
                 entitlement=ent)
    return m.result()


def test_weighted_worst_off_measures_against_the_weighted_fair_share(kit):
    # two VMs want 4 cores each of 4; weights 1 and 3: weighted fair shares 1 and 3; each got 2
    truth = np.tile([4.0, 100.0, 1.0, 1.0], (2, 1))
    usage = np.tile([2.0, 100.0, 1.0, 1.0], (2, 1))
    r = _run(kit, [{"truth": truth, "usage": usage}] * 3, weight=[1.0, 3.0])["cpu"]
    assert r["worst_off"] == pytest.approx(0.5)
    # per-VM satisfaction against the fair share: min(2/1, 1) = 1 and 2/3; 5th percentile of the two
    assert r["weighted_worst_off"] == pytest.approx(np.percentile([1.0, 2.0 / 3.0], 5))
    equal = _run(kit, [{"truth": truth, "usage": usage}] * 3)["cpu"]
    assert equal["weighted_worst_off"] is None  # equal weights: the plain worst-off says it all


def test_raw_and_padded_forecast_errors_are_apart(kit):
    truth = np.array([[4.0, 1000.0, 1.0, 1.0]])
    point = np.array([[3.0, 1000.0, 1.0, 1.0]])  # the predictor's own forecast: one core short
    value = np.array([[5.0, 1200.0, 1.0, 1.0]])  # padded: one core (and 200 MiB) over
    r = _run(kit, [{"truth": truth, "usage": truth, "point": point, "value": value}] * 4)
    # the forecast made in a period is scored against the next one's demand: 3 scored periods
    assert r["cpu"]["under_error"] == pytest.approx(1.0 / 4.0)
    assert r["cpu"]["over_error"] == pytest.approx(0.0)
    assert r["cpu"]["padded_under_error"] == pytest.approx(0.0)
    assert r["cpu"]["padded_over_error"] == pytest.approx(1.0 / 4.0)
    assert r["memory"]["under_error"] == pytest.approx(0.0)
    assert r["memory"]["padded_over_error"] == pytest.approx(0.2)


def test_host_swap_is_counted_in_mib_periods_share_and_peak(kit):
    truth = np.array([[1.0, 1000.0, 1.0, 1.0]])
    periods = [{"truth": truth, "usage": truth, "swap": s} for s in (0.0, 100.0, 300.0, 0.0)]
    swap = _run(kit, periods)["host_swap"]
    assert swap == {"mib_periods": pytest.approx(400.0), "share_of_periods": pytest.approx(0.5),
                    "peak_mib": pytest.approx(300.0)}
    unknown = _run(kit, [{"truth": truth, "usage": truth}] * 2)["host_swap"]
    assert unknown == {"mib_periods": None, "share_of_periods": None, "peak_mib": None}


def test_padding_shows_as_padded_over_estimation_in_a_replay(kit):
    rng = np.random.default_rng(3)
    demand = np.zeros((60, 3, N_RES))
    demand[:, :, CPU] = rng.uniform(0.5, 1.5, (60, 3))
    demand[:, :, MEMORY] = rng.uniform(500, 900, (60, 3))
    demand[:, :, 2:] = 1.0
    trace = kit.trace(demand, np.tile([2.0, 2048.0, np.nan, np.nan], (3, 1)))
    r = run_policy(trace, "rescoin", SimSettings(overcommit=1.0))
    for res in ("cpu", "memory"):
        assert r[res]["padded_over_error"] > r[res]["over_error"]  # the padding is over the raw forecast
        assert r[res]["padded_under_error"] <= r[res]["under_error"]


def test_simulated_weights_reach_the_weighted_worst_off(kit):
    demand = np.zeros((20, 4, N_RES))
    demand[:, :, CPU] = 2.0  # 8 cores wanted of 2
    demand[:, :, MEMORY] = 100.0
    trace = kit.trace(demand, np.tile([2.0, 1024.0, np.nan, np.nan], (4, 1)))
    plain = run_policy(trace, "none", SimSettings(overcommit=4.0))["cpu"]
    assert plain["weighted_worst_off"] is None
    weighted = run_policy(trace, "none", SimSettings(overcommit=4.0, weights=(1.0, 3.0)))["cpu"]
    # equal shares give each 0.5 core; the weighted fair shares are 0.25 and 0.75: the heavy VMs get 2/3
    assert weighted["worst_off"] == pytest.approx(0.25)
    assert weighted["weighted_worst_off"] == pytest.approx(np.percentile([1, 1, 2 / 3, 2 / 3], 5))
