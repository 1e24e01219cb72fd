"""The PNG plots of ``rescoin analyze --report`` and the report.html that embeds them."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rescoin.core.resources import N_RES, RESOURCES, UNITS
from rescoin.offline.analysis.metrics import ALLOC_CHANGE_REL, PRESSURE, Analysis
from rescoin.offline.analysis.report import html_page
from rescoin.offline.historycsv import HistoryData

#: ``save(fig, file name, caption)``
Save = Callable[[object, str, str], None]


def _dates(t: np.ndarray):
    return np.array(t, dtype="datetime64[s]").astype(object) if t.size else t


def _vm_series(d: HistoryData, r: int, v: int) -> slice:
    key = d.res.astype(np.int64) * max(d.n_vms, 1) + d.vm
    k = r * max(d.n_vms, 1) + v
    return slice(int(np.searchsorted(key, k, "left")), int(np.searchsorted(key, k, "right")))


def _timeaxis(ax) -> None:
    import matplotlib.dates as mdates

    loc = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.grid(alpha=0.3)


def _usage_plots(plt, a: Analysis, save: Save) -> None:
    """Usage vs forecast vs allocation of the top VMs, a figure per resource."""
    d = a.data
    for r, vms in a.top.items():
        label = RESOURCES[r].label
        fig, axes = plt.subplots(len(vms), 1, figsize=(11, 2.6 * len(vms)), squeeze=False, sharex=True)
        for ax, v in zip(axes[:, 0], vms, strict=True):
            s = _vm_series(d, r, v)
            t = _dates(d.ts[s])
            ax.plot(t, d.values["usage"][s], lw=0.9, label="usage", color="tab:blue")
            ax.plot(t, d.values["forecast"][s], lw=0.9, label="forecast", color="tab:orange")
            ax.plot(t, d.values["allocation"][s], lw=1.1, label="allocation", color="tab:green")
            ax.plot(t, d.values["entitlement"][s], lw=0.8, ls="--", label="entitlement", color="grey")
            sig = d.values["signal"][s]
            if np.nanmax(np.r_[sig, 0.0]) > PRESSURE:
                on = np.where(sig > PRESSURE, d.values["usage"][s], np.nan)
                ax.plot(t, on, ".", ms=2, color="tab:red", label="pressure on")
            ax.set_title(f"{d.names[v]}  ({label}, {UNITS[RESOURCES[r]]})", fontsize=9, loc="left")
            ax.set_ylim(bottom=0)
            _timeaxis(ax)
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
        fig.suptitle(f"{label}: usage, forecast and allocation of the {len(vms)} most pressured VMs", fontsize=11)
        save(fig, f"usage-{label}.png", f"{label}: usage vs forecast vs allocation, top {len(vms)} VMs")


def _fairness_plot(plt, a: Analysis, save: Save) -> None:
    t = _dates(a.tvals)
    present = [r for r in range(N_RES) if np.isfinite(a.series["jain_use_entitlement"][:, r]).any()
               or np.isfinite(a.series["satisfaction_est"][:, r]).any()]
    if not (t.size and present):
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for r in present:
        ax1.plot(t, a.series["jain_use_entitlement"][:, r], lw=0.9, label=RESOURCES[r].label)
        ax2.plot(t, a.series["satisfaction_est"][:, r], lw=0.9, label=RESOURCES[r].label)
    ax1.set_title("Jain's index over VMs of usage / entitlement, per period", fontsize=10, loc="left")
    ax2.set_title("satisfaction estimate per period (sum usage / sum estimated demand)", fontsize=10, loc="left")
    for ax in (ax1, ax2):
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        _timeaxis(ax)
    save(fig, "fairness.png", "fairness over time")


def _credits_plot(plt, a: Analysis, save: Save) -> None:
    d, t = a.data, _dates(a.tvals)
    fig, axes = plt.subplots(N_RES, 1, figsize=(11, 2.3 * N_RES), sharex=True)
    show = a.table_vms[:5]
    for r, ax in enumerate(axes):
        for v in show:
            s = _vm_series(d, r, v)
            if s.stop > s.start:
                ax.plot(_dates(d.ts[s]), d.values["credit"][s], lw=0.8, label=str(d.names[v]))
        ax.plot(t, a.series["mean_credit"][:, r], lw=1.6, color="black", label="mean over VMs")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{RESOURCES[r].label} credit (share of host capacity)", fontsize=9, loc="left")
        _timeaxis(ax)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle("credits over time: the top VMs of the per-VM table and the mean", fontsize=11)
    save(fig, "credits.png", "credits over time")


def _actions_plot(plt, a: Analysis, save: Save) -> None:
    changes = a.series["changes"]
    x, per = _dates(a.tvals), "period"
    if a.tvals.size > 600:  # hourly sums stay readable over weeks
        hour = np.floor((a.tvals - a.tvals[0]) / 3600.0).astype(np.int64)
        hours, inv = np.unique(hour, return_inverse=True)
        changes = np.stack([np.bincount(inv, weights=changes[:, r], minlength=hours.size)
                            for r in range(N_RES)], axis=1)
        x, per = _dates(a.tvals[0] + hours * 3600.0), "hour"
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for r in range(N_RES):
        ax.plot(x, changes[:, r], lw=0.9, label=RESOURCES[r].label, drawstyle="steps-post")
    ax.set_title(f"allocation changes (> {ALLOC_CHANGE_REL:.0%}) per {per}, all VMs", fontsize=10, loc="left")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    _timeaxis(ax)
    save(fig, "actions.png", f"allocation changes per {per}")


def write_report(a: Analysis, out: str | Path) -> list[Path]:
    """PNG plots and a self-contained report.html (PNGs embedded as data URIs); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[tuple[Path, str]] = []

    def save(fig, name: str, caption: str) -> None:
        path = out / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        pngs.append((path, caption))

    _usage_plots(plt, a, save)
    _fairness_plot(plt, a, save)
    if a.tvals.size:
        _credits_plot(plt, a, save)
        _actions_plot(plt, a, save)
    (out / "report.html").write_text(html_page(a.result, pngs), encoding="utf-8")
    return [p for p, _ in pngs] + [out / "report.html"]
