"""History ring buffers keyed by UUID, snapshots, and the history CSV (DESIGN section 5)."""
from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.history import SERIES, History
from rescoin.core.predict import default_predictor
from rescoin.core.resources import CPU, MEMORY, N_RES
from rescoin.offline.historycsv import HistoryWriter, read_history
from rescoin.offline.simulate import SimSettings, build_loop

CAP = [8.0, 8192.0, 1000.0, 1000.0]
#: DESIGN section 5, in order
CSV_COLUMNS = ["ts", "host", "vm_uuid", "vm_name", "resource", "usage", "forecast", "allocation",
               "entitlement", "credit", "signal"]


def push(kit, h, uuids, values, t):
    """Push one period in which VM ``uuids[i]`` used ``values[i]`` of every resource."""
    vms = kit.vms(len(uuids), uuids=list(uuids))
    u = np.repeat(np.asarray(values, float)[:, None], N_RES, axis=1).reshape(len(uuids), N_RES)
    h.push(kit.obs(vms, u, CAP, ts=300.0 * t))


def col(h, name, k, uuid):
    """The last k values of one VM's CPU column, oldest first."""
    row = list(h.vms.uuids).index(uuid)
    return h.last(name, k)[:, row, CPU]


# -- ring buffer --------------------------------------------------------------------------------


def test_window_must_be_at_least_two():
    with pytest.raises(ValueError):
        History(window=1)


def test_ring_keeps_last_window_oldest_first(kit):
    h = History(window=3)
    for t in range(5):
        push(kit, h, ["a"], [t + 1.0], t)
    np.testing.assert_array_equal(col(h, "usage", 3, "a"), [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(col(h, "usage", 2, "a"), [4.0, 5.0])
    assert h.last("usage", 10).shape == (3, 1, N_RES)  # never more than the window
    assert h.last("usage", 0).shape == (0, 1, N_RES)
    assert h.latest("usage")[0, CPU] == 5.0
    np.testing.assert_array_equal(h.ts[np.argsort(h.ts)], [600.0, 900.0, 1200.0])


def test_last_before_window_fills(kit):
    h = History(window=5)
    push(kit, h, ["a"], [1.0], 0)
    push(kit, h, ["a"], [2.0], 1)
    np.testing.assert_array_equal(col(h, "usage", 5, "a"), [1.0, 2.0])


def test_new_vm_gets_nan_history(kit):
    h = History(window=4)
    push(kit, h, ["a"], [1.0], 0)
    push(kit, h, ["a"], [2.0], 1)
    push(kit, h, ["a", "b"], [3.0, 30.0], 2)
    got = col(h, "usage", 3, "b")
    assert np.isnan(got[:2]).all() and got[2] == 30.0
    np.testing.assert_array_equal(col(h, "usage", 3, "a"), [1.0, 2.0, 3.0])
    for name in SERIES:
        assert np.isnan(h.last(name, 3)[:2, 1]).all()


def test_vanished_vm_drops_out(kit):
    h = History(window=4)
    push(kit, h, ["a", "b"], [1.0, 10.0], 0)
    push(kit, h, ["a", "b"], [2.0, 20.0], 1)
    push(kit, h, ["b"], [30.0], 2)
    assert h.n == 1
    assert list(h.vms.uuids) == ["b"]
    np.testing.assert_array_equal(col(h, "usage", 3, "b"), [10.0, 20.0, 30.0])


def test_returning_vm_is_new(kit):
    h = History(window=5)
    push(kit, h, ["a", "b"], [1.0, 10.0], 0)
    push(kit, h, ["b"], [20.0], 1)
    push(kit, h, ["a", "b"], [3.0, 30.0], 2)
    got = col(h, "usage", 3, "a")
    assert np.isnan(got[:2]).all() and got[2] == 3.0


def test_rows_follow_uuid_when_order_changes(kit):
    h = History(window=4)
    push(kit, h, ["a", "b", "c"], [1.0, 2.0, 3.0], 0)
    push(kit, h, ["c", "a", "b"], [30.0, 10.0, 20.0], 1)
    push(kit, h, ["b", "c", "a"], [200.0, 300.0, 100.0], 2)
    assert list(h.vms.uuids) == ["b", "c", "a"]
    np.testing.assert_array_equal(col(h, "usage", 3, "a"), [1.0, 10.0, 100.0])
    np.testing.assert_array_equal(col(h, "usage", 3, "b"), [2.0, 20.0, 200.0])
    np.testing.assert_array_equal(col(h, "usage", 3, "c"), [3.0, 30.0, 300.0])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.permutations(["a", "b", "c", "d", "e"]).flatmap(
    lambda p: st.integers(0, 5).map(lambda k: p[:k])), min_size=1, max_size=12), st.integers(2, 5))
def test_rows_follow_uuids_property(kit, periods, window):
    """Each VM's history is exactly what it used in its current run of presence."""
    h = History(window=window)
    run: dict[str, list[tuple[int, float]]] = {}
    for t, present in enumerate(periods):
        run = {u: run.get(u, []) for u in present}  # absent VMs lose their history
        vals = [100.0 * t + ord(u) for u in present]
        for u, v in zip(present, vals, strict=False):
            run[u].append((t, v))
        push(kit, h, present, vals, t)
        assert list(h.vms.uuids) == list(present)
        k = min(t + 1, window)
        for u in present:
            expect = np.full(k, np.nan)
            for tt, v in run[u]:
                i = tt - (t + 1 - k)
                if i >= 0:
                    expect[i] = v
            np.testing.assert_array_equal(col(h, "usage", k, u), expect)


def test_age_counts_periods_since_first_seen(kit):
    h = History(window=5)
    push(kit, h, ["a"], [1.0], 0)
    np.testing.assert_array_equal(h.age, [0])
    push(kit, h, ["a", "b"], [1.0, 1.0], 1)
    # like Observation.age: 0 = new this period
    np.testing.assert_array_equal(h.age, [1, 0])
    push(kit, h, ["b", "a"], [1.0, 1.0], 2)
    np.testing.assert_array_equal(h.age, [1, 2])


# -- per-VM state and pending decisions ----------------------------------------------------------


def test_state_follows_rows(kit):
    h = History(window=4)
    push(kit, h, ["a", "b"], [1.0, 2.0], 0)
    s = h.state("test.x", shape=(), fill=-1.0)
    s[:] = [10.0, 20.0]
    push(kit, h, ["c", "b", "a"], [0.0, 0.0, 0.0], 1)
    np.testing.assert_array_equal(h.state("test.x", shape=(), fill=-1.0), [-1.0, 20.0, 10.0])
    push(kit, h, ["a"], [0.0], 2)
    np.testing.assert_array_equal(h.state("test.x", shape=(), fill=-1.0), [10.0])


def test_state_default_shape_and_fill(kit):
    h = History(window=4)
    push(kit, h, ["a", "b"], [1.0, 2.0], 0)
    s = h.state("test.y")
    assert s.shape == (2, N_RES) and np.isnan(s).all()


def test_pending_decisions_follow_rows(kit):
    h = History(window=4)
    push(kit, h, ["a", "b"], [1.0, 2.0], 0)
    f = np.array([[5.0] * N_RES, [7.0] * N_RES])
    h.decide(forecast=f, allocation=f * 2, entitlement=f * 3)
    push(kit, h, ["b", "new", "a"], [0.0, 0.0, 0.0], 1)
    fc = h.latest("forecast")[:, CPU]
    assert fc[0] == 7.0 and np.isnan(fc[1]) and fc[2] == 5.0
    assert h.latest("allocation")[2, CPU] == 10.0
    assert h.latest("entitlement")[0, CPU] == 21.0


def test_decide_rejects_unknown_series(kit):
    h = History(window=4)
    push(kit, h, ["a"], [1.0], 0)
    with pytest.raises(KeyError):
        h.decide(bogus=np.zeros((1, N_RES)))


# -- snapshot / restore ------------------------------------------------------------------------------


def _busy_history(kit):
    h = History(window=4)
    p = default_predictor()
    rng = np.random.default_rng(3)
    for t in range(6):
        uuids = ["a", "b", "c"] if t < 3 else ["c", "a"]
        vms = kit.vms(len(uuids), uuids=uuids)
        u = rng.uniform(0, 4, (len(uuids), N_RES))
        h.push(kit.obs(vms, u, CAP, signal=rng.uniform(0, 0.2, (len(uuids), N_RES)), ts=300.0 * t))
        f = p.predict(h)
        h.decide(forecast=f.value, allocation=f.value * 1.1, entitlement=np.ones_like(u))
    return h


def _assert_same(h, h2):
    assert h2.window == h.window and h2.t == h.t
    assert list(h2.vms.uuids) == list(h.vms.uuids)
    np.testing.assert_array_equal(h2.ts, h.ts)
    np.testing.assert_array_equal(h2.age, h.age)
    for name in SERIES:
        np.testing.assert_array_equal(h2.last(name, h.window), h.last(name, h.window))
    for name in h.pending:
        np.testing.assert_array_equal(h2.pending[name], h.pending[name])


def test_snapshot_restore_round_trip(kit):
    h = _busy_history(kit)
    snap = {k: np.array(v, copy=True) for k, v in h.snapshot().items()}
    h2 = History.restore(snap)
    _assert_same(h, h2)
    # both go on identically: same predictor state, same realignment
    vms = kit.vms(3, uuids=["a", "c", "z"])
    u = np.full((3, N_RES), 2.5)
    for hist in (h, h2):
        hist.push(kit.obs(vms, u, CAP, ts=9999.0))
    _assert_same(h, h2)
    f1, f2 = default_predictor().predict(h), default_predictor().predict(h2)
    np.testing.assert_array_equal(f1.value, f2.value)
    np.testing.assert_array_equal(f1.point, f2.point)


def test_snapshot_survives_savez(kit):
    h = _busy_history(kit)
    buf = io.BytesIO()
    np.savez(buf, **h.snapshot())
    buf.seek(0)
    with np.load(buf) as data:
        h2 = History.restore(dict(data.items()))
    _assert_same(h, h2)
    np.testing.assert_array_equal(default_predictor().predict(h).value, default_predictor().predict(h2).value)


def test_snapshot_is_not_changed_by_later_periods(kit):
    """A snapshot is the state at the time it was taken."""
    h = _busy_history(kit)
    snap = h.snapshot()
    frozen = {k: np.array(v, copy=True) for k, v in snap.items()}
    vms = kit.vms(2, uuids=["c", "a"])  # same VMs, same order: rings are written in place
    h.push(kit.obs(vms, np.full((2, N_RES), 123.0), CAP, ts=5000.0))
    default_predictor().predict(h)
    for k, v in frozen.items():
        np.testing.assert_array_equal(snap[k], v, err_msg=f"snapshot[{k!r}] changed after a later push")


def test_restored_history_is_independent_of_the_original(kit):
    h = _busy_history(kit)
    h2 = History.restore(h.snapshot())
    before = h2.last("usage", h2.window).copy()
    vms = kit.vms(2, uuids=["c", "a"])
    h.push(kit.obs(vms, np.full((2, N_RES), 123.0), CAP, ts=5000.0))
    np.testing.assert_array_equal(h2.last("usage", h2.window), before)


# -- history CSV -----------------------------------------------------------------------------------

MIDNIGHT = 1375315200.0  # 2013-08-01 00:00:00 UTC


def _run_and_write(kit, tmp_path, start, periods=4, n=3, vm_ids=None, host="host-1"):
    rng = np.random.default_rng(11)
    demand = rng.uniform(0.1, 1.5, (periods, n, N_RES))
    demand[:, :, MEMORY] *= 1000
    demand[:, 0, 2] = np.nan  # an unknown value becomes an empty cell
    sizes = np.tile([2.0, 2048.0, np.nan, np.nan], (n, 1))
    trace = kit.trace(demand, sizes, start=start)
    if vm_ids is not None:
        trace.vm_ids = vm_ids
    loop = build_loop(trace, "rescoin", SimSettings())
    expected = []
    with HistoryWriter(tmp_path, host) as w:
        for step in loop.steps():
            w.write(step, loop.history)
            h = loop.history
            # credit (DESIGN 7): sum over the last 10 periods of (entitlement - usage), over capacity;
            # periods where either is unknown add nothing
            diff = h.last("entitlement", 10) - h.last("usage", 10)
            credit = np.where(np.isnan(diff), 0.0, diff).sum(axis=0) / step.obs.host.capacity
            expected.append(dict(ts=step.obs.ts, uuids=list(step.obs.vms.uuids), names=list(step.obs.vms.names),
                                 credit=credit,
                                 **{k: h.latest(k).copy() for k in ("usage", "forecast", "allocation",
                                                                    "entitlement", "signal")}))
    return expected


def test_history_csv_round_trip(kit, tmp_path):
    expected = _run_and_write(kit, tmp_path, MIDNIGHT - 600.0, periods=14)
    df = read_history([tmp_path])
    assert list(df.columns) == CSV_COLUMNS
    n = len(expected[0]["uuids"])
    assert len(df) == len(expected) * n * N_RES
    assert sorted(df["resource"].unique()) == ["cpu", "disk", "memory", "net"]
    assert set(df["host"]) == {"host-1"}
    labels = ["cpu", "memory", "disk", "net"]
    for e in expected:
        for i, u in enumerate(e["uuids"]):
            rows = df[(df["ts"] == e["ts"]) & (df["vm_uuid"] == u)]
            assert len(rows) == N_RES
            assert set(rows["vm_name"]) == {e["names"][i]}
            for r, label in enumerate(labels):
                row = rows[rows["resource"] == label].iloc[0]
                for name in ("usage", "forecast", "allocation", "entitlement", "signal", "credit"):
                    want = e[name][i, r]
                    got = row[name]
                    if np.isnan(want):
                        assert np.isnan(got), (name, u, label)
                    else:
                        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), (name, u, label)


def test_history_csv_rotates_daily_utc(kit, tmp_path):
    expected = _run_and_write(kit, tmp_path, MIDNIGHT - 600.0)
    files = sorted(p.name for p in tmp_path.glob("history-*.csv"))
    assert files == ["history-2013-07-31.csv", "history-2013-08-01.csv"]
    for f in files:
        day = f[len("history-"):-len(".csv")]
        df = pd.read_csv(tmp_path / f)  # pandas reads it with no options
        assert list(df.columns) == CSV_COLUMNS
        days = {datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d") for ts in df["ts"]}
        assert days == {day}
    assert sum(len(pd.read_csv(tmp_path / f)) for f in files) == len(expected) * 3 * N_RES


def test_history_csv_flushed_each_period(kit, tmp_path):
    trace = kit.trace(np.full((3, 2, N_RES), 1.0), np.tile([2.0, 2048.0, np.nan, np.nan], (2, 1)),
                      start=MIDNIGHT + 3600)
    loop = build_loop(trace, "static", SimSettings())
    w = HistoryWriter(tmp_path, "h")
    try:
        for k, step in enumerate(loop.steps(), start=1):
            w.write(step, loop.history)
            df = pd.read_csv(w.path_for(step.obs.ts))  # while the writer is still open
            assert len(df) == k * 2 * N_RES
    finally:
        w.close()


def test_history_csv_appends_after_restart(kit, tmp_path):
    trace = kit.trace(np.full((4, 2, N_RES), 1.0), np.tile([2.0, 2048.0, np.nan, np.nan], (2, 1)),
                      start=MIDNIGHT + 3600)
    loop = build_loop(trace, "static", SimSettings())
    steps = list(loop.steps())
    with HistoryWriter(tmp_path, "h") as w:
        w.write(steps[0], loop.history)
    with HistoryWriter(tmp_path, "h") as w:  # a restarted daemon
        w.write(steps[1], loop.history)
    df = read_history([tmp_path])
    assert len(df) == 2 * 2 * N_RES
    assert pd.api.types.is_numeric_dtype(df["ts"])  # no second header inside the file


def test_history_csv_commas_in_names(kit, tmp_path):
    _run_and_write(kit, tmp_path, MIDNIGHT + 60, periods=2, n=2, vm_ids=["x,1", "y"], host="rack,7")
    df = read_history([tmp_path])
    assert list(df.columns) == CSV_COLUMNS
    assert set(df["host"]) == {"rack_7"}
    assert "vm-x_1" in set(df["vm_name"])


def test_read_history_errors(tmp_path):
    with pytest.raises(ValueError):
        read_history([tmp_path])  # a directory with no history files
    with pytest.raises(ValueError, match="nope.csv"):
        read_history([tmp_path / "nope.csv"])


def test_read_history_skips_malformed_rows_and_counts_them(kit, tmp_path):
    from rescoin.offline.historycsv import load_history

    _run_and_write(kit, tmp_path, MIDNIGHT + 60, periods=3, n=2)
    good = read_history([tmp_path])
    path = next(tmp_path.glob("history-*.csv"))
    with open(path, "a") as fh:
        fh.write("1,2,3\n")  # wrong field count
        fh.write(f"{MIDNIGHT + 9000},h,u9,n9,cpu,lots,1,1,1,0,0\n")  # a number that is not one
        fh.write(f"{MIDNIGHT + 9000},h,u9,n9,gpu,1,1,1,1,0,0\n")  # no such resource
    again = read_history([tmp_path])
    assert list(again.columns) == CSV_COLUMNS and len(again) == len(good)
    d = load_history([tmp_path])
    assert dict(d.skipped[str(path)]) == {"wrong field count": 1, "non-numeric value": 1, "unknown resource": 1}
    assert "skipped 3 malformed rows in 1 file" in d.skipped_message()


def test_a_carried_ledger_seeds_only_the_arriving_row_and_a_bad_one_is_ignored():
    from rescoin.core.model import VMSet

    def vms(*uuids):
        return VMSet.build(uuids=list(uuids), names=list(uuids), sizes=np.ones((len(uuids), N_RES)),
                           min_memory=np.zeros(len(uuids)))

    h = History(window=4)
    h.align(vms("a"))
    assert h.carried() is None  # nothing arrived: nothing made
    h.carry("b", [0.5, 300.0, np.nan, 1.0])
    h.carry("c", [1.0, 2.0])  # a damaged ledger (wrong length): ignored
    h.align(vms("a", "b", "c"))
    carried = h.carried()
    assert carried is not None
    assert carried.tolist() == [[0.0] * N_RES, [0.5, 300.0, 0.0, 1.0], [0.0] * N_RES]
