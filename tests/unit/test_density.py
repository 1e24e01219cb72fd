"""Issue 10 items 4 and 5, quick and in-process: --overcommit per resource, the service objective,
the density search (monotone, non-monotone, null), the summary and `rescoin density`'s JSON and errors."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from rescoin.cli.argtypes import overcommit
from rescoin.offline import density as dens
from rescoin.offline import sweep
from rescoin.offline.sweep import Outcome, RunSpec, Slice

PLANETLAB = Path(__file__).resolve().parents[1] / "data" / "planetlab"


def run_cli(argv, capsys):
    from rescoin.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    return lines[0]


# -- --overcommit ------------------------------------------------------------------------------------
def test_overcommit_one_number_or_per_resource():
    assert overcommit("1.5") == 1.5
    assert overcommit("cpu=4,memory=1.5") == {"cpu": 4.0, "memory": 1.5}
    assert overcommit(" net = 2 ") == {"net": 2.0}


@pytest.mark.parametrize("text, said", [("gpu=2", "gpu"), ("cpu=x", "cpu"), ("cpu=0", "> 0"), ("memory=-1", "> 0"),
                                        ("cpu=4,cpu=2", "twice"), ("cpu", "not a number"), ("cpu=nan", "finite"),
                                        (",", "not a number"), ("=2", "RESOURCE=FACTOR")])
def test_overcommit_bad_text_says_what(text, said):
    with pytest.raises(argparse.ArgumentTypeError, match=said):
        overcommit(text)


@pytest.mark.parametrize("command", [["simulate", "--trace", str(PLANETLAB)],
                                     ["run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "1"],
                                     ["demo", "--trace", str(PLANETLAB), "--seconds", "0.1"],
                                     ["density", "--trace", str(PLANETLAB), "--resource", "cpu", "--hold"]])
def test_bad_per_resource_overcommit_is_one_argparse_line(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # demo would write its history here
    argv = command + (["gpu=2"] if command[-1] == "--hold" else ["--overcommit", "gpu=2"])
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "gpu" in error_line(err)
    assert not list(tmp_path.iterdir())


def test_run_on_a_sim_uri_takes_a_per_resource_overcommit(capsys):
    code, _, _ = run_cli(["run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "1",
                          "--overcommit", "cpu=4,memory=1.5"], capsys)
    assert code == 0


def test_simulate_json_carries_the_per_resource_overcommit(capsys):
    code, out, _ = run_cli(["simulate", "--trace", str(PLANETLAB), "--policies", "static", "--vms", "3",
                            "--days", "0.2", "--overcommit", "cpu=4,memory=1.5", "--format", "json"], capsys)
    assert code == 0
    assert json.loads(out)["overcommit"] == {"cpu": 4.0, "memory": 1.5}


# -- the objective ----------------------------------------------------------------------------------------
def good() -> dict:
    res = {r: {"violations": 0.0, "worst_off": 1.0, "breaches": 0.0} for r in ("cpu", "memory", "disk", "net")}
    res["net"] = {"violations": None, "worst_off": None, "breaches": None}  # no demand: not judged
    return res


def test_objective_holds_on_a_clean_run():
    assert dens.objective(good()) == (True, [])


@pytest.mark.parametrize("label, metric, value, holds", [
    ("memory", "violations", 1e-3, True), ("memory", "violations", 1.1e-3, False),
    ("cpu", "violations", 5e-3, True), ("cpu", "violations", 6e-3, False),
    ("cpu", "worst_off", 0.99, True), ("cpu", "worst_off", 0.989, False),
    ("memory", "breaches", 1e-6, False), ("disk", "breaches", 1e-6, False), ("cpu", "breaches", 1e-6, False),
    ("memory", "worst_off", 0.5, True),  # memory's worst-off is not part of the objective
])
def test_objective_rules(label, metric, value, holds):
    res = good()
    res[label][metric] = value
    ok, why = dens.objective(res)
    assert ok is holds
    assert holds or any(label in w and metric in w for w in why)


def test_a_failed_run_fails_the_objective():
    assert dens.objective(None) == (False, ["the run failed"])


# -- the search, with a fake run function ------------------------------------------------------------------
def fake_round(passes, log=None):
    """A run round where key k passes at factor f when passes(k, f)."""
    def run(runs):
        if log is not None:
            log.append(list(runs))
        return {(k, f): good() if passes(k, f) else {"memory": {"violations": 0.5}} for k, f in runs}
    return run


def test_monotone_search_finds_the_edge_to_a_sixteenth_of_the_gap():
    rounds: list = []
    found = dens.search(["a", "b"], fake_round(lambda k, f: f <= (2.3 if k == "a" else 5.5), rounds))
    a, b = found["a"], found["b"]
    assert 2.25 <= a.density <= 2.3 and 2.3 - a.density <= 0.5 / 16
    assert 5.0 <= b.density <= 5.5 and 5.5 - b.density <= 1.0 / 16
    assert a.holds_again_at is None and a.failed_at > 2.3
    assert len(rounds[0]) == 2 * len(dens.GRID)  # the whole grid at once
    assert len(rounds) == 1 + dens.BISECT_STEPS and all(len(r) == 2 for r in rounds[1:])  # pairs together


def test_non_monotone_stops_at_the_first_failure_and_reports_where_it_holds_again():
    found = dens.search(["p"], fake_round(lambda k, f: not (1.4 < f < 1.6) and f <= 3.0))
    p = found["p"]
    assert 1.25 <= p.density < 1.5  # never 3, though it holds there
    assert p.holds_again_at == 1.75


def test_density_is_null_where_factor_one_fails_and_the_grid_top_where_all_pass():
    rounds: list = []
    found = dens.search(["none", "all"], fake_round(lambda k, f: k == "all", rounds))
    assert found["none"].density is None and found["none"].result is None
    assert found["all"].density == dens.GRID[-1]
    assert len(rounds) == 1  # nothing to bisect


def test_a_failed_run_is_a_failing_factor():
    def run(runs):
        return {(k, f): good() for k, f in runs if f != 2.0}  # the run at 2 failed: missing from the answer
    assert dens.search(["p"], run)["p"].density < 2.0


# -- the summary -----------------------------------------------------------------------------------------
def at(d, reclaimed=0.1, swap=0.2, bal=3.0):
    res = {"memory": {"reclaimed": reclaimed, "actuations_per_vm_hour": bal}, "host_swap": {"share_of_periods": swap}}
    return dens.Found(d, res if d is not None else None)


def test_summary_ratio_per_slice_then_median_and_spread():
    found = {("x", 0): at(2.0), ("x", 1): at(None), ("x", 2): at(3.0, reclaimed=0.3),
             ("oracle", 0): at(4.0), ("oracle", 1): at(2.0), ("oracle", 2): at(3.0)}
    out = dens.summarise(found, ["x", "oracle"], [0, 1, 2])
    x = out["x"]
    assert x["slices"] == [2.0, None, 3.0] and x["min"] is None and x["max"] == 3.0
    assert x["density"] == 2.0  # median slice; None sorts below every factor
    assert x["ratio_to_oracle"] == pytest.approx(0.5)  # median slice of 0.5, 0 (fails at 1) and 1.0
    assert x["reclaimed"] == pytest.approx(0.2) and x["swap"] == pytest.approx(0.2)
    assert out["oracle"]["ratio_to_oracle"] == 1.0


def test_summary_without_host_swap_says_none():
    found = {("x", 0): dens.Found(2.0, {"memory": {"reclaimed": 0.1, "actuations_per_vm_hour": 1.0}}),
             ("oracle", 0): at(2.0)}
    row = dens.summarise(found, ["x", "oracle"], [0])["x"]
    assert row["swap"] is None and "slices" not in row and row["holds_again_at"] is None


# -- rescoin density: JSON shape and errors (in process, replays faked) --------------------------------------
@pytest.fixture
def fake_replays(monkeypatch):
    """Each replay passes while its memory factor is at most 2 (+ offset/100; the oracle: 4); mom on 100:0 fails."""
    def run_spec(spec: RunSpec) -> Outcome:
        if spec.policy == "mom" and spec.slice.vm_offset == 100:
            return Outcome(spec, None, "KeyError: no such policy", 0.0)
        edge = 4.0 if spec.policy == "oracle" else 2.0 + spec.slice.vm_offset / 100
        res = good() if dict(spec.overcommit)["memory"] <= edge else {"memory": {"violations": 0.5}}
        res["memory"].update(reclaimed=0.25, actuations_per_vm_hour=1.5)
        return Outcome(spec, res, None, 0.0)
    monkeypatch.setattr(sweep, "run_spec", run_spec)


DENSITY = ["density", "--trace", str(PLANETLAB), "--resource", "memory", "--scheduler", "none"]


def test_density_json_is_one_object_of_the_issue_shape(fake_replays, capsys, tmp_path):
    out_file = tmp_path / "runs.csv"
    code, out, _ = run_cli(DENSITY + ["--policies", "static", "--hold", "cpu=4", "--format", "json",
                                      "--out", str(out_file)], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["resource"] == "memory" and doc["hold"] == {"cpu": 4.0, "disk": 1.5, "net": 1.5}
    assert set(doc["policies"]) == {"static", "oracle"}  # the oracle is always run: the ratios need it
    s = doc["policies"]["static"]
    assert {"density", "ratio_to_oracle", "reclaimed", "swap", "balloon_changes_per_vm_hour"} <= set(s)
    assert 2.0 <= s["density"] < 2.0 + 0.5 / 16 and s["ratio_to_oracle"] == pytest.approx(s["density"] / 4.0)
    assert s["reclaimed"] == 0.25 and s["swap"] is None and doc["failed"] == []
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("policy,") and len(lines) == 1 + 2 * (len(dens.GRID) + dens.BISECT_STEPS)


def test_density_several_slices_and_presets(fake_replays, capsys):
    code, out, _ = run_cli(DENSITY + ["--policies", "static,mom", "--slices", "0:0,50:0,100:0",
                                      "--memory-model", "off,default", "--format", "json"], capsys)
    assert code == 0
    doc = json.loads(out)
    s = doc["policies"]["static"]
    assert len(s["slices"]) == 3 and s["min"] <= s["density"] <= s["max"] and s["max"] >= 3.0
    assert set(doc["memory_models"]) == {"off", "default"}
    assert doc["policies"]["mom"]["slices"][2] is None and doc["policies"]["mom"]["slices"][0] is not None
    assert doc["failed"] and all("mom on slice 100:0" in f["run"] and "KeyError" in f["error"] for f in doc["failed"])


def test_density_table_fits_80_columns(fake_replays, capsys):
    code, out, _ = run_cli(DENSITY + ["--policies", "static", "--slices", "0:0,50:0"], capsys)
    assert code == 0 and "vs oracle" in out and "non-monotone" in out
    assert max(len(x) for x in out.splitlines()) <= 80


@pytest.mark.parametrize("extra, said", [
    (["--hold", "memory=2"], "--hold names memory"),
    (["--slices", "0-0"], "--slices"),
    (["--memory-model", "slow"], "--memory-model"),
    (["--policies", "nosuch"], "nosuch"),
    (["--vm-offset", "-1"], "--vm-offset"),
])
def test_density_bad_arguments_are_one_line(extra, said, fake_replays, capsys):
    code, out, err = run_cli(DENSITY + extra, capsys)
    assert code == 2 and out == "" and said in error_line(err)


def test_density_of_a_missing_trace_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(["density", "--trace", str(tmp_path / "nope"), "--resource", "cpu"], capsys)
    assert code == 2 and "nope" in error_line(err)


def test_run_spec_reports_its_error_in_one_line(tmp_path):
    spec = RunSpec(str(tmp_path / "nope"), Slice(), "static", (("memory", 1.5),))
    o = sweep.run_spec(spec)
    assert o.result is None and "\n" not in o.error and "nope" in o.error
    assert "static" in spec.name and "1.5" not in spec.name  # no factor given: none in the name


def test_rows_are_flat_and_nan_free(tmp_path):
    spec = RunSpec("t", Slice(1, 2.0), "static", (("memory", 2.0),), factor=2.0)
    res = good()
    res["cpu"]["fairness"] = math.nan
    path = tmp_path / "r.json"
    sweep.write_rows(sweep.rows([Outcome(spec, res, None, 0.5)], dens.objective), path)
    row = json.loads(path.read_text())[0]
    assert row["policy"] == "static" and row["factor"] == 2.0 and row["ok"] is True
    assert row["cpu.fairness"] is None and row["memory.violations"] == 0.0


# -- rescoin sweep ----------------------------------------------------------------------------------------
def test_sweep_writes_one_row_per_replay(fake_replays, capsys, tmp_path):
    path = tmp_path / "sweep.json"
    code, out, err = run_cli(["sweep", "--trace", str(PLANETLAB), "--resource", "memory", "--scheduler", "none",
                              "--policies", "static,mom", "--slices", "0:0,100:0", "--factors", "1,2.5",
                              "--memory-model", "off,fast", "--out", str(path)], capsys)
    assert code == 0 and str(path) in out
    table = json.loads(path.read_text())
    assert len(table) == 3 * 2 * 2 * 2  # (static, mom, oracle) x slices x factors x presets
    assert {(r["memory_model"], r["factor"]) for r in table} == {(m, f) for m in ("off", "fast") for f in (1.0, 2.5)}
    by = {(r["policy"], r["vm_offset"], r["factor"], r["memory_model"]): r for r in table}
    assert by[("static", 0, 1.0, "off")]["ok"] is True and by[("static", 0, 2.5, "off")]["ok"] is False
    assert by[("mom", 100, 1.0, "off")]["error"] and "failed: mom on slice 100:0" in err


@pytest.mark.parametrize("extra, said", [(["--factors", "1,x", "--out", "a.json"], "--factors"),
                                         (["--factors", "0", "--out", "a.json"], "--factors"),
                                         (["--factors", "2", "--out", "a.txt"], ".json or a .csv")])
def test_sweep_bad_arguments_are_one_line(extra, said, fake_replays, capsys):
    code, _, err = run_cli(["sweep", "--trace", str(PLANETLAB), "--resource", "cpu", "--scheduler", "none"] + extra,
                           capsys)
    assert code == 2 and said in error_line(err)


def test_a_higher_grid_top_separates_policies_the_default_grid_puts_at_8():
    passes = fake_round(lambda k, f: f <= (11.0 if k == "a" else 20.0))
    default = dens.search(["a", "b"], passes)
    assert default["a"].density == default["b"].density == 8.0  # both at the top: no separation
    wide = dens.search(["a", "b"], passes, dens.grid(16))
    assert 10.0 <= wide["a"].density <= 11.0 and wide["b"].density == 16.0
    assert dens.grid(12)[-2:] == (10.0, 12.0) and dens.grid() == dens.GRID
    with pytest.raises(ValueError, match="at least 8"):
        dens.grid(4)
