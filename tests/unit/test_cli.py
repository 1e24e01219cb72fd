"""The command line: simulate (JSON and table), run on a simulated host, user errors."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pandas as pd
import pytest

from rescoin.cli import main
from rescoin.offline.historycsv import read_history
from rescoin.offline.traces import load_trace, sample_trace_path

DATA = Path(__file__).resolve().parents[1] / "data"
PLANETLAB = DATA / "planetlab"
METRICS = {"satisfaction", "violations", "worst_off", "fairness", "breaches", "actuations_per_vm_hour",
           "reclaimed", "under_error", "over_error", "weighted_worst_off", "resident", "padded_under_error",
           "padded_over_error"}
CSV_COLUMNS = ["ts", "host", "vm_uuid", "vm_name", "resource", "usage", "forecast", "allocation",
               "entitlement", "credit", "signal"]


@pytest.fixture
def keep_signals():
    """``rescoin run`` installs SIGTERM/SIGINT handlers: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def strict_json(text: str):
    def bad(name):
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=bad)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# -- simulate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulate_json():
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["simulate", "--trace", str(PLANETLAB), "--format", "json", "--policies", "rescoin,static"])
    return code, out.getvalue()


def test_simulate_json_shape(simulate_json):
    code, out = simulate_json
    assert code == 0
    doc = strict_json(out)
    trace = load_trace(PLANETLAB)
    assert doc["vms"] == trace.n_vms
    assert doc["periods"] == trace.n_periods
    assert isinstance(doc["trace"], str) and doc["trace"]
    assert set(doc["policies"]) == {"rescoin", "static"}
    for name, pol in doc["policies"].items():
        assert set(pol) == {"cpu", "memory", "disk", "net", "pin_changes_per_vm_hour", "host_swap"}, name
        assert isinstance(pol["pin_changes_per_vm_hour"], (int, float))
        assert pol["pin_changes_per_vm_hour"] >= 0
        for r in ("cpu", "memory", "disk", "net"):
            assert set(pol[r]) == METRICS, (name, r)
        cpu = pol["cpu"]
        for m in ("satisfaction", "violations", "worst_off", "fairness", "breaches"):
            assert isinstance(cpu[m], float) and 0.0 <= cpu[m] <= 1.0 + 1e-9, (name, m)
        assert cpu["actuations_per_vm_hour"] >= 0
        # a CPU-only trace: nothing to report for memory, disk or net
        for r in ("memory", "disk", "net"):
            assert all(v is None for v in pol[r].values()), (name, r)


def test_simulate_json_forecast_errors_only_with_a_forecast(simulate_json):
    doc = strict_json(simulate_json[1])
    assert doc["policies"]["static"]["cpu"]["under_error"] is None
    assert doc["policies"]["rescoin"]["cpu"]["under_error"] >= 0
    assert doc["policies"]["rescoin"]["cpu"]["over_error"] >= 0


def test_simulate_table(capsys):
    assert main(["simulate", "--trace", str(PLANETLAB), "--policies", "static", "--days", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "satisf" in out.lower() and "cpu" in out


@pytest.mark.parametrize("value, text", [(0.0, "0.0000"), (3.9e-5, "4e-05"), (0.25, "0.2500"), (1.62, "1.62"),
                                         (250.0, "250"), (None, "-"), (float("nan"), "-")])
def test_table_numbers_never_hide_a_rare_event(value, text):
    from rescoin.view import _fmt

    assert _fmt(value) == text


def test_simulate_unknown_policy(capsys):
    code = main(["simulate", "--trace", str(PLANETLAB), "--format", "json", "--policies", "rescoin,bogus"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = error_lines(captured.err)
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rescoin: error:") and "bogus" in lines[0] and "static" in lines[0]


def test_simulate_missing_trace_dir(capsys, tmp_path):
    missing = tmp_path / "no-such-trace"
    code = main(["simulate", "--trace", str(missing), "--format", "json", "--policies", "static"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rescoin: error:") and str(missing) in lines[0]


def test_simulate_empty_trace_dir(capsys, tmp_path):
    code = main(["simulate", "--trace", str(tmp_path), "--format", "json", "--policies", "static"])
    assert code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert any(line.startswith("rescoin: error:") for line in error_lines(captured.err))


# -- run ---------------------------------------------------------------------------------------------


def test_run_on_sim_writes_history(capsys, tmp_path, keep_signals):
    sample = sample_trace_path()
    n_vms = len(list(sample.glob("*/*.csv.gz")))
    hist = tmp_path / "hist"
    code = main(["run", "--uri", f"sim:{sample}", "--speed", "0", "--max-periods", "5", "--history", str(hist)])
    assert code == 0
    files = sorted(hist.glob("history-*.csv"))
    assert files, "no history CSV written"
    df = read_history([hist])
    assert list(df.columns) == CSV_COLUMNS
    assert df["ts"].nunique() == 5
    assert df["vm_uuid"].nunique() == n_vms
    assert len(df) == 5 * n_vms * 4
    for f in files:
        assert list(pd.read_csv(f).columns) == CSV_COLUMNS


def test_run_dry_run_applies_nothing(capsys, tmp_path, keep_signals):
    hist = tmp_path / "hist"
    code = main(["run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "3", "--dry-run",
                 "--history", str(hist)])
    assert code == 0
    df = read_history([hist])
    assert df["ts"].nunique() == 3
    err = capsys.readouterr().err
    assert "dry-run" in err and "not applied" in err  # the plan is shown instead of applied


def test_run_unknown_uri(capsys, keep_signals, tmp_path):
    # paths of its own: the defaults under /var/lib/rescoin may be locked by a daemon running on this machine
    code = main(["run", "--uri", "bogus:///x", "--max-periods", "1", "--state", str(tmp_path / "st.npz"),
                 "--history", str(tmp_path / "h"), "--status-socket", str(tmp_path / "s.sock")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(line.startswith("rescoin: error:") and "bogus:///x" in line for line in error_lines(err))


def test_run_bad_model_file(capsys, tmp_path, keep_signals):
    model = tmp_path / "bad.toml"
    model.write_text("[cpu]\nalpha_up = 7\n")
    code = main(["run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "1",
                 "--model", str(model)])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(line.startswith("rescoin: error:") and "bad.toml" in line for line in error_lines(err))
