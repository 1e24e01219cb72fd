"""What people see in the terminal: metric tables, a live view of the loop, progress bars."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .evaluate import METRICS
from .history import History
from .loop import Step
from .policies.rescoin import combined_credit, credits
from .policies.base import PolicyInput
from .resources import CPU, MEMORY, RESOURCES, UNITS

SHORT = {"satisfaction": "satisf", "violations": "viol", "worst_off": "worst", "fairness": "Jain",
         "breaches": "breach", "actuations_per_vm_hour": "act/VMh", "reclaimed": "reclaim",
         "under_error": "under", "over_error": "over"}


def progress(console: Console | None = None, transient: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if v != 0 and abs(v) < 5e-5:
        return f"{v:.0e}"  # a rare event (one breach in 100,000 VM-periods) must not print as 0.0000
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def metric_tables(result: dict) -> list[Table]:
    """One table per resource: a row per policy, a column per metric (DESIGN section 10)."""
    tables = []
    policies = result["policies"]
    for r in RESOURCES:
        t = Table(title=f"{r.label} ({UNITS[r]})", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
        t.add_column("policy", no_wrap=True)
        shown = [m for m in METRICS if any(p[r.label][m] is not None for p in policies.values())]
        for m in shown:
            t.add_column(SHORT[m], justify="right", no_wrap=True, min_width=6)
        if r == CPU:
            t.add_column("pin/VMh", justify="right", no_wrap=True, min_width=6)
        for name, res in policies.items():
            row = [name] + [_fmt(res[r.label][m]) for m in shown]
            if r == CPU:
                row.append(_fmt(res["pin_changes_per_vm_hour"]))
            t.add_row(*row)
        tables.append(t)
    return tables


class LiveView:
    """A live table of the busiest VMs: usage, forecast, allocation and credit."""

    def __init__(self, console: Console, title: str, rows: int = 12, every: float = 0.25) -> None:
        self.console = console
        self.title = title
        self.rows = rows
        self.every = every
        self._last = 0.0
        self._live = Live(console=console, refresh_per_second=8, transient=False)

    def __enter__(self) -> "LiveView":
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)

    def update(self, step: Step, history: History, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self._live.update(self.render(step, history))

    def render(self, step: Step, history: History) -> Group:
        obs = step.obs
        cap = obs.host.capacity
        inp = PolicyInput(obs=obs, forecast=None, history=history, capacity=cap,
                          entitlement=step.entitlement, period=obs.interval)
        credit = combined_credit(credits(inp, 10), 1.0)
        use = history.latest("usage")
        fc = step.forecast.value if step.forecast is not None else np.full_like(use, np.nan)
        alloc = step.allocation.amount
        target = step.plan.controls.balloon
        when = datetime.fromtimestamp(obs.ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        total_use = np.nansum(use, axis=0)
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[bold]{self.title}[/]", f"period {history.t}", when,
            f"cpu {total_use[CPU]:.1f}/{cap[CPU]:.0f} cores",
            f"mem {total_use[MEMORY] / 1024:.1f}/{cap[MEMORY] / 1024:.0f} GiB",
            f"actions {step.result.total}",
        )
        t = Table(header_style="bold", expand=False)
        for col in ("VM", "cpu use", "cpu fc", "cpu alloc", "mem use", "mem fc", "balloon", "credit"):
            t.add_column(col, justify="left" if col == "VM" else "right")
        order = np.argsort(-np.nan_to_num(use[:, CPU] / np.maximum(obs.vms.sizes[:, CPU], 1)))[: self.rows]
        for i in order:
            t.add_row(
                str(obs.vms.names[i]),
                _fmt(use[i, CPU]), _fmt(fc[i, CPU]), _fmt(alloc[i, CPU]),
                f"{use[i, MEMORY]:.0f}" if np.isfinite(use[i, MEMORY]) else "-",
                f"{fc[i, MEMORY]:.0f}" if np.isfinite(fc[i, MEMORY]) else "-",
                f"{target[i]:.0f}" if np.isfinite(target[i]) else "-",
                f"{credit[i]:+.3f}",
            )
        return Group(head, t)
