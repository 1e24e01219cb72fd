"""What ``rescoin analyze`` shows: the summary line, the rich tables and the HTML report page."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from rescoin.core.resources import MEMORY, RESOURCES, UNITS
from rescoin.offline.analysis.metrics import DEFINITIONS, RES_METRICS


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:,.1f}"


def _mib(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.0f}"


def summary_line(result: dict) -> str:
    return (f"{result['rows']:,} rows from {result['files']} file{'s' * (result['files'] != 1)}: "
            f"{result['vms']} VMs on {len(result['hosts'])} host{'s' * (len(result['hosts']) != 1)}, "
            f"{result['periods']} periods of {result['period_seconds']:g} s, "
            f"{result['start'] or '-'} .. {result['end'] or '-'}")


def tables(result: dict, width: int | None = None) -> list:
    """Rich tables that fit ``width``: metrics (a row per metric, a column per resource), then the VMs.

    A resource with no usage in the history (memory, disk, net of a CPU-only
    trace) gets no column; a table too wide is split (``view.fit_tables``).
    """
    from rescoin.view import COMPACT, Col, fit_tables

    live = [r for r in RESOURCES if result["resources"][r.label].get("mean_usage") is not None] or list(RESOURCES)
    cols = [Col("metric", "left")] + [Col(f"{r.label}\n{UNITS[r]}") for r in live]
    rows = [[name] + [_fmt(result["resources"][r.label][name]) for r in live] for name in RES_METRICS]
    out = fit_tables("per resource (history-based; see `rescoin analyze --help` for definitions)", cols, rows,
                     width, 1, **COMPACT)
    mem = MEMORY in live
    vcols = [Col("VM", "left"), Col("cpu use\ncores"), Col("cpu alloc\ncores")]
    vcols += [Col("mem use\nMiB"), Col("mem alloc\nMiB")] if mem else []
    vcols += [Col("pressure"), Col("cpu\npress.")] + ([Col("mem\npress.")] if mem else []) + [Col("credit")]
    vrows = []
    for row in result["vm_table"]:
        mem_cells = [_mib(row["memory_use"]), _mib(row["memory_alloc"])] if mem else []
        vrows.append([row["name"], _fmt(row["cpu_use"], 3), _fmt(row["cpu_alloc"], 3), *mem_cells,
                      _fmt(row["pressure"], 3), _fmt(row["cpu_pressure"], 3),
                      *([_fmt(row["memory_pressure"], 3)] if mem else []),
                      "-" if row["credit"] is None else f"{row['credit']:+.3f}"])
    out += fit_tables(f"top {len(result['vm_table'])} VMs by pressure (means over the run; credit: latest, "
                      "summed over resources)", vcols, vrows, width, 1, **COMPACT)
    return out


def html_page(result: dict, pngs: list[tuple[Path, str]]) -> str:
    """The self-contained report page: the tables as HTML, the PNGs as data URIs, the definitions."""
    e = html.escape
    head = "".join(f"<th>{e(r.label)} ({e(UNITS[r])})</th>" for r in RESOURCES)
    body = "".join(
        f"<tr><td title='{e(DEFINITIONS[m])}'>{e(m)}</td>"
        + "".join(f"<td>{e(_fmt(result['resources'][r.label][m]))}</td>" for r in RESOURCES) + "</tr>"
        for m in RES_METRICS)
    cols = ("VM", "uuid", "cpu use", "cpu alloc", "mem use MiB", "mem alloc MiB", "pressure", "cpu press.",
            "mem press.", "credit")
    vm_rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            row["name"], row["uuid"], _fmt(row["cpu_use"], 3), _fmt(row["cpu_alloc"], 3),
            _mib(row["memory_use"]), _mib(row["memory_alloc"]), _fmt(row["pressure"], 3),
            _fmt(row["cpu_pressure"], 3), _fmt(row["memory_pressure"], 3), _fmt(row["credit"], 3))) + "</tr>"
        for row in result["vm_table"])
    defs = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS.items())
    imgs = "".join(
        f"<figure><img alt='{e(cap)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode('ascii')}'><figcaption>{e(cap)} ({e(p.name)})</figcaption></figure>"
        for p, cap in pngs)
    skipped = ""
    if result["skipped_rows"]:
        skipped = f"<p class='warn'>skipped {result['skipped_rows']} malformed rows: " + e(
            "; ".join(f"{f}: " + ", ".join(f"{k} {n}" for k, n in c.items()) for f, c in result["skipped"].items())
        ) + "</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rescoin history report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 90%; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
.warn {{ color: #a40; }}
dt {{ font-weight: bold; margin-top: .4em; }}
</style></head><body>
<h1>rescoin history report</h1>
<p>{e(summary_line(result))}.</p>
<p>History holds granted usage and the unmet-demand signal, never true demand: every metric below is
computed from what the host showed (definitions at the end).</p>
{skipped}
<h2>Per resource</h2>
<table><tr><th>metric</th>{head}</tr>{body}</table>
<h2>Top VMs by pressure</h2>
<table><tr>{''.join(f'<th>{e(c)}</th>' for c in cols)}</tr>{vm_rows}</table>
<h2>Plots</h2>
{imgs}
<h2>Definitions</h2>
<dl>{defs}</dl>
</body></html>
"""
