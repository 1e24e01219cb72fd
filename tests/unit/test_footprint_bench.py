"""The pure helpers of bench/footprint.py (the QEMU run itself is tests/e2e/test_footprint.py)."""
from __future__ import annotations

import gzip
import importlib.util
import io
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "footprint.py"
spec = importlib.util.spec_from_file_location("footprint_bench", BENCH)
fp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fp)


def test_slope_per_hour_is_least_squares():
    pts = [(t, 100.0 + 0.01 * t + (0.5 if t % 2 else -0.5)) for t in range(0, 100)]
    assert abs(fp.slope_per_hour(pts) - 36.0) < 2.0                       # noise barely moves it
    assert abs(fp.slope_per_hour([(t, 5.0 - 0.002 * t) for t in range(10)]) + 7.2) < 1e-9
    assert fp.slope_per_hour([(5.0, 1.0), (5.0, 2.0)]) == 0.0


def test_with_channel_adds_the_port_before_the_balloon():
    xml = "<devices>\n    <memballoon model='virtio'/>\n  </devices>"
    out = fp.with_channel(xml, Path("/run/x.sock"))
    assert out.index(fp.PORT) < out.index("<memballoon")
    assert "path='/run/x.sock'" in out


def test_overlay_initrd_appends_a_gzip_member_with_the_guest_script(tmp_path):
    base = tmp_path / "base.gz"
    base.write_bytes(gzip.compress(b"lab archive"))
    out = tmp_path / "out.gz"
    fp.overlay_initrd(base, out)
    data = out.read_bytes()
    assert data.startswith(base.read_bytes())
    with gzip.GzipFile(fileobj=io.BytesIO(data[len(base.read_bytes()):])) as f:
        member = f.read()
    assert b"opt/rescoin/loadgen.py" in member and fp.GUEST_SCRIPT.read_bytes() in member
