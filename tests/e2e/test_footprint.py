"""End-to-end: bench/footprint.py on a real QEMU guest (short phases).

Checks the direction of each effect the simulator's memory model rests on,
read from the QEMU process on the host: reading and allocating grow the host
footprint, freeing does not shrink it, a lower balloon target does.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test` (scripts/setup-host)")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "footprint.py"


def test_footprint_grows_keeps_and_balloon_reclaims(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests need root (run `make e2e` as root)")
    spec = importlib.util.spec_from_file_location("footprint_bench", BENCH)
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    rc = fp.main(["--memory", "512", "--disk", "192", "--alloc", "96", "--target", "192", "--idle", "10",
                  "--settle", "3", "--results", str(tmp_path / "r.json"), "--out", str(tmp_path / "s.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["page_cache"]["io_growth"] > 0.5              # reading touches guest pages the host keeps
    assert r["alloc_free"]["kept_share"] > 0.5             # freed in the guest, still resident on the host
    b = r["balloon"]
    assert b["rss_end_mib"] < b["rss_before_mib"] - 100    # the balloon gives memory back
    assert b["guest_memtotal_mib"] < 192                   # and the guest sees less
    assert json.loads((tmp_path / "s.json").read_text())["samples"]
