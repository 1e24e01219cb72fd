"""``rescoin analyze HISTORY...``: the command line of the offline history analysis."""
from __future__ import annotations

import argparse
import json

from rescoin.cli.argtypes import number
from rescoin.errors import UserError
from rescoin.offline.analysis import (
    DEFINITIONS,
    HistoryError,
    analyze,
    load_with_progress,
    summary_line,
    tables,
    write_report,
)

_count = number(int, 0)


def cmd_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    try:
        data = load_with_progress(args.history, err)
    except HistoryError as e:
        raise UserError(str(e)) from None
    msg = data.skipped_message()
    if msg:
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
    if data.duplicates:
        err.print(f"dropped {data.duplicates} duplicate rows (same VM, resource and time)", highlight=False,
                  soft_wrap=True)
    if data.n == 0:
        err.print("no usable history rows: every file was empty or malformed", highlight=False)
    a = analyze(data, top_vms=args.vms)
    if args.report:
        try:
            files = write_report(a, args.report)
        except OSError as e:
            raise UserError(f"{args.report}: cannot write the report: {e}") from None
        err.print(f"report: {files[-1]} and {len(files) - 1} PNG files", highlight=False, soft_wrap=True)
    if args.format == "json":
        print(json.dumps(a.result, indent=1, allow_nan=False))
    else:
        out = Console()  # a pipe or a file gets 80 columns; the tables are built to fit
        out.print(summary_line(a.result), highlight=False)
        for t in tables(a.result):
            out.print(t)
    return 0


def _epilog() -> str:
    import textwrap

    lines = ["metrics (history has no true demand: usage is granted usage, signal is unmet-demand pressure):"]
    for k, v in DEFINITIONS.items():
        lines += textwrap.wrap(f"{k}: {v}", 96, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` to an argparse sub-parser set; ``func`` takes the args and returns an exit code."""
    p = subparsers.add_parser(
        "analyze", help="offline analysis of history CSV files: tables, plots, HTML report",
        description="Read history CSV files (files, globs or directories; .csv or .csv.gz), print per-resource\n"
                    "metrics and the most pressured VMs. Malformed rows are skipped and counted.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("history", nargs="+", metavar="HISTORY", help="history CSV files, globs or directories")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write PNG plots and a self-contained report.html into DIR")
    p.add_argument("--vms", type=_count, default=20, metavar="N", help="rows in the per-VM table (default 20)")
    p.set_defaults(func=cmd_analyze)
    return p
