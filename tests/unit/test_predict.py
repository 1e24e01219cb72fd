"""Predictors: EWMA, FUSD, padding, under-estimation correction, model files (DESIGN section 6)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.history import History
from rescoin.core.predict import (
    LastValue,
    PaddedEWMA,
    PredictorParams,
    default_predictor,
    ewma,
    load_model,
    make_predictor,
)
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, Resource

MODELS = Path(__file__).resolve().parents[2] / "models"


def run(kit, predictor, series, signals=None, uuids=None):
    """Feed per-period usage ``(n, N_RES)`` arrays through a History; return the forecasts."""
    series = [np.asarray(s, dtype=float) for s in series]
    n = series[0].shape[0]
    vms = kit.vms(n, uuids=uuids)
    h = History(window=60)
    out = []
    for t, u in enumerate(series):
        sig = None if signals is None else signals[t]
        h.push(kit.obs(vms, u, [8.0, 8192.0, 1000.0, 1000.0], signal=sig, ts=300.0 * t))
        out.append(predictor.predict(h))
    return out


def column(values, r=CPU, n=1):
    """Per-period arrays with ``values`` in column ``r`` (same value for every VM)."""
    out = []
    for v in values:
        a = np.zeros((n, N_RES))
        a[:, r] = v
        out.append(a)
    return out


# -- EWMA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,alpha", [(CPU, 0.7), (MEMORY, 0.8), (DISK, 0.8)])
def test_ewma_point_is_the_recursion_with_rescoin_alpha(kit, r, alpha):
    xs = [2.0, 4.0, 1.0, 1.0, 3.0, 0.0, 5.0]
    fcs = run(kit, ewma(), column(xs, r))
    level = xs[0]
    for t, x in enumerate(xs):
        if t > 0:
            level = level + alpha * (x - level)
        assert fcs[t].point[0, r] == pytest.approx(level, rel=1e-12)


def test_plain_ewma_value_is_the_ewma(kit):
    # no padding, no correction: what the policies plan on is the EWMA itself
    xs = [2.0, 4.0, 1.0, 1.0, 3.0]
    fcs = run(kit, ewma(), column(xs))
    level = xs[0]
    for t, x in enumerate(xs):
        if t > 0:
            level = level + 0.7 * (x - level)
        assert fcs[t].value[0, CPU] == pytest.approx(level, rel=1e-12), f"period {t}"


def test_ewma_is_vectorised_over_vms(kit):
    a = [np.array([[1.0] * N_RES, [10.0] * N_RES]), np.array([[3.0] * N_RES, [0.0] * N_RES])]
    fcs = run(kit, ewma(), a)
    np.testing.assert_allclose(fcs[1].point[0, CPU], 1 + 0.7 * 2)
    np.testing.assert_allclose(fcs[1].point[1, CPU], 10 - 0.7 * 10)
    np.testing.assert_allclose(fcs[1].point[1, MEMORY], 10 - 0.8 * 10)


# -- FUSD ---------------------------------------------------------------------------------------


def test_fusd_rises_faster_than_it_falls(kit):
    p = PaddedEWMA({Resource.CPU: PredictorParams(alpha_up=0.8, alpha_down=0.2)})
    up = run(kit, p, column([0.0, 10.0]))
    down = run(kit, PaddedEWMA({Resource.CPU: PredictorParams(alpha_up=0.8, alpha_down=0.2)}), column([10.0, 0.0]))
    assert up[1].point[0, CPU] == pytest.approx(8.0)  # 0 + 0.8 * 10
    assert down[1].point[0, CPU] == pytest.approx(8.0)  # 10 - 0.2 * 10
    assert (up[1].point[0, CPU] - 0.0) > (10.0 - down[1].point[0, CPU])


def test_default_model_is_fast_up_slow_down(kit):
    rise = run(kit, default_predictor(), column([1.0, 1.0, 5.0]))[-1].point[0, CPU] - 1.0
    fall = 5.0 - run(kit, default_predictor(), column([5.0, 5.0, 1.0]))[-1].point[0, CPU]
    assert rise > fall > 0


# -- under-estimation correction -----------------------------------------------------------


def test_unmet_signal_grows_estimate_by_growth_each_period(kit):
    g = 1.5
    p = PaddedEWMA({Resource.CPU: PredictorParams(growth=g)})
    sig = column([0.5] * 5)
    fcs = run(kit, p, column([2.0] * 5), signals=sig)
    values = [f.value[0, CPU] for f in fcs]
    # constant censored usage 2: the estimate is 2 x g^t while the signal stays on
    np.testing.assert_allclose(values, [2.0 * g ** (t + 1) for t in range(5)], rtol=1e-12)


def test_estimate_stops_growing_when_signal_clears(kit):
    p = PaddedEWMA({Resource.CPU: PredictorParams(growth=2.0)})
    sig = column([0.5, 0.5, 0.5, 0.0, 0.0, 0.0])
    values = [f.value[0, CPU] for f in run(kit, p, column([1.0] * 6), signals=sig)]
    assert values[2] == pytest.approx(8.0)
    assert values[3] <= values[2] and values[4] <= values[3] and values[5] <= values[4]
    assert values[5] >= 1.0  # never below the level


def test_signal_below_threshold_is_off(kit):
    p = PaddedEWMA({Resource.CPU: PredictorParams(growth=2.0, threshold=0.1)})
    fcs = run(kit, p, column([1.0] * 3), signals=column([0.05] * 3))
    assert fcs[-1].value[0, CPU] == pytest.approx(1.0)


def test_default_model_growth_from_file(kit):
    g = tomllib.loads((MODELS / "default.toml").read_text())["cpu"]["growth"]
    fcs = run(kit, default_predictor(), column([2.0] * 4), signals=column([0.9] * 4))
    v = [f.value[0, CPU] for f in fcs]
    for a, b in zip(v, v[1:], strict=False):
        assert b / a == pytest.approx(g, rel=1e-9)


# -- padding ---------------------------------------------------------------------------------------


def _pad(kit, series, **params):
    """The margin padding adds: the same predictor's value with and without padding."""
    no_pad = {k: v for k, v in params.items() if k not in ("pad_error", "pad_std")}
    with_pad = run(kit, PaddedEWMA({Resource.CPU: PredictorParams(**params)}), column(series))[-1]
    without = run(kit, PaddedEWMA({Resource.CPU: PredictorParams(**no_pad)}), column(series))[-1]
    np.testing.assert_array_equal(with_pad.point, without.point)  # padding never moves the level
    return with_pad.value[0, CPU] - without.value[0, CPU]


def test_padding_grows_with_variability(kit):
    flat = [5.0] * 12
    small = [4.0, 6.0] * 6
    big = [1.0, 9.0] * 6
    pads = [_pad(kit, s, pad_std=1.0) for s in (flat, small, big)]
    assert pads[0] == pytest.approx(0.0, abs=1e-12)
    assert 0 < pads[1] < pads[2]


def test_padding_by_hand_one_step(kit):
    # alpha 0.5, beta 0.5, pad_std 1: [0, 4] -> dev 4, var 0.5 * 16 = 8, level 2; value max(2, 4) + sqrt(8)
    assert _pad(kit, [0.0, 4.0], alpha_up=0.5, alpha_down=0.5, pad_beta=0.5, pad_std=1.0) == pytest.approx(
        np.sqrt(8.0))


def test_error_padding_after_under_prediction(kit):
    series = [1.0, 1.0, 1.0, 6.0]
    assert _pad(kit, series, pad_error=1.0) > 0.0
    assert _pad(kit, series) == pytest.approx(0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 100.0, allow_subnormal=False), min_size=2, max_size=12), st.floats(0.1, 10.0))
def test_forecast_scales_with_usage(kit, xs, k):
    """Every part (level, error and burst padding) is in the usage's own unit."""
    make = lambda: PaddedEWMA({r: PredictorParams(alpha_up=0.6, alpha_down=0.3, pad_error=1.0, pad_std=2.0)  # noqa: E731
                               for r in Resource})
    a = run(kit, make(), column(xs))[-1]
    b = run(kit, make(), column([k * x for x in xs]))[-1]
    np.testing.assert_allclose(b.value[0, CPU], k * a.value[0, CPU], rtol=1e-9, atol=1e-9)
    assert a.value[0, CPU] >= a.point[0, CPU] - 1e-12
    assert a.value[0, CPU] >= 0


# -- VMs, rows, missing values ---------------------------------------------------------------


def test_predictor_state_follows_uuid_when_rows_reorder(kit):
    p = ewma()
    vms_ab = kit.vms(2, uuids=["a", "b"])
    vms_ba = kit.vms(2, uuids=["b", "a"])
    h = History(window=10)
    cap = [8.0, 8192.0, 1000.0, 1000.0]
    for t in range(3):
        u = np.array([[1.0] * N_RES, [10.0] * N_RES])
        h.push(kit.obs(vms_ab, u, cap, ts=300.0 * t))
        p.predict(h)
    u = np.array([[10.0] * N_RES, [1.0] * N_RES])  # b first now
    h.push(kit.obs(vms_ba, u, cap, ts=900.0))
    f = p.predict(h)
    assert f.point[0, CPU] == pytest.approx(10.0)
    assert f.point[1, CPU] == pytest.approx(1.0)


def test_new_vm_starts_from_its_first_usage(kit):
    p = ewma()
    h = History(window=10)
    cap = [8.0, 8192.0, 1000.0, 1000.0]
    h.push(kit.obs(kit.vms(1, uuids=["a"]), np.full((1, N_RES), 5.0), cap))
    p.predict(h)
    h.push(kit.obs(kit.vms(2, uuids=["a", "new"]), np.array([[5.0] * N_RES, [3.0] * N_RES]), cap, ts=300))
    f = p.predict(h)
    assert f.point[1, CPU] == pytest.approx(3.0)


def test_unknown_usage_gives_unknown_forecast(kit):
    u = np.full((1, N_RES), np.nan)
    f = run(kit, ewma(), [u])[-1]
    assert np.isnan(f.value).all()


def test_last_value(kit):
    fcs = run(kit, LastValue(), column([1.0, 7.0, 3.0]))
    assert [f.value[0, CPU] for f in fcs] == [1.0, 7.0, 3.0]


# -- model files --------------------------------------------------------------------------------


def test_default_model_loads_with_file_values():
    data = tomllib.loads((MODELS / "default.toml").read_text())
    p = load_model(MODELS / "default.toml")
    for key, table in data.items():
        if not isinstance(table, dict):
            continue
        r = Resource.parse(key)
        for name, value in table.items():
            assert getattr(p.params[r], name) == pytest.approx(value), f"{key}.{name}"
    assert default_predictor().params == p.params


def test_make_predictor_names(tmp_path):
    assert isinstance(make_predictor("default"), PaddedEWMA)
    assert isinstance(make_predictor("ewma"), PaddedEWMA)
    assert isinstance(make_predictor("last"), LastValue)
    assert make_predictor("none") is None
    f = tmp_path / "m.toml"
    f.write_text("[cpu]\nalpha_up = 0.5\n")
    assert make_predictor(str(f)).params[Resource.CPU].alpha_up == 0.5


@pytest.mark.parametrize(
    "text",
    [
        "[cpu\nalpha_up = ",  # bad TOML
        "[cpu]\nalpha_upp = 0.5\n",  # unknown key
        "[gpu]\nalpha_up = 0.5\n",  # unknown resource
        "[cpu]\nalpha_up = 1.5\n",  # out of range
        "[cpu]\nalpha_down = 0.0\n",  # out of range
        "[memory]\npad_beta = -0.1\n",
        "[cpu]\ngrowth = 0.5\n",  # growth below 1 would shrink under pressure
        "[cpu]\npad_std = -1\n",
        "[cpu]\nthreshold = 1.0\n",
        "[cpu]\nalpha_up = \"fast\"\n",
        "cpu = 0.5\n",  # not a table
    ],
)
def test_load_model_errors_name_the_file(tmp_path, text):
    f = tmp_path / "broken-model.toml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_model(f)
    assert "broken-model.toml" in str(e.value)


def test_load_model_unknown_key_is_named(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[cpu]\nalpha_upp = 0.5\n")
    with pytest.raises(ValueError, match="alpha_upp"):
        load_model(f)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "absent.toml")
    assert "absent.toml" in str(e.value)


def test_load_model_partial_file_keeps_defaults(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('name = "mine"\n[net]\ngrowth = 2.0\n')
    p = load_model(f)
    assert p.name == "mine"
    assert p.params[Resource.NET].growth == 2.0
    assert p.params[Resource.CPU] == PredictorParams()


def test_model_file_per_vm_tables_apply_to_those_vms_only(kit, tmp_path):
    # uuid-1 (by UUID) and the VM named name-uuid-2 (by name) follow jumps at once; uuid-0 keeps the slow default
    model = tmp_path / "m.toml"
    model.write_text(
        '[cpu]\nalpha_up = 0.1\nalpha_down = 0.1\n'
        '[vm."uuid-1".cpu]\nalpha_up = 1.0\n'
        '[vm."name-uuid-2".cpu]\nalpha_up = 1.0\n'
        '[vm."some-other-vm".cpu]\nalpha_up = 0.5\n'  # a VM not on this host: ignored
    )
    p = load_model(model)
    fcs = run(kit, p, column([1.0, 5.0], n=3))
    np.testing.assert_allclose(fcs[-1].point[:, CPU], [1.4, 5.0, 5.0])
    assert p.per_vm["uuid-1"][Resource.CPU].alpha_down == 0.1  # unlisted keys come from [cpu]
    # a VM set that changes between periods gets its rows rebuilt
    again = run(kit, p, column([1.0, 5.0], n=2), uuids=["uuid-1", "uuid-9"])
    np.testing.assert_allclose(again[-1].point[:, CPU], [5.0, 1.4])


@pytest.mark.parametrize("text, words", [
    ('[vm."a".cpu]\nalpha_up = 2.0\n', "vm.a.cpu.alpha_up"),
    ('[vm."a".cpu]\nnope = 1\n', "unknown parameter"),
    ('[vm."a".memory]\nseason = 12\n', "cannot differ per VM"),
    ('vm = 3\n', 'vm must hold tables'),
    ('[vm."a".disc]\nalpha_up = 0.5\n', 'vm."a".disc'),
])
def test_model_file_bad_per_vm_table_names_it(tmp_path, text, words):
    model = tmp_path / "m.toml"
    model.write_text(text)
    with pytest.raises(ValueError, match="m.toml") as e:
        load_model(model)
    assert words in str(e.value)


def test_per_vm_rows_are_reused_for_an_equal_vm_set_and_rebuilt_when_it_changes(kit, tmp_path):
    model = tmp_path / "m.toml"
    model.write_text('[cpu]\nalpha_up = 0.1\n[vm."uuid-1".cpu]\nalpha_up = 1.0\n')
    p = load_model(model)
    h = History(window=10)
    cap = [8.0, 8192.0, 1000.0, 1000.0]
    h.push(kit.obs(kit.vms(2), np.zeros((2, N_RES)), cap))
    first = p._per_row(h)
    h.push(kit.obs(kit.vms(2), np.zeros((2, N_RES)), cap))  # a new VMSet object, same VMs (as libvirt gives)
    assert p._per_row(h) is first
    h.push(kit.obs(kit.vms(2, uuids=["uuid-1", "uuid-0"]), np.zeros((2, N_RES)), cap))  # reordered
    again = p._per_row(h)
    assert again is not first and again["alpha_up"][:, CPU].tolist() == [1.0, 0.1]


def test_from_rows_gives_each_row_its_own_parameters(kit):
    # row 0 follows a jump at once, row 1 moves a tenth of the way: as two separate predictors would
    base = {Resource.CPU: PredictorParams(alpha_up=0.5, alpha_down=0.5)}
    rows = {"alpha_up": np.array([[1.0] * N_RES, [0.1] * N_RES])}
    fcs = run(kit, PaddedEWMA.from_rows(base, rows), column([1.0, 5.0], n=2))
    np.testing.assert_allclose(fcs[-1].point[:, CPU], [5.0, 1.4])


@pytest.mark.parametrize("rows, words", [
    ({"season": np.zeros((2, N_RES))}, "cannot differ per row"),
    ({"alpha_up": np.ones((2, N_RES)), "pad_std": np.ones((3, N_RES))}, "must all be"),
    ({"alpha_up": np.ones(N_RES)}, "must all be"),
])
def test_from_rows_refuses_rows_it_cannot_use(rows, words):
    with pytest.raises(ValueError, match=words):
        PaddedEWMA.from_rows({}, rows)
