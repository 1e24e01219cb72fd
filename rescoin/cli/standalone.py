"""``python -m rescoin.<module>``: one sub-command on its own, with the CLI's error handling."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def run_standalone(add_parser: Callable, argv: list[str] | None = None) -> int:
    """One sub-command, errors as ``rescoin: error: ...`` and exit 2 (``rescoin.cli.dispatch``)."""
    from rescoin.cli import dispatch

    parser = argparse.ArgumentParser(prog="rescoin")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    return dispatch(parser.parse_args(argv))
