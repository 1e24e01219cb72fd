"""``rescoin balance``: the cluster half (minimal on this branch: only ``simulate``)."""
from __future__ import annotations

import argparse

from rescoin.cli.balance_sim import add_simulate_parser


def add_balance_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("balance", help="cluster balancing", description="Balance VMs across hosts.")
    inner = p.add_subparsers(dest="balance_cmd", required=True)
    add_simulate_parser(inner)
    return p
