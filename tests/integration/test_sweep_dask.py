"""Issue 10 item 5 on a real dask.distributed LocalCluster of 2 worker processes: results come back
equal to an in-process replay, a failing run is reported by name while the others complete, and
`rescoin density --scheduler tcp://HOST:PORT` gives what the in-process command gives."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rescoin.offline import density as dens
from rescoin.offline.sweep import DaskRunner, InProcess, RunSpec, Slice

TRACE = Path("/work/shared/traces/bitbrains_rnd")
TINY = Slice(vm_offset=0, start_day=0.0, vms=10, days=0.2)

pytestmark = pytest.mark.skipif(not TRACE.is_dir(), reason="the shared Bitbrains trace is not on this machine")


def spec(policy: str, factor: float = 1.5, trace: Path = TRACE) -> RunSpec:
    return RunSpec(str(trace), TINY, policy, (("cpu", 1.5), ("memory", factor)), "default", None, factor)


def test_local_cluster_runs_every_spec_and_names_the_failures(tmp_path):
    good = [spec(p, f) for p in ("static", "mom") for f in (1.5, 3.0)]
    bad = [spec("nosuch"), spec("static", trace=tmp_path / "missing")]
    done: list = []
    with DaskRunner(workers=2) as runner:
        assert len(runner._client.scheduler_info()["workers"]) == 2
        outcomes = runner.run(good + bad, on_done=done.append)
    assert len(done) == len(outcomes) == 6
    by = {o.spec: o for o in outcomes}
    for s in bad:
        assert by[s].result is None and "\n" not in by[s].error
    assert "nosuch" in by[bad[0]].spec.name and "nosuch" in by[bad[0]].error
    assert "missing" in by[bad[1]].error
    here = InProcess().run(good[:1])[0]
    for s in good:
        assert by[s].error is None and by[s].result["memory"]["violations"] is not None
    assert by[good[0]].result["memory"] == here.result["memory"]  # a worker replays exactly as here


def test_the_same_command_runs_against_a_scheduler_address(capsys):
    from distributed import LocalCluster

    from rescoin.cli import main

    argv = ["density", "--trace", str(TRACE), "--resource", "memory", "--vms", "10", "--days", "0.2",
            "--policies", "static", "--format", "json"]
    assert main(argv + ["--scheduler", "none"]) == 0
    here = json.loads(capsys.readouterr().out)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        assert main(argv + ["--scheduler", cluster.scheduler_address]) == 0
    there = json.loads(capsys.readouterr().out)
    assert there["policies"] == here["policies"] and there["failed"] == []
    assert set(there["policies"]) == {"static", "oracle"}
    assert there["policies"]["oracle"]["density"] is None or there["policies"]["oracle"]["density"] >= dens.GRID[0]


def test_an_unreachable_scheduler_is_one_line(capsys):
    from rescoin.cli import main

    code = main(["density", "--trace", str(TRACE), "--resource", "memory", "--vms", "2", "--days", "0.1",
                 "--policies", "static", "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "tcp://127.0.0.1:9" in err and "--scheduler none" in err
