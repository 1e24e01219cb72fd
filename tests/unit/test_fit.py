"""rescoin fit: replaying history through PaddedEWMA, the weighted loss, the search, the model files."""
from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.cli import main as rescoin_main
from rescoin.core.history import History
from rescoin.core.predict import PaddedEWMA, PredictorParams, default_predictor, load_model
from rescoin.core.resources import CPU, MEMORY, N_RES, RESOURCES, Resource
from rescoin.offline.fit import FIT, FITTED, HELD, Series, check_table, fit, parts, replay
from rescoin.offline.historycsv import HistoryWriter

PLAIN = PredictorParams(alpha_up=0.9, alpha_down=0.9, hold_last=0.0, growth=1.0)


def main(argv: list[str]) -> int:
    """``rescoin fit ARGV``."""
    return rescoin_main(["fit", *argv])


def plain_base(**kw) -> dict:
    return {r: replace(PLAIN, **kw) for r in RESOURCES}


def local_level(alpha: float, vms: int, periods: int, seed: int = 3) -> Series:
    """CPU usage from a local-level process, for which EWMA with ``alpha`` is the best predictor:
    level += N(0, q), usage = level + N(0, 1), with q = alpha^2 / (1 - alpha)."""
    rng = np.random.default_rng(seed)
    q = alpha ** 2 / (1 - alpha)
    level = 40.0 + np.cumsum(rng.normal(0, np.sqrt(q), (periods, vms)), axis=0)
    usage = np.full((periods, vms, N_RES), np.nan)
    usage[:, :, CPU] = level + rng.normal(0, 1.0, (periods, vms))
    signal = np.where(np.isnan(usage), np.nan, 0.0)
    ids = np.array([f"vm{i}" for i in range(vms)])
    return Series(ts=np.arange(periods) * 300.0, uuids=ids, names=ids, usage=usage, signal=signal, period=300.0)


def by_hand(series: np.ndarray, alpha: float) -> np.ndarray:
    """Plain EWMA forecasts: forecast[t] is made after period t for period t+1."""
    out = np.empty_like(series)
    level = series[0]
    for t, x in enumerate(series):
        level = x if t == 0 else level + alpha * (x - level)
        out[t] = level
    return out


# -- replay and loss --------------------------------------------------------------------------------


def test_replay_scores_next_period_usage_by_hand():
    s = local_level(0.5, vms=2, periods=30)
    part = parts(s, 0.0)
    sums = replay(PaddedEWMA({r: replace(PLAIN, alpha_up=0.5, alpha_down=0.5) for r in RESOURCES}), s, part)
    for v in range(2):
        x = s.usage[:, v, CPU]
        f = by_hand(x, 0.5)
        e = x[1:] - f[:-1]
        assert sums.under[0, v, CPU, FIT] == pytest.approx(np.maximum(e, 0).sum())
        assert sums.over[0, v, CPU, FIT] == pytest.approx(np.maximum(-e, 0).sum())
        assert sums.usage[0, v, CPU, FIT] == pytest.approx(x[1:].sum())
    loss = sums.part(FIT).loss(4.0, axis=(0, 1))[CPU]
    assert loss == pytest.approx((4 * sums.under[..., CPU, FIT].sum() + sums.over[..., CPU, FIT].sum())
                                 / sums.usage[..., CPU, FIT].sum())
    assert np.isnan(sums.part(FIT).loss(4.0, axis=(0, 1))[MEMORY])  # no memory data: no loss


def test_parts_hold_back_the_end_of_each_series():
    s = local_level(0.3, vms=2, periods=20)
    s.usage[:8, 1] = np.nan  # the second VM arrives late: its own series is split, not the calendar
    p = parts(s, 0.25)
    assert (p[0] == 0).all()
    assert (p[1:15, 0, CPU] == FIT).all() and (p[15:, 0, CPU] == HELD).all()
    assert (p[:8, 1, CPU] == 0).all() and (p[8:17, 1, CPU] == FIT).all() and (p[17:, 1, CPU] == HELD).all()
    assert (p[:, :, MEMORY] == 0).all()


@pytest.mark.parametrize("base", [default_predictor().params, plain_base()], ids=["default", "plain"])
def test_candidates_as_row_blocks_match_plain_replays(base):
    """The fit replays each candidate as a row block of one PaddedEWMA.from_rows: equal to separate runs."""
    rng = np.random.default_rng(7)
    T, V = 40, 3
    usage = np.abs(rng.normal(5, 2, (T, V, N_RES))) * (rng.random((T, V, N_RES)) > 0.05)
    signal = np.where(rng.random((T, V, N_RES)) > 0.8, rng.random((T, V, N_RES)) * 0.3, 0.0)
    usage[5, 1] = np.nan
    ids = np.array(["a", "b", "c"])
    s = Series(ts=np.arange(T) * 300.0, uuids=ids, names=ids, usage=usage, signal=signal, period=300.0)
    p = parts(s, 0.25)
    cands = [{"alpha_up": 0.3, "alpha_down": 0.1, "pad_error": 1.0, "pad_std": 2.0, "pad_frac": 0.1},
             {"alpha_up": 0.9, "alpha_down": 0.5, "pad_error": 0.0, "pad_std": 0.5, "pad_frac": 0.0}]
    rows = {n: np.repeat(np.array([[c[n]] * N_RES for c in cands]), V, axis=0) for n in FITTED}
    both = replay(PaddedEWMA.from_rows(base, rows), s, p, k=len(cands))
    for i, c in enumerate(cands):
        one = replay(PaddedEWMA({r: replace(base[r], **c) for r in RESOURCES}), s, p)
        np.testing.assert_array_equal(both.under[i], one.under[0])
        np.testing.assert_array_equal(both.over[i], one.over[0])
    assert both.under[0].sum() != both.under[1].sum()  # the candidates really differ


# -- the search -------------------------------------------------------------------------------------


def test_fit_recovers_a_known_alpha_and_beats_a_wrong_one():
    s = local_level(0.3, vms=8, periods=500)
    res = fit(s, plain_base(), w_under=1.0, holdout=0.25, rounds=1)
    cpu = res.fitted[RESOURCES[CPU]]
    assert 0.2 <= cpu.alpha_up <= 0.5 and 0.2 <= cpu.alpha_down <= 0.5, cpu
    assert res.fitted[RESOURCES[MEMORY]] == PLAIN  # no memory data: the base is kept
    assert res.fitted_resources == ["cpu"]
    held_fit = res.fitted_sums.part(HELD).loss(1.0, axis=(0, 1))[CPU]
    held_base = res.base_sums.part(HELD).loss(1.0, axis=(0, 1))[CPU]
    assert held_fit < 0.9 * held_base  # better than alpha 0.9 on data the search never saw
    truth = check_table(s, {"right": PaddedEWMA(plain_base(alpha_up=0.3, alpha_down=0.3)),
                            "wrong": PaddedEWMA(plain_base(alpha_up=0.9, alpha_down=0.9))}, 1.0)["cpu"]
    assert truth["right"]["loss"] < truth["wrong"]["loss"]


def test_heavier_under_weight_gives_less_under_estimation():
    s = local_level(0.3, vms=6, periods=300)
    light = fit(s, plain_base(), w_under=1.0, holdout=0.0, rounds=1)
    heavy = fit(s, plain_base(), w_under=8.0, holdout=0.0, rounds=1)

    def under(r):
        return r.fitted_sums.part(FIT).ratio("under", axis=(0, 1))[CPU]

    assert under(heavy) < 0.7 * under(light)


# -- the command ------------------------------------------------------------------------------------


def write_history(directory: Path, kit, periods: int = 80, vms: int = 3, period: float = 3600.0) -> Path:
    """History from the real HistoryWriter: cpu and memory usage with a little unmet-demand signal."""
    rng = np.random.default_rng(5)
    v = kit.vms(vms)
    cap = np.array([8.0, 16384.0, 1000.0, 1000.0])
    ent = np.tile([2.0, 4096.0, 250.0, 250.0], (vms, 1))
    h = History(window=20)
    level = np.array([1.0, 2048.0, 50.0, 20.0])
    with HistoryWriter(directory, "host-a") as w:
        for t in range(periods):
            level = level * np.exp(rng.normal(0, 0.05, N_RES))
            usage = level * rng.lognormal(0, 0.2, (vms, N_RES))
            sig = np.where(rng.random((vms, N_RES)) < 0.05, 0.1, 0.0)
            h.decide(forecast=usage, allocation=ent, entitlement=ent)
            obs = kit.obs(v, usage, cap, signal=sig, ts=1375315200.0 + period * t, interval=period)
            h.push(obs)
            w.write(SimpleNamespace(obs=obs, entitlement=ent), h)
    return directory


def test_fit_command_writes_a_model_that_loads(tmp_path, kit, capsys):
    hist = write_history(tmp_path / "hist", kit)
    out = tmp_path / "models" / "fitted.toml"
    out.parent.mkdir()
    code = main([str(hist), "-o", str(out), "--per-vm", "--rounds", "1", "--comment", "made for a test"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "held-back check" in stdout and "under fitted" in stdout and "loss base" in stdout
    model = load_model(out)  # what run --model and simulate --model do
    assert model.name == "fitted"
    text = out.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith("# command: rescoin fit ") and "--per-vm" in line for line in header)
    assert any("made for a test" in line for line in header)
    assert any(line.startswith("# cpu ") and "->" in line for line in header)
    data = tomllib.loads(text)
    for r in RESOURCES:
        assert set(data[r.label]) == set(PredictorParams.__dataclass_fields__)
    assert data["memory"]["season"] == 288 and data["cpu"]["growth"] == 1.5  # kept from the base model
    assert set(data["vm"]) == {f"uuid-{i}" for i in range(3)}  # 80 h, 60 fitted: over 2 days each
    assert set(data["vm"]["uuid-0"]["cpu"]) == {"alpha_up", "alpha_down", "pad_error", "pad_std", "pad_frac"}
    # the predictor run and simulate build from the file has those VMs' own parameters
    assert set(model.per_vm) == {f"uuid-{i}" for i in range(3)}
    own = model.per_vm["uuid-0"][Resource.CPU]
    assert own.alpha_up == data["vm"]["uuid-0"]["cpu"]["alpha_up"]
    assert own.growth == data["cpu"]["growth"]  # keys the VM table leaves out come from [cpu]
    assert not any(out.parent.glob("*.per-vm.toml"))


def test_fit_check_scores_a_model_on_other_history(tmp_path, kit, capsys):
    hist = write_history(tmp_path / "hist", kit, periods=40)
    model = tmp_path / "m.toml"
    model.write_text('[cpu]\nalpha_up = 0.5\nalpha_down = 0.5\n')
    code = main([str(hist), "--check", str(model)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "under checked" in stdout and "loss checked" in stdout
    assert not any(tmp_path.glob("*.per-vm.toml"))


@pytest.mark.parametrize("argv", [["nope-dir-or-file.csv", "-o", "x.toml"], ["{hist}"]])
def test_fit_user_errors_are_one_line(tmp_path, kit, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hist = write_history(tmp_path / "hist", kit, periods=5)
    code = main([a.format(hist=hist) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rescoin: error: "), err
    assert not (tmp_path / "x.toml").exists()


def test_under_weight_per_resource():
    from rescoin.cli.fit import UnderWeight

    w = UnderWeight.parse("memory=10,cpu=2")
    assert np.asarray(w).tolist() == [2.0, 10.0, 4.0, 4.0]
    assert str(w) == "cpu=2,memory=10,disk=4,net=4"
    assert np.asarray(UnderWeight.parse("3")).tolist() == [3.0] * N_RES and str(UnderWeight.parse("3")) == "3"
    import argparse

    for bad in ("0", "gpu=3", "cpu=x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            UnderWeight.parse(bad)
    # a heavier memory weight only changes memory's loss
    s = local_level(0.3, vms=2, periods=50)
    s.usage[:, :, MEMORY] = s.usage[:, :, CPU] * 100
    sums = replay(PaddedEWMA(plain_base()), s, parts(s, 0.0)).part(FIT)
    a, b = sums.loss(4.0, axis=(0, 1)), sums.loss(UnderWeight.parse("memory=10"), axis=(0, 1))
    assert a[CPU] == pytest.approx(b[CPU]) and b[MEMORY] > a[MEMORY]


# -- defaults that reproduce the shipped model (issue 8 item 19) ---------------------------------------


def fit_args(argv: list[str]):
    import argparse

    from rescoin.cli.fit import add_fit_parser

    parser = argparse.ArgumentParser()
    add_fit_parser(parser.add_subparsers())
    return parser.parse_args(["fit", *argv])


def test_defaults_are_those_that_made_the_shipped_model():
    """A plain `rescoin fit HISTORY -o PATH` uses the base and weights in models/default.toml's command line."""
    import shlex

    from rescoin.core.predict import MODELS_DIR

    shipped = MODELS_DIR / "default.toml"
    command = next(line for line in shipped.read_text().splitlines() if line.startswith("# command: "))
    argv = shlex.split(command.removeprefix("# command: "))[2:]  # after "rescoin fit"
    recorded = fit_args(argv)
    plain = fit_args(["hist", "-o", "x.toml"])
    assert np.asarray(plain.under_weight).tolist() == np.asarray(recorded.under_weight).tolist()
    assert (MODELS_DIR.parent / recorded.base).resolve() == Path(plain.base).resolve()
    assert plain.holdout == recorded.holdout and plain.rounds == recorded.rounds
    # one resource named: the others keep their default weight, not some other number
    w = fit_args(["hist", "--under-weight", "memory=1000"]).under_weight
    default = np.asarray(plain.under_weight)
    assert np.asarray(w)[MEMORY] == 1000
    assert np.delete(np.asarray(w), MEMORY).tolist() == np.delete(default, MEMORY).tolist()


def test_the_written_header_says_the_base_and_weights_even_at_their_defaults(tmp_path, kit, capsys):
    hist = write_history(tmp_path / "hist", kit, periods=40)
    out = tmp_path / "m.toml"
    assert main([str(hist), "-o", str(out), "--rounds", "1"]) == 0
    command = next(line for line in out.read_text().splitlines() if line.startswith("# command: "))
    recorded = fit_args(__import__("shlex").split(command.removeprefix("# command: "))[2:])
    plain = fit_args(["hist", "-o", "x.toml"])
    assert "--base" in command and "--under-weight" in command
    assert np.asarray(recorded.under_weight).tolist() == np.asarray(plain.under_weight).tolist()


# -- short history, -o paths (issue 8 item 19) ------------------------------------------------------


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("periods", [3, 20])
def test_short_history_warns(periods, tmp_path, kit, capsys):
    from rescoin.offline.fit import WARN_PERIODS

    hist = write_history(tmp_path / "hist", kit, periods=periods)
    out = tmp_path / "m.toml"
    code = main([str(hist), "-o", str(out), "--rounds", "1"])
    _, err = capsys.readouterr()
    assert code == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("rescoin: warning: ")]
    assert len(warnings) == 1, err
    assert f"only {periods} periods" in warnings[0] and str(WARN_PERIODS) in warnings[0]
    load_model(out)


def test_long_enough_history_does_not_warn(tmp_path, kit, capsys, monkeypatch):
    import rescoin.offline.fit.series as fitmod

    monkeypatch.setattr(fitmod, "WARN_PERIODS", 30)  # the real minimum (a day) would make this test slow
    hist = write_history(tmp_path / "hist", kit, periods=40)
    assert main([str(hist), "-o", str(tmp_path / "m.toml"), "--rounds", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_history_below_the_hard_minimum_is_refused(tmp_path, kit, capsys):
    from rescoin.offline.fit import MIN_PERIODS

    hist = write_history(tmp_path / "hist", kit, periods=MIN_PERIODS - 1)
    out = tmp_path / "m.toml"
    code = main([str(hist), "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert line.startswith("rescoin: error: only 2 periods") and str(MIN_PERIODS) in line
    assert not out.exists()


@pytest.fixture
def slow_fit_forbidden(monkeypatch):
    """The fit must not run: a bad -o path is reported before it."""
    import rescoin.cli.fit as fitmod

    def fail(*a, **kw):
        raise AssertionError("the fit ran before the output path was checked")

    monkeypatch.setattr(fitmod, "fit", fail)
    monkeypatch.setattr(fitmod, "load_with_progress", fail)


def test_existing_output_is_not_overwritten_without_force(tmp_path, kit, capsys, slow_fit_forbidden):
    hist = write_history(tmp_path / "hist", kit, periods=10)
    out = tmp_path / "mine.toml"
    out.write_text("# my own notes, not a model\n")
    code = main([str(hist), "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"rescoin: error: {out}: exists") and "--force" in line
    assert out.read_text() == "# my own notes, not a model\n"


def test_force_replaces_the_output_and_keeps_its_mode(tmp_path, kit, capsys):
    import os
    import stat

    hist = write_history(tmp_path / "hist", kit, periods=10)
    out = tmp_path / "mine.toml"
    out.write_text("old\n")
    os.chmod(out, 0o640)
    code = main([str(hist), "-o", str(out), "--force", "--rounds", "1"])
    assert code == 0, capsys.readouterr().err
    load_model(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist", "mine.toml"]  # no temp file left


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "parent-is-a-file", "unwritable"])
def test_bad_output_path_is_reported_before_the_fit(where, tmp_path, kit, capsys, slow_fit_forbidden):
    hist = write_history(tmp_path / "hist", kit, periods=10)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    out = {"missing-dir": tmp_path / "nope" / "m.toml", "a-directory": tmp_path / "dir",
           "parent-is-a-file": tmp_path / "file" / "m.toml",
           "unwritable": Path("/sys/rescoin-test-model.toml")}[where]  # /sys refuses new files, even to root
    before = sorted(tmp_path.rglob("*"))
    code = main([str(hist), "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"rescoin: error: {out}: ")
    assert sorted(tmp_path.rglob("*")) == before  # nothing created
