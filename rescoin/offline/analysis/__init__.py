"""Offline analysis of history CSV files, ``rescoin analyze HISTORY...``.

The history reader is :mod:`rescoin.offline.historycsv` (one reader for
analyze and fit); here are the metrics (``metrics``), the tables and the HTML
page (``report``) and the PNG plots (``plots``). The command line is
``rescoin.cli.analyze``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rescoin.offline.analysis.metrics import (
    ALLOC_CHANGE_REL,
    DEFINITIONS,
    PRESSURE,
    RES_METRICS,
    SIGNAL_CAP,
    VIOLATION_SIGNAL,
    VM_COLUMNS,
    Analysis,
    analyze,
)
from rescoin.offline.analysis.plots import write_report
from rescoin.offline.analysis.report import html_page, summary_line, tables
from rescoin.offline.historycsv import (
    NUMERIC,
    VALUES,
    HistoryData,
    HistoryError,
    expand_paths,
    load_history,
    read_file,
)


def load_with_progress(paths: Iterable[str | Path], console=None) -> HistoryData:
    """load_history with a rich progress bar over files on ``console`` (stderr by default)."""
    from rich.console import Console

    from rescoin.view import progress

    console = console or Console(stderr=True)
    files = expand_paths(paths)
    with progress(console, transient=True) as bar:
        task = bar.add_task("reading history", total=len(files))
        return load_history(files=files, paths=(), on_file=lambda _f: bar.advance(task))


__all__ = ["ALLOC_CHANGE_REL", "DEFINITIONS", "NUMERIC", "PRESSURE", "RES_METRICS", "SIGNAL_CAP", "VALUES",
           "VIOLATION_SIGNAL", "VM_COLUMNS", "Analysis", "HistoryData", "HistoryError", "analyze", "expand_paths",
           "html_page", "load_history", "load_with_progress", "read_file", "summary_line",
           "tables", "write_report"]
