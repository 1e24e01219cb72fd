"""What people see in the terminal: metric tables, a live view of the loop, progress bars.

Tables are built to fit the output's width (80 columns when it is not a
terminal): a table too wide is split by columns into two or more, its first
column repeated, so no cell is ever cut. Progress bars go to stderr, and only
when stderr is a terminal: a redirected file gets no bar.
"""
from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from rescoin.core.history import History
from rescoin.core.loop import Step
from rescoin.core.resources import CPU, MEMORY, RESOURCES, UNITS
from rescoin.offline.evaluate import METRICS

SHORT = {"satisfaction": "satisf", "violations": "viol", "worst_off": "worst", "fairness": "Jain",
         "breaches": "breach", "actuations_per_vm_hour": "act/VMh", "reclaimed": "reclaim",
         "under_error": "under", "over_error": "over", "weighted_worst_off": "w.worst", "resident": "resid",
         "padded_under_error": "p.under", "padded_over_error": "p.over"}
#: what each metric column means (docs/architecture.md, "Metrics"), printed under the tables
LEGEND = {
    "satisf": "granted / demand, both summed over VM-periods *",
    "viol": "share of VM-periods granted less than 95% of their demand",
    "worst": "5th percentile over VMs of each VM's own granted / demand",
    "Jain": "Jain's index of that per-VM satisfaction (1 = all equal)",
    "breach": "share of VM-periods granted less than min(demand, entitlement)",
    "act/VMh": "changes applied per VM-hour (shares, caps, balloon, blkio weight)",
    "pin/VMh": "vCPU pin changes per VM-hour",
    "reclaim": "share of provisioned memory returned to the host, mean over time",
    "w.worst": "worst, against each VM's weighted fair share (weights differ)",
    "resid": "memory resident on the host / provisioned memory, mean over time",
    "under": "raw forecast below demand: sum of (demand - forecast) / sum of demand *",
    "over": "raw forecast above demand: sum of (forecast - demand) / sum of demand *",
    "p.under": "the same for the padded forecast the policy plans on *",
    "p.over": "the same, above demand, for the padded forecast *",
    "swap": "host swap: share of periods with guest memory swapped out",
    "peak": "host swap: most guest memory swapped out at once, MiB",
    "swapped": "host swap: MiB swapped out, summed over periods (MiB-periods)",
}
LEGEND_NOTE = ("* demand-weighted: a VM counts by its demand; the others count",
               "VM-periods or VMs. Only VM-periods with demand > 0; - = none.")
#: the style of the report tables: a rule under the header, no frame
COMPACT: dict[str, Any] = {"box": box.SIMPLE_HEAD, "padding": (0, 0, 0, 1), "pad_edge": False}


def progress(console: Console | None = None, transient: bool = False) -> Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal.

    ``console`` is used only if it writes to stderr: a bar must never land in
    a redirected stdout (tables, JSON), nor in a redirected stderr.
    """
    err = console if console is not None and console.stderr else Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=transient,
                    disable=not err.is_terminal)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if v != 0 and abs(v) < 5e-5:
        return f"{v:.0e}"  # a rare event (one breach in 100,000 VM-periods) must not print as 0.0000
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


# -- tables that fit -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Col:
    """One column: its header (may hold a newline, e.g. a unit under the name) and alignment.

    ``wrap``: a text column (agent errors, action lists) that wraps at this many
    columns; every other column never wraps.
    """

    header: str
    justify: JustifyMethod = "right"
    wrap: int | None = None


def output_width(width: int | None = None) -> int:
    """``width``, else the width of stdout: its terminal's, or 80 for a pipe or a file."""
    return int(width) if width else Console().width


def _natural_width(table: Table) -> int:
    """The columns a table takes when nothing in it wraps."""
    probe = Console(width=1_000_000, file=io.StringIO())
    return Measurement.get(probe, probe.options, table).maximum


def _table(title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[str]], style: dict) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", **style)
    for c in cols:
        t.add_column(c.header, justify=c.justify, no_wrap=c.wrap is None, max_width=c.wrap)
    for row in rows:
        t.add_row(*(Text(c) for c in row))  # plain text: a VM named "[b]" is not markup
    return t


def fit_tables(title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int | None = None,
               keep: int = 1, **style) -> list[Table]:
    """The table, or its columns split over as few tables as fit ``width`` (the first ``keep`` in each).

    Cells never wrap, so a number is never cut: the split is what makes room.
    A table whose first columns alone are too wide gets one column per part,
    and rich wraps (never cuts) its text columns to fit.
    """
    width = output_width(width)
    lead, body = list(cols[:keep]), list(cols[keep:])
    if not body:
        return [_table(title, lead, rows, style)]
    for parts in range(1, len(body) + 1):
        bounds = [-(-len(body) * k // parts) for k in range(parts + 1)]  # near-equal, earlier parts the larger
        tables = []
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
            name = title if parts == 1 or title is None else f"{title}, part {k + 1} of {parts}"
            idx = list(range(keep)) + list(range(keep + a, keep + b))
            tables.append(_table(name, [cols[i] for i in idx], [[r[i] for i in idx] for r in rows], style))
        if all(_natural_width(t) <= width for t in tables):
            return tables
    for t in tables:  # even one column per part is too wide: let the leading text columns wrap
        for c in t.columns[:keep]:
            c.no_wrap, c.overflow = False, "fold"
    return tables


def legend(columns: Sequence[str]) -> Table:
    """Two columns: a short column name and what it means, for the names given."""
    t = Table.grid(padding=(0, 2, 0, 0))
    t.add_column(no_wrap=True)
    t.add_column()
    for name in columns:
        t.add_row(name, LEGEND[name])
    for line in LEGEND_NOTE:
        t.add_row("", line)
    return t


def metric_tables(result: dict, width: int | None = None) -> list[RenderableType]:
    """A table per resource (a row per policy, a column per metric), then a legend.

    A resource no VM had demand for (a CPU-only trace's memory, disk, net) gets no table.
    """
    out: list[RenderableType] = []
    shown_all: list[str] = []
    policies = result["policies"]
    for r in RESOURCES:
        shown = [m for m in METRICS if any(p[r.label].get(m) is not None for p in policies.values())]
        if not shown:
            continue
        cols = [Col("policy", "left")] + [Col(SHORT[m]) for m in shown]
        rows = [[name] + [_fmt(res[r.label].get(m)) for m in shown] for name, res in policies.items()]
        if r == CPU:  # pins are a CPU action: beside the other actuations
            at = next((i + 1 for i, c in enumerate(cols) if c.header == "act/VMh"), len(cols))
            cols.insert(at, Col("pin/VMh"))
            for row, res in zip(rows, policies.values(), strict=False):
                row.insert(at, _fmt(res["pin_changes_per_vm_hour"]))
        out += fit_tables(f"{r.label} ({UNITS[r]})", cols, rows, width, **COMPACT)
        shown_all += [c.header for c in cols[1:] if c.header not in shown_all]
        if r == MEMORY:
            out += _swap_table(policies, width, shown_all)
    if out:
        out.append(legend([name for name in LEGEND if name in shown_all]))
    return out


def _swap_table(policies: dict, width: int | None, shown_all: list[str]) -> list[Table]:
    """Host swap per policy, where the simulated host reports it."""
    swaps = {name: res.get("host_swap") or {} for name, res in policies.items()}
    if not any(v.get("share_of_periods") is not None for v in swaps.values()):
        return []
    shown_all += ["swap", "peak", "swapped"]
    cols = [Col("policy", "left"), Col("swap"), Col("peak"), Col("swapped")]
    rows = [[name, _fmt(v.get("share_of_periods")), _fmt(v.get("peak_mib")), _fmt(v.get("mib_periods"))]
            for name, v in swaps.items()]
    return fit_tables("host swap", cols, rows, width, **COMPACT)


class LiveView:
    """A live table of the busiest VMs: usage, forecast, allocation and credit."""

    def __init__(self, console: Console, title: str, rows: int = 12, every: float = 0.25) -> None:
        self.console = console
        self.title = title
        self.rows = rows
        self.every = every
        self._last = 0.0
        self._live = Live(console=console, refresh_per_second=8, transient=False)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)
        if not self.console.is_terminal:  # rich ends the last frame with a newline only on a terminal
            self.console.line()

    def update(self, step: Step, history: History, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self._live.update(self.render(step, history))

    def render(self, step: Step, history: History) -> Group:
        obs = step.obs
        cap = obs.host.capacity
        credit = step.allocation.diagnostics["combined_credit"]  # NaN for a policy without credits
        use = history.latest("usage")
        fc = step.forecast.value if step.forecast is not None else np.full_like(use, np.nan)
        alloc = step.allocation.amount
        target = step.plan.controls.balloon
        when = datetime.fromtimestamp(obs.ts, tz=UTC).strftime("%Y-%m-%d %H:%M")
        total_use = np.nansum(use, axis=0)
        head = "  ".join([f"[bold]{self.title}[/]", f"period {history.t}", when,
                          f"cpu {total_use[CPU]:.1f}/{cap[CPU]:.0f} cores",
                          f"mem {total_use[MEMORY] / 1024:.1f}/{cap[MEMORY] / 1024:.0f} GiB",
                          f"actions {step.result.total}"])
        cols = [Col("VM", "left"), Col("cpu use\ncores"), Col("cpu fc\ncores"), Col("cpu alloc\ncores"),
                Col("mem use\nMiB"), Col("mem fc\nMiB"), Col("balloon\nMiB"), Col("credit")]
        order = np.argsort(-np.nan_to_num(use[:, CPU] / np.maximum(obs.vms.sizes[:, CPU], 1)))[: self.rows]
        rows = [[str(obs.vms.names[i]), _fmt(use[i, CPU]), _fmt(fc[i, CPU]), _fmt(alloc[i, CPU]),
                 _mib(use[i, MEMORY]), _mib(fc[i, MEMORY]), _mib(target[i]),
                 f"{credit[i]:+.3f}" if np.isfinite(credit[i]) else "-"] for i in order]
        return Group(head, *fit_tables(None, cols, rows, self.console.width))


def _mib(v: float) -> str:
    return f"{v:.0f}" if np.isfinite(v) else "-"
