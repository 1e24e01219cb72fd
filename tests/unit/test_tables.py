"""Tables people can read: 80 columns, no cut numbers, a legend, no empty tables, no bars in files.

Tables are rendered the way a pipe gets them (rich at width 80, no terminal)
and read back: every cell must be there in full, under its own header. The
commands themselves, as processes on a pipe and a terminal, are in
tests/integration/test_commands_on_a_pipe.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from rescoin.core.resources import CPU, RESOURCES
from rescoin.offline.simulate import simulate
from rescoin.offline.traces import load_trace, sample_trace_path
from rescoin.view import SHORT, Col, _fmt, fit_tables, metric_tables, progress

DATA = Path(__file__).resolve().parents[1] / "data"
PLANETLAB = DATA / "planetlab"
LONG_NAMES = ["rescoin", "rescoin-paper", "kvmscheduling", "static"]
METRIC_OF = {short: m for m, short in SHORT.items()}


def rendered(renderable, width: int = 80) -> str:
    buf = io.StringIO()
    Console(width=width, file=buf, color_system=None).print(renderable)
    return buf.getvalue()


def assert_fits(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
    assert "…" not in text, text


def read_metric_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header cells and, per policy, the row's cells of one rendered metric table."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["policy"])
    header = lines[at].split()
    rows = {line.split()[0]: line.split() for line in lines[at + 2:] if line.strip()}
    return header, rows


def check_every_cell(result: dict, width: int = 80) -> list[str]:
    """Render at ``width``; every value of ``result`` must appear whole under its header. Returns the titles."""
    out = metric_tables(result, width)
    tables = [t for t in out if isinstance(t, Table) and t.title]  # the legend is a titleless grid
    titles = [str(t.title) for t in tables]
    for r in RESOURCES:
        parts = [t for t in tables if str(t.title).startswith(f"{r.label} (")]
        seen: list[str] = []
        for t in parts:
            text = rendered(t, width)
            assert_fits(text, width)
            header, rows = read_metric_table(text)
            assert header[0] == "policy" and set(rows) == set(result["policies"])
            for name, cells in rows.items():
                assert len(cells) == len(header), (header, cells)
                res = result["policies"][name]
                for h, cell in zip(header[1:], cells[1:], strict=False):
                    want = res["pin_changes_per_vm_hour"] if h == "pin/VMh" else res[r.label][METRIC_OF[h]]
                    assert cell == _fmt(want), (r.label, name, h, cell)
            seen += header[1:]
        shown = [SHORT[m] for m in SHORT if any(p[r.label].get(m) is not None for p in result["policies"].values())]
        want = set(shown) | ({"pin/VMh"} if r == CPU and shown else set())
        assert set(seen) == want and len(seen) == len(want), (r.label, seen)  # every column, once
    return titles


@pytest.fixture(scope="module")
def sample_result() -> dict:
    trace = load_trace(sample_trace_path(), vms=8, days=0.25)
    return simulate(trace, LONG_NAMES)


def test_metric_tables_fit_80_columns_and_cut_no_number(sample_result):
    titles = check_every_cell(sample_result)
    assert any(t.startswith("memory") for t in titles) and any(t.startswith("net") for t in titles)
    text = rendered(metric_tables(sample_result, 80)[0])
    assert "rescoin-paper" in text and "kvmscheduling" in text  # policy names whole too


def test_wide_values_and_rare_events_are_never_cut():
    # values as wide as _fmt makes them, and the 0.0214 (printed "0.021" once cut)
    metrics = {"satisfaction": 0.0214, "violations": 3.9e-5, "worst_off": 0.0214, "fairness": 0.99991,
               "breaches": 1e-6, "actuations_per_vm_hour": 123456.0, "reclaimed": 0.5,
               "under_error": 12.345, "over_error": 99.99}
    policies = {name: {r.label: dict(metrics) for r in RESOURCES} | {"pin_changes_per_vm_hour": 98765.0}
                for name in LONG_NAMES + ["vm-balancer", "oracle"]}
    result = {"policies": policies}
    for width in (80, 60):
        check_every_cell(result, width)
    text = "".join(rendered(x) for x in metric_tables(result, 80))
    assert "0.0214" in text and "4e-05" in text and "123456" in text


def test_a_cpu_only_trace_prints_no_empty_tables():
    result = simulate(load_trace(PLANETLAB, days=0.25), ["rescoin", "static"])
    titles = check_every_cell(result)
    assert titles and all(t.startswith("cpu (cores)") for t in titles), titles


def test_legend_says_what_every_column_means(sample_result):
    out = metric_tables(sample_result, 80)
    headers = {h for t in out if isinstance(t, Table) and t.title for h in read_metric_table(rendered(t))[0][1:]}
    legend = rendered(out[-1])
    assert_fits(legend)
    names = [line.split()[0] for line in legend.splitlines() if line.strip() and not line.startswith(" ")]
    assert headers <= set(names), headers - set(names)
    weighted = {line.split()[0] for line in legend.splitlines() if line.rstrip().endswith("*")}
    assert weighted == {"satisf", "under", "over", "p.under", "p.over"}  # sums over sums of demand
    assert "demand-weighted" in legend


def test_fit_tables_splits_keeping_the_first_column_and_rows_in_order():
    cols = [Col("VM", "left")] + [Col(f"col{i}\nMiB") for i in range(12)]
    rows = [[f"vm-{v}"] + [f"{v * 1000 + i}.25" for i in range(12)] for v in range(5)]
    tables = fit_tables("many columns", cols, rows, 80)
    assert len(tables) >= 2
    seen = []
    for t in tables:
        text = rendered(t)
        assert_fits(text)
        assert str(t.columns[0].header) == "VM"
        body = [[c for c in line.split() if c != "│"] for line in text.splitlines() if "vm-" in line]
        assert [b[0] for b in body] == [f"vm-{v}" for v in range(5)]  # same rows, same order
        for b in body:
            v = int(b[0].split("-")[1])
            for i, cell in zip(range(len(seen), len(seen) + len(b) - 1), b[1:], strict=False):
                assert cell == f"{v * 1000 + i}.25"
        seen += [str(c.header) for c in t.columns[1:]]
    assert seen == [f"col{i}\nMiB" for i in range(12)]
    assert len(fit_tables("few", cols[:3], [r[:3] for r in rows], 80)) == 1  # fits: one table


def test_progress_bar_goes_to_stderr_and_only_to_a_terminal(capsys):
    bar = progress(Console(file=io.StringIO()))  # a stdout-like console is not used
    assert bar.console.stderr and bar.disable  # capsys: stderr is not a terminal
    with bar:
        task = bar.add_task("x", total=3)
        bar.advance(task, 3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
