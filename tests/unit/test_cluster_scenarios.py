"""Replay every tests/scenarios/cluster/NAME/ (state.json: rules and rounds of states) against expected.json.

Each round's plan is diffed with the expected moves (vm, source, target); every
move is reported back as done (``moved(ok=True)``), so hold and oscillation
rules see their history. REGENERATE=1 rewrites expected.json (review the diff!).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rescoin.cluster.balancers import build
from rescoin.cluster.model import ClusterState, HostInfo, Rules, VmInfo

ROOT = Path(__file__).resolve().parents[1] / "scenarios" / "cluster"
CASES = sorted(p.name for p in ROOT.iterdir() if (p / "state.json").exists())


def load(case: str) -> tuple[dict, Rules, list[ClusterState]]:
    spec = json.loads((ROOT / case / "state.json").read_text())
    r = spec.get("rules", {})
    rules = Rules(affinity=tuple(frozenset(g) for g in r.get("affinity", [])),
                  anti_affinity=tuple(frozenset(g) for g in r.get("anti_affinity", [])),
                  pins={k: frozenset(v) for k, v in r.get("pins", {}).items()},
                  ignore=frozenset(r.get("ignore", [])), maintenance=frozenset(r.get("maintenance", [])),
                  reserve_mib=r.get("reserve_mib", {}))
    states = [ClusterState(now=s["now"], hosts=tuple(HostInfo(**h) for h in s["hosts"]),
                           vms=tuple(VmInfo(**{"uuid": v["name"], **v}) for v in s["vms"]))
              for s in spec["rounds"]]
    return spec, rules, states


def replay(case: str) -> list[list[dict]]:
    spec, rules, states = load(case)
    b = build(spec.get("balancer", "rescoin"), **spec.get("options", {}))
    out = []
    for s in states:
        moves = b.plan(s, rules)
        for m in moves:
            b.moved(m, True, s.now)
        out.append([{"vm": m.name, "source": m.source, "target": m.target} for m in moves])
    return out


@pytest.mark.parametrize("case", CASES)
def test_scenario(case: str) -> None:
    got = replay(case)
    path = ROOT / case / "expected.json"
    if os.environ.get("REGENERATE"):
        path.write_text(json.dumps({"rounds": got}, indent=1) + "\n")
    want = json.loads(path.read_text())["rounds"]
    assert got == want, f"{case}: plan differs\n got:  {got}\n want: {want}"


def test_at_least_the_required_scenarios() -> None:
    assert {"hot-host", "different-sizes", "short-spike", "anti-affinity", "maintenance",
            "cost-over-gain", "oscillation-trap", "affinity-group"} <= set(CASES)
