"""rescoin analyze: reading history CSVs (malformed rows, globs, .gz), history-based metrics, JSON, report."""
from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.cli import main
from rescoin.cli.analyze import add_analyze_parser
from rescoin.core.history import History
from rescoin.core.resources import N_RES
from rescoin.offline.analysis import analyze, load_history
from rescoin.offline.historycsv import HEADER, HistoryWriter


def strict_json(text: str):
    def bad(name):
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=bad)


def row(ts, uuid, name, res, usage="", forecast="", alloc="", ent="", credit="0", signal="0") -> str:
    return f"{ts},host-a,{uuid},{name},{res},{usage},{forecast},{alloc},{ent},{credit},{signal}\n"


#: two VMs, three periods, cpu only; numbers chosen so every metric can be worked out by hand
#           usage        forecast        allocation   entitlement credit           signal
TINY = {
    "a": ([1.0, 2.0, 2.0], ["", 1.5, 3.0], [2, 2, 4], [3, 3, 3], [0.1, 0.2, 0.3], [0.0, 0.5, 0.0]),
    "b": ([1.0, 1.0, 0.0], ["", 1.0, 1.0], [1, 1, 1], [1, 1, 1], [0.0, -0.1, -0.2], [0.0, 0.0, 0.0]),
}


def write_tiny(path: Path) -> Path:
    lines = [HEADER]
    for t in range(3):
        for vm, (u, f, a, e, c, s) in TINY.items():
            lines.append(row(1000 + 300 * t, f"uuid-{vm}", f"vm-{vm}", "cpu", u[t], f[t], a[t], e[t], c[t], s[t]))
    path.write_text("".join(lines))
    return path


def run_main(argv, capsys):
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- metrics against hand computation --------------------------------------------------------------


def test_tiny_metrics_by_hand(tmp_path):
    a = analyze(load_history([write_tiny(tmp_path / "history-x.csv")]))
    m = a.result["resources"]["cpu"]
    assert m["vm_periods"] == 6
    assert m["mean_usage"] == pytest.approx(7 / 6)
    assert m["mean_allocation"] == pytest.approx(11 / 6)
    assert m["used_of_allocation"] == pytest.approx(7 / 11)
    assert m["pressure"] == pytest.approx(1 / 6)
    assert m["satisfaction_proxy"] == pytest.approx(5 / 6)
    # estimated demand = usage / (1 - signal): a's second period wanted 2 / 0.5 = 4
    assert m["satisfaction_est"] == pytest.approx(7 / 9)
    assert m["violations_est"] == pytest.approx(1 / 5)  # over the 5 VM-periods with usage > 0
    sat = [5 / 7, 1.0]  # a: 5 of 7, b: 2 of 2
    assert m["worst_off_est"] == pytest.approx(np.percentile(sat, 5))
    assert m["fairness_est"] == pytest.approx(sum(sat) ** 2 / (2 * sum(x * x for x in sat)))
    # a got 2 while it wanted 4 and was entitled to 3: below min(demand, entitlement)
    assert m["breaches_est"] == pytest.approx(1 / 5)
    ratio = [(5 / 3) / 3, (2 / 3) / 1]
    assert m["jain_use_entitlement"] == pytest.approx(sum(ratio) ** 2 / (2 * sum(x * x for x in ratio)))
    # forecast vs usage where both are known and usage > 0: a: +0.5 under, 1 over; b: exact; sum usage 5
    assert m["under_error"] == pytest.approx(0.5 / 5)
    assert m["over_error"] == pytest.approx(1.0 / 5)
    # one change (a: 2 -> 4) in 6 VM-periods of 5 minutes = half a VM-hour
    assert m["allocation_changes_per_vm_hour"] == pytest.approx(2.0)
    assert m["mean_credit"] == pytest.approx(0.3 / 6)
    assert a.result["resources"]["memory"]["vm_periods"] == 0
    assert a.result["resources"]["memory"]["mean_usage"] is None
    assert a.result["period_seconds"] == 300
    assert a.result["vms"] == 2 and a.result["periods"] == 3
    # per-VM table: a first (pressured), credit = latest, summed over resources
    first, second = a.result["vm_table"]
    assert (first["name"], second["name"]) == ("vm-a", "vm-b")
    assert first["pressure"] == pytest.approx(1 / 3)
    assert first["cpu_use"] == pytest.approx(5 / 3) and first["cpu_alloc"] == pytest.approx(8 / 3)
    assert first["credit"] == pytest.approx(0.3) and second["credit"] == pytest.approx(-0.2)
    assert first["memory_use"] is None


def test_writer_round_trip_and_vms_follow_uuids(tmp_path, kit):
    """History written by the real HistoryWriter, VMs coming and going, rows keyed by uuid."""
    hist = tmp_path / "hist"
    cap = [8.0, 16384.0, 1000.0, 1000.0]
    ent = np.tile([2.0, 4096.0, 250.0, 250.0], (3, 1))
    h = History(window=20)
    with HistoryWriter(hist, "host-a") as w:
        for t in range(12):
            uuids = ["u0", "u1", "u2"] if t < 6 else ["u2", "u0", "u3"]  # u1 leaves, u3 arrives, order changes
            vms = kit.vms(3, uuids=uuids)
            usage = np.tile([1.0, 1024.0, 10.0, 5.0], (3, 1)) * (1 + np.arange(3))[:, None]
            h.decide(forecast=usage * 1.1, allocation=ent, entitlement=ent)
            obs = kit.obs(vms, usage, cap, ts=86400.0 + 300.0 * t)
            h.push(obs)
            w.write(SimpleNamespace(obs=obs, entitlement=ent), h)
    a = analyze(load_history([hist]))
    r = a.result
    assert r["rows"] == 12 * 3 * N_RES and r["skipped_rows"] == 0
    assert r["vms"] == 4 and r["periods"] == 12
    m = r["resources"]["memory"]
    assert m["vm_periods"] == 36
    assert m["mean_usage"] == pytest.approx(np.mean([1024.0 * k for k in (1, 2, 3)] * 12))
    names = {v["name"] for v in r["vm_table"]}
    assert names == {"name-u0", "name-u1", "name-u2", "name-u3"}


# -- reading ---------------------------------------------------------------------------------------


def test_malformed_rows_are_skipped_and_counted(tmp_path, capsys):
    path = write_tiny(tmp_path / "history-bad.csv")
    good = path.read_text()
    bad = ("\n"  # blank lines are not rows (and do not shift the line numbers of the bad ones)
           + row(2000, "uuid-c", "vm-c", "cpu", 1, "", 1, 1).rstrip("\n") + ",extra\n"  # too many fields
           + "2000,host-a,uuid-c,vm-c,cpu,1,1\n"  # too few
           + "\n"
           + row(2000, "uuid-c", "vm-c", "cpu", "lots", "", 1, 1)  # not a number
           + row(2000, "uuid-c", "vm-c", "gpu", 1, "", 1, 1)  # unknown resource
           + row(2000, "", "vm-c", "cpu", 1, "", 1, 1)  # missing uuid
           + row(2300, "uuid-c", "vm-c", "cpu", 2, "", 1, 1))  # fine
    path.write_text(good + bad)
    other = tmp_path / "history-other.csv"
    other.write_text(HEADER + row(1000, "uuid-d", "vm-d", "memory", 5, "", 8, 8) + "1,2,3\n")
    d = load_history([path, other])
    assert d.n == 6 + 1 + 1
    assert d.skipped_rows == 6
    assert dict(d.skipped[str(path)]) == {"wrong field count": 2, "non-numeric value": 1, "unknown resource": 1,
                                          "missing vm_uuid": 1}
    assert dict(d.skipped[str(other)]) == {"wrong field count": 1}
    code, out, err = run_main([str(path), str(other), "--format", "json"], capsys)
    assert code == 0
    assert "skipped 6 malformed rows in 2 files" in err
    doc = strict_json(out)
    assert doc["skipped_rows"] == 6 and doc["rows"] == 8
    assert doc["resources"]["cpu"]["vm_periods"] == 7


def test_non_numeric_slow_path_keeps_the_good_numbers(tmp_path):
    path = write_tiny(tmp_path / "history-x.csv")
    with path.open("a") as fh:
        fh.write(row(2000, "uuid-a", "vm-a", "cpu", 1, "1e400", 1, 1))  # infinity is not a number we accept
        fh.write(row(2300, "uuid-a", "vm-a", "cpu", "n/a", "", 1, 1))
    ref = analyze(load_history([write_tiny(tmp_path / "history-ref.csv")])).result["resources"]["cpu"]
    d = load_history([path])
    assert d.skipped_rows == 2
    assert analyze(d).result["resources"]["cpu"] == ref


def test_empty_and_header_only_files_are_not_errors(tmp_path):
    empty = tmp_path / "history-2013-08-02.csv"
    empty.write_text("")
    header = tmp_path / "history-2013-08-03.csv"
    header.write_text(HEADER)
    allbad = tmp_path / "history-2013-08-04.csv"
    allbad.write_text(HEADER + "1,2\n")
    d = load_history([write_tiny(tmp_path / "history-2013-08-01.csv"), empty, header, allbad])
    assert d.n == 6 and d.skipped_rows == 1
    assert d.empty == [str(empty), str(header)]
    r = analyze(load_history([empty, header])).result
    assert r["rows"] == 0 and r["resources"]["cpu"]["vm_periods"] == 0 and r["vm_table"] == []


def test_crlf_and_duplicates(tmp_path):
    path = write_tiny(tmp_path / "history-x.csv")
    crlf = tmp_path / "history-crlf.csv"
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    d = load_history([crlf])
    assert d.n == 6 and d.skipped_rows == 0
    same = load_history([path, crlf])  # the same rows twice: counted once
    assert same.n == 6 and same.duplicates == 6


def test_globs_directories_and_gzip(tmp_path, capsys):
    plain = write_tiny(tmp_path / "history-2013-08-01.csv")
    gz = tmp_path / "gz" / "history-2013-08-01.csv.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ref = analyze(load_history([plain])).result["resources"]
    assert analyze(load_history([gz])).result["resources"] == ref
    assert analyze(load_history([str(tmp_path / "gz" / "*.csv.gz")])).result["resources"] == ref
    assert analyze(load_history([gz.parent])).result["resources"] == ref
    code, out, _ = run_main([str(tmp_path / "*.csv"), "--format", "json"], capsys)
    assert code == 0 and strict_json(out)["resources"] == ref


@pytest.mark.parametrize("case", ["missing", "header", "glob", "empty-dir", "bad-gzip"])
def test_unusable_input_is_one_error_line(tmp_path, capsys, case):
    if case == "missing":
        arg = tmp_path / "nope.csv"
    elif case == "header":
        arg = tmp_path / "other.csv"
        arg.write_text("a,b,c\n1,2,3\n")
    elif case == "glob":
        arg = tmp_path / "*.csv"
    elif case == "empty-dir":
        arg = tmp_path
    else:
        arg = tmp_path / "history-x.csv.gz"
        arg.write_bytes(b"\x1f\x8b" + b"not really gzip")
    code, out, err = run_main([str(arg)], capsys)
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rescoin: error: ") and str(arg) in lines[0]
    assert out == ""


def test_parser_help_and_defaults():
    import argparse

    p = argparse.ArgumentParser(prog="rescoin")
    sub = p.add_subparsers()
    add_analyze_parser(sub)
    args = p.parse_args(["analyze", "x.csv", "y.csv"])
    assert args.history == ["x.csv", "y.csv"] and args.format == "table" and args.vms == 20 and args.report is None
    text = sub.choices["analyze"].format_help()
    for word in ("--format", "--report", "--vms", "satisfaction_est", "pressure"):
        assert word in text


# -- output ----------------------------------------------------------------------------------------


def test_json_shape(tmp_path, capsys):
    code, out, _ = run_main([str(write_tiny(tmp_path / "history-x.csv")), "--format", "json", "--vms", "1"], capsys)
    assert code == 0
    doc = strict_json(out)
    assert set(doc["resources"]) == {"cpu", "memory", "disk", "net"}
    metrics = set(doc["resources"]["cpu"])
    assert {"pressure", "satisfaction_proxy", "under_error", "over_error", "fairness_est",
            "allocation_changes_per_vm_hour", "jain_use_entitlement"} <= metrics
    for r in doc["resources"].values():
        assert set(r) == metrics
        for v in r.values():
            assert v is None or (isinstance(v, (int, float)) and math.isfinite(v))
    assert len(doc["vm_table"]) == 1
    assert set(doc["vm_table"][0]) == {"uuid", "name", "cpu_use", "cpu_alloc", "memory_use", "memory_alloc",
                                       "pressure", "cpu_pressure", "memory_pressure", "credit"}
    for key in ("files", "rows", "skipped_rows", "vms", "periods", "period_seconds", "start", "end", "hosts"):
        assert key in doc


def test_table_output(tmp_path, capsys):
    code, out, _ = run_main([str(write_tiny(tmp_path / "history-x.csv"))], capsys)
    assert code == 0
    assert "6 rows from 1 file" in out
    assert "satisfaction_proxy" in out and "vm-a" in out and "vm-b" in out


def test_report_writes_pngs_and_self_contained_html(tmp_path, capsys):
    hist = write_tiny(tmp_path / "history-x.csv")
    report = tmp_path / "report"
    code, _, err = run_main([str(hist), "--report", str(report), "--format", "json"], capsys)
    assert code == 0
    pngs = sorted(report.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"usage-cpu.png", "fairness.png", "credits.png", "actions.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "report.html").read_text()
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(uris) == len(pngs)
    import base64

    assert {base64.b64decode(u)[:4] for u in uris} == {b"\x89PNG"}
    assert "vm-a" in page and "satisfaction_est" in page
    assert "report.html" in err
