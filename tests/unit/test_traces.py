"""Trace loaders: format detection, units, resampling, selection and error messages."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.hosts.sim import SimHost
from rescoin.offline import traces
from rescoin.offline.traces import TraceError, detect_format, load_trace, sample_trace_path

T0 = 1375308000  # a multiple of 300: samples land exactly on grid points
DATA = Path(__file__).resolve().parents[1] / "data"
SHARED_BITBRAINS = Path(__file__).resolve().parents[3] / "shared/traces/bitbrains_rnd"

BB_HEADER = [
    "Timestamp [ms]",
    "CPU cores",
    "CPU capacity provisioned [MHZ]",
    "CPU usage [MHZ]",
    "CPU usage [%]",
    "Memory capacity provisioned [KB]",
    "Memory usage [KB]",
    "Disk read throughput [KB/s]",
    "Disk write throughput [KB/s]",
    "Network received throughput [KB/s]",
    "Network transmitted throughput [KB/s]",
]


def bb_row(
    ts, cores=2, cap=5000.0, cpu=2500.0, mem_cap=4194304.0, mem=2048.0, rd=3.0, wr=4.0, rx=5.0, tx=6.0
):
    pct = 100.0 * cpu / cap if cap else 0.0
    return [ts, cores, cap, cpu, pct, mem_cap, mem, rd, wr, rx, tx]


def write_bb(path: Path, rows, header=BB_HEADER) -> Path:
    """A Bitbrains file: ';<TAB>'-separated, gzip-compressed if the name ends in .gz."""
    text = ";\t".join(header) + "\n" + "".join(";\t".join(str(v) for v in r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def steady(n: int, **kw) -> list[list]:
    return [bb_row(T0 + 300 * i, **kw) for i in range(n)]


# --------------------------------------------------------------------------- Bitbrains


def test_bitbrains_detected_and_loaded_in_the_right_units(tmp_path):
    for vm in ("10", "2", "1"):
        write_bb(tmp_path / "2013-8" / f"{vm}.csv.gz", steady(12))
    (tmp_path / "MANIFEST.csv").write_text("vm_id,file\n1,2013-8/1.csv.gz\n")

    assert detect_format(tmp_path) == "bitbrains"
    tr = load_trace(tmp_path)
    assert tr.source_format == "bitbrains"
    assert tr.vm_ids == ["1", "2", "10"]  # numeric ids in numeric order
    assert (tr.n_periods, tr.n_vms) == (12, 3)
    assert tr.demand.shape == (12, 3, N_RES)
    assert tr.start == T0 and tr.period == 300.0
    np.testing.assert_allclose(tr.demand[:, :, CPU], 1.0)  # 2500 MHz of 2 x 2500 MHz cores
    np.testing.assert_allclose(tr.demand[:, :, MEMORY], 2.0)  # 2048 KB
    np.testing.assert_allclose(tr.demand[:, :, DISK], 7.0)
    np.testing.assert_allclose(tr.demand[:, :, NET], 11.0)
    np.testing.assert_allclose(tr.sizes[:, CPU], 2.0)
    np.testing.assert_allclose(tr.sizes[:, MEMORY], 4096.0)
    assert np.isnan(tr.sizes[:, [DISK, NET]]).all()
    assert "bitbrains 2013-8" in tr.name and "3 VMs" in tr.name


def test_bitbrains_single_file_and_plain_csv(tmp_path):
    f = write_bb(tmp_path / "7.csv", steady(4))
    assert detect_format(f) == "bitbrains"
    tr = load_trace(f)
    assert tr.vm_ids == ["7"] and tr.n_periods == 4


def test_short_gap_interpolated_long_gap_left_nan(tmp_path):
    rows = [bb_row(T0 + 300 * i, mem=1024.0 * i) for i in range(60) if not (10 <= i < 15 or 30 <= i < 50)]
    write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path)
    mem = tr.demand[:, 0, MEMORY]
    np.testing.assert_allclose(mem[10:15], np.arange(10, 15))  # linear between 9 and 15
    assert np.isnan(mem[30:50]).all()  # 20 cells > 12
    assert not np.isnan(mem[:30]).any() and not np.isnan(mem[50:]).any()
    assert any("filled 4 gaps (20 cells" in n for n in tr.notes)  # 4 resources x 1 gap of 5
    assert any("longer than 12 cells as NaN" in n for n in tr.notes)


def test_jittered_and_duplicate_timestamps_are_averaged(tmp_path):
    rows = [
        bb_row(T0, mem=1024.0),
        bb_row(T0, mem=3072.0),  # same timestamp
        bb_row(T0 + 290, mem=4096.0),  # both within the second cell
        bb_row(T0 + 310, mem=6144.0),
        bb_row(T0 + 600, mem=1024.0),
    ]
    write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path)
    np.testing.assert_allclose(tr.demand[:, 0, MEMORY], [2.0, 5.0, 1.0])
    assert any("averaged 2 samples" in n for n in tr.notes)


def test_first_cell_empty_after_flooring_is_held(tmp_path):
    write_bb(tmp_path / "1.csv", [bb_row(T0 + 176 + 300 * i, mem=1024.0 * (i + 1)) for i in range(5)])
    tr = load_trace(tmp_path)
    assert tr.start == T0  # floored
    np.testing.assert_allclose(tr.demand[:, 0, MEMORY], [1, 1, 2, 3, 4, 5])


def test_zero_capacity_rows_give_unknown_cpu(tmp_path):
    rows = steady(5) + [bb_row(T0 + 300 * i, cores=0, cap=0.0, cpu=0.0) for i in range(5, 25)] + [
        bb_row(T0 + 300 * i) for i in range(25, 30)
    ]
    rows.append(bb_row(T0 + 300 * 30, cores=2, cap=0.0, cpu=0.0))  # capacity alone zero
    write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path)
    cpu = tr.demand[:, 0, CPU]
    assert np.isnan(cpu[5:25]).all()
    assert not np.isnan(cpu[:5]).any() and not np.isnan(cpu[25:30]).any()
    assert not np.isnan(tr.demand[:, 0, MEMORY]).any()  # the other resources are still known
    assert tr.sizes[0, CPU] == 2.0  # the most common non-zero core count
    assert any("21 rows" in n and "zero CPU cores or capacity" in n for n in tr.notes)


def test_rows_with_nothing_provisioned_mean_the_vm_was_not_running(tmp_path):
    off = [bb_row(T0 + 300 * i, cores=0, cap=0.0, cpu=0.0, mem=0.0, mem_cap=0.0) for i in range(5, 25)]
    write_bb(tmp_path / "1.csv", steady(5) + off + [bb_row(T0 + 300 * i) for i in range(25, 30)])
    tr = load_trace(tmp_path)
    assert np.isnan(tr.demand[5:25, 0]).all()  # every resource unknown, not a measured zero
    assert not np.isnan(tr.demand[:5, 0, :2]).any() and not np.isnan(tr.demand[25:, 0, :2]).any()
    assert any("20 rows" in n and "not running" in n for n in tr.notes)
    # on the simulated host the VM is absent meanwhile and comes back as a new VM
    host = SimHost(tr)
    seen = [host.observe().vms.n for _ in range(tr.n_periods)]
    assert seen[:5] == [1] * 5 and seen[5:25] == [0] * 20 and seen[25:] == [1] * 5


def test_a_short_stop_is_not_interpolated_over(tmp_path):
    # 3 cells (15 min) not running between running samples: a gap that short would be interpolated
    off = [bb_row(T0 + 300 * i, cores=0, cap=0.0, cpu=0.0, mem=0.0, mem_cap=0.0) for i in range(5, 8)]
    write_bb(tmp_path / "1.csv", steady(5) + off + [bb_row(T0 + 300 * i) for i in range(8, 12)])
    tr = load_trace(tmp_path)
    assert np.isnan(tr.demand[5:8, 0]).all()
    assert not np.isnan(tr.demand[:5, 0, :2]).any() and not np.isnan(tr.demand[8:, 0, :2]).any()
    # whereas the same 3 cells simply missing from the file are a monitoring gap, filled in
    write_bb(tmp_path / "2" / "1.csv", steady(5) + [bb_row(T0 + 300 * i) for i in range(8, 12)])
    gap = load_trace(tmp_path / "2")
    assert not np.isnan(gap.demand[5:8, 0, :2]).any()


def test_cpu_above_capacity_clipped_to_vcpus(tmp_path):
    write_bb(tmp_path / "1.csv", [bb_row(T0, cpu=6000.0), bb_row(T0 + 300, cpu=1250.0)])
    tr = load_trace(tmp_path)
    np.testing.assert_allclose(tr.demand[:, 0, CPU], [2.0, 0.5])
    assert any("clipped 1 CPU samples" in n for n in tr.notes)


def test_negative_values_clipped_to_zero(tmp_path):
    write_bb(tmp_path / "1.csv", [bb_row(T0, rd=-5.0, wr=1.0), bb_row(T0 + 300, mem=-1.0)])
    tr = load_trace(tmp_path)
    np.testing.assert_allclose(tr.demand[:, 0, DISK], [1.0, 7.0])
    assert tr.demand[1, 0, MEMORY] == 0.0
    assert any("clipped 2 negative values" in n for n in tr.notes)


def test_vm_selection_reads_only_the_needed_files(tmp_path):
    for vm in range(1, 6):
        write_bb(tmp_path / f"{vm}.csv.gz", steady(3, mem=1024.0 * vm))
    (tmp_path / "5.csv.gz").write_bytes(b"\x1f\x8b broken")  # never read below
    calls = []
    tr = load_trace(tmp_path, vms=2, vm_offset=1, progress=lambda done, total: calls.append((done, total)))
    assert tr.vm_ids == ["2", "3"]
    np.testing.assert_allclose(tr.demand[0, :, MEMORY], [2.0, 3.0])
    assert calls == [(1, 2), (2, 2)]

    with pytest.raises(TraceError, match="only 5 VMs"):
        load_trace(tmp_path, vms=4, vm_offset=2)
    with pytest.raises(TraceError, match="vms must be at least 1"):
        load_trace(tmp_path, vms=0)


def test_days_and_start_day_cut_the_grid(tmp_path):
    n = 3 * 288
    write_bb(tmp_path / "1.csv", [bb_row(T0 + 300 * i, mem=1024.0 * i) for i in range(n)])
    tr = load_trace(tmp_path, start_day=1, days=1)
    assert tr.n_periods == 288
    assert tr.start == T0 + 86400
    np.testing.assert_allclose(tr.demand[:, 0, MEMORY], np.arange(288, 576))

    tr = load_trace(tmp_path, start_day=2.5, days=2)  # only half a day is left
    assert tr.n_periods == 144
    assert any("only 0.50 remain" in n for n in tr.notes)

    with pytest.raises(TraceError, match="beyond the end of the trace"):
        load_trace(tmp_path, start_day=3)


def test_gap_at_window_edge_filled_from_outside_the_window(tmp_path):
    rows = [bb_row(T0 + 300 * i, mem=1024.0 * i) for i in range(2 * 288) if not 285 <= i < 292]
    write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path, days=1)
    np.testing.assert_allclose(tr.demand[-3:, 0, MEMORY], [285, 286, 287])


# --------------------------------------------------------------------------- Bitbrains errors


def test_truncated_gzip_is_reported(tmp_path):
    f = write_bb(tmp_path / "3.csv.gz", steady(2000))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"3\.csv\.gz: not a valid gzip file \(truncated\?\)"):
        load_trace(tmp_path)


def test_garbage_gzip_is_reported(tmp_path):
    (tmp_path / "4.csv.gz").write_bytes(b"this is not gzip")
    with pytest.raises(TraceError, match=r"4\.csv\.gz: not a valid gzip file"):
        detect_format(tmp_path)


def test_non_numeric_cell_names_file_line_and_column(tmp_path):
    rows = steady(5)
    rows[2][3] = "abc"  # line 4 of the file (header is line 1)
    f = write_bb(tmp_path / "3.csv.gz", rows)
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    assert str(e.value) == f"{f}:4: 'abc' is not a number in column 'CPU usage [MHZ]'"


def test_wrong_field_count_names_the_line(tmp_path):
    f = tmp_path / "1.csv"
    write_bb(f, steady(3))
    f.write_text(f.read_text() + "1;\t2;\t3;\t4;\t5;\t6;\t7;\t8;\t9;\t10;\t11;\t12\n")
    with pytest.raises(TraceError, match=r"1\.csv:5: expected 11 fields, saw 12"):
        load_trace(tmp_path)


def test_missing_column_is_named(tmp_path):
    header = [h for h in BB_HEADER if h != "Memory usage [KB]"]
    write_bb(tmp_path / "1.csv", [r[:6] + r[7:] for r in steady(2)], header=header)
    with pytest.raises(TraceError, match=r"1\.csv:1: header lacks column\(s\) 'Memory usage \[KB\]'"):
        load_trace(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(TraceError, match="empty directory"):
        load_trace(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(TraceError, match=r"nope: no such file or directory"):
        load_trace(tmp_path / "nope")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.csv").write_text("hello,world\n1,2\n")
    with pytest.raises(TraceError) as e:
        detect_format(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: unknown trace format; expected Bitbrains GWA-T-12")
    assert "PlanetLab (day folders of 288-line files)" in msg and "Azure v1 vm_cpu_readings" in msg


def test_unknown_format_without_csv_files(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(tmp_path)


# --------------------------------------------------------------------------- PlanetLab


def write_pl(folder: Path, name: str, values, trailer: str = "\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / name
    f.write_text("\n".join(str(v) for v in values) + trailer)
    return f


def test_planetlab_day_folders(tmp_path):
    write_pl(tmp_path / "20110303", "node_b", [50] * 288)
    write_pl(tmp_path / "20110303", "node_a", list(range(100)) * 2 + [0] * 88)
    write_pl(tmp_path / "20110304", "node_a", [10] * 288, trailer="\n\n")  # blank trailing line is fine
    write_pl(tmp_path / "20110304", "node_c", [10] * 288)  # not in the first day: ignored

    assert detect_format(tmp_path) == "planetlab"
    tr = load_trace(tmp_path)
    assert tr.vm_ids == ["node_a", "node_b"]
    assert tr.demand.shape == (576, 2, N_RES)
    assert tr.start == 1299110400.0  # 2011-03-03 00:00 UTC
    np.testing.assert_allclose(tr.demand[:100, 0, CPU], np.arange(100) / 100)
    np.testing.assert_allclose(tr.demand[288:, 0, CPU], 0.1)
    assert np.isnan(tr.demand[288:, 1, CPU]).all()  # node_b has no file on day 2
    assert np.isnan(tr.demand[:, :, [MEMORY, DISK, NET]]).all()  # CPU-only trace
    np.testing.assert_allclose(tr.sizes[:, CPU], 1.0)
    assert np.isnan(tr.sizes[:, MEMORY]).all()

    day2 = load_trace(tmp_path, start_day=1)
    assert day2.vm_ids == ["node_a", "node_c"] and day2.start == 1299196800.0
    one = load_trace(tmp_path / "20110304", vms=1, vm_offset=1)
    assert one.vm_ids == ["node_c"] and one.n_periods == 288


def test_planetlab_bad_line_and_short_file(tmp_path):
    values = [5] * 288
    values[16] = "abc"
    f = write_pl(tmp_path / "20110303", "node", values)
    with pytest.raises(TraceError, match=rf"{f}:17: 'abc' is not an integer CPU %"):
        load_trace(tmp_path)
    f = write_pl(tmp_path / "20110303", "node", [5] * 200)
    with pytest.raises(TraceError, match=rf"{f}:201: expected 288 lines of CPU %, found 200"):
        load_trace(tmp_path)


def test_planetlab_real_sample():
    tr = load_trace(DATA / "planetlab")
    assert tr.source_format == "planetlab"
    assert tr.demand.shape == (576, 5, N_RES)
    jaist = tr.vm_ids.index("planet1_jaist_ac_jp_nyu_d")
    assert tr.demand[0, jaist, CPU] == pytest.approx(0.02)  # first line of the 20110303 file
    assert tr.demand[288, jaist, CPU] == pytest.approx(0.0)  # first line of the 20110322 file
    assert np.isnan(tr.demand[288:, [i for i in range(5) if i != jaist], CPU]).all()
    cpu = tr.demand[:288, :, CPU]
    assert cpu.min() >= 0 and cpu.max() <= 1


# --------------------------------------------------------------------------- Azure


def write_azure(folder: Path, name: str, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    f = folder / name
    f.write_bytes(gzip.compress(text.encode())) if name.endswith(".gz") else f.write_text(text)
    return f


def azure_rows():
    rows = []
    for t in range(0, 3600, 300):
        rows.append((t, "zz/vm+B==", 1.0, 90.0, 50.0))
        rows.append((t, "aa/vm+A==", 0.0, 20.0, 10.0))
        if t >= 1800:
            rows.append((t, "mm/vm+C==", 0.0, 100.0, 100.0))
    return rows


def test_azure_with_vmtable(tmp_path):
    write_azure(tmp_path, "vm_cpu_readings-file-1-of-1.csv.gz", azure_rows())
    (tmp_path / "vmtable.csv").write_text(
        "aa/vm+A==,s,d,0,3600,90,10,20,Interactive,2,4\n"
        "zz/vm+B==,s,d,0,3600,90,10,20,Delay-insensitive,>24,>64\n"
        "mm/vm+C==,s,d,1800,3600,90,10,20,Unknown,8,32\n"
    )
    assert detect_format(tmp_path) == "azure"
    tr = load_trace(tmp_path)
    assert tr.vm_ids == ["zz/vm+B==", "aa/vm+A==", "mm/vm+C=="]  # order of first appearance
    assert tr.demand.shape == (12, 3, N_RES) and tr.start == 0.0
    np.testing.assert_allclose(tr.sizes[:, CPU], [30, 2, 8])
    np.testing.assert_allclose(tr.sizes[:, MEMORY], [70 * 1024, 4 * 1024, 32 * 1024])
    np.testing.assert_allclose(tr.demand[:, 0, CPU], 15.0)  # 50 % of 30 cores
    np.testing.assert_allclose(tr.demand[:, 1, CPU], 0.2)
    assert np.isnan(tr.demand[:6, 2, CPU]).all() and (tr.demand[6:, 2, CPU] == 8).all()
    assert np.isnan(tr.demand[:, :, MEMORY]).all()  # CPU-only trace


def test_azure_without_vmtable_assumes_one_core(tmp_path):
    write_azure(tmp_path, "readings.csv", azure_rows())
    tr = load_trace(tmp_path, vms=1, vm_offset=1)
    assert tr.vm_ids == ["aa/vm+A=="]
    np.testing.assert_allclose(tr.demand[:, 0, CPU], 0.1)
    np.testing.assert_allclose(tr.sizes[0, CPU], 1.0)
    assert any("no vmtable" in n and "1 core" in n for n in tr.notes)


def test_azure_chunks_keep_first_appearance_and_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(traces.azure, "AZURE_CHUNK_ROWS", 4)  # read where the reader is
    rows = azure_rows()
    write_azure(tmp_path, "a.csv", rows)
    tr = load_trace(tmp_path, vms=1, vm_offset=2)
    assert tr.vm_ids == ["mm/vm+C=="]
    rows[20] = (rows[20][0], rows[20][1], 0.0, 1.0, "oops")
    f = write_azure(tmp_path, "a.csv", rows)
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    assert str(e.value) == f"{f}:21: 'oops' is not a number in column 'avg cpu %'"


def test_azure_bad_vmtable_bucket(tmp_path):
    write_azure(tmp_path, "readings.csv", azure_rows())
    t = tmp_path / "vmtable.csv"
    t.write_text("aa/vm+A==,s,d,0,3600,90,10,20,Interactive,2,4\nzz/vm+B==,s,d,0,3600,90,10,20,X,lots,4\n")
    with pytest.raises(TraceError, match=rf"{t}:2: 'lots' is not a core count bucket"):
        load_trace(tmp_path)


def test_azure_synthetic_sample():
    tr = load_trace(DATA / "synthetic_azure")
    assert tr.source_format == "azure" and tr.n_vms == 6 and tr.n_periods == 576
    assert tr.sizes[2, CPU] == 30 and tr.sizes[2, MEMORY] == 70 * 1024
    cpu = tr.demand[:, :, CPU]
    assert np.nanmax(cpu / tr.sizes[:, CPU]) <= 1.0
    assert np.isnan(tr.demand[:, :, MEMORY]).all()


# --------------------------------------------------------------------------- resampling property


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=30, max_size=80))
def test_fill_gaps_recovers_a_ramp(missing):
    missing = np.array(missing)
    ramp = np.arange(missing.size, dtype=float)
    demand = np.where(missing, np.nan, ramp)[:, None, None] * np.ones((1, 1, N_RES))
    filled, _ = traces.fill_gaps(demand)
    got = filled[:, 0, 0]
    ok = ~np.isnan(got)
    np.testing.assert_allclose(got[ok & ~missing], ramp[ok & ~missing])
    known = np.flatnonzero(~missing)
    for i in np.flatnonzero(missing):
        before, after = known[known < i], known[known > i]
        if before.size and after.size:
            gap = after[0] - before[-1] - 1
            assert ok[i] == (gap <= traces.MAX_FILL)
            if ok[i]:
                assert got[i] == pytest.approx(ramp[i])


# --------------------------------------------------------------------------- shipped and shared data


def test_shipped_sample():
    tr = load_trace(sample_trace_path())
    assert tr.source_format == "bitbrains"
    assert tr.vm_ids == [str(i) for i in range(1, 25)]
    assert abs(tr.n_periods - 2016) <= 1
    # VM 20 was not running for most of the week (nothing provisioned): no data then, ...
    off = np.isnan(tr.demand).all(axis=2)
    assert off[:, 19].mean() > 0.9 and not off[:, np.arange(24) != 19].any()
    # ... and wherever a VM ran, its memory is known
    assert not np.isnan(tr.demand[:, :, MEMORY][~off]).any()
    assert (sample_trace_path() / "README.md").is_file()


@pytest.mark.skipif(not SHARED_BITBRAINS.is_dir(), reason="shared Bitbrains trace not present")
def test_real_shared_bitbrains_trace():
    tr = load_trace(SHARED_BITBRAINS, vms=5, days=1)
    assert tr.vm_ids == ["1", "2", "3", "4", "5"]
    assert tr.demand.shape == (288, 5, N_RES)
    assert tr.start == 1375308000.0  # 2013-07-31 22:02:56 UTC floored to 5 minutes
    cpu, mem = tr.demand[:, :, CPU], tr.demand[:, :, MEMORY]
    assert not np.isnan(cpu).any() and not np.isnan(mem).any()
    assert (cpu >= 0).all() and (cpu <= tr.sizes[:, CPU]).all()
    assert (mem >= 0).all() and (mem.mean(axis=0) > 0).all() and mem.max() < 64 * 1024
    assert np.nanmin(tr.sizes[:, CPU]) >= 1 and np.nanmax(tr.sizes[:, CPU]) <= 32
    np.testing.assert_allclose(tr.sizes[0], [2, 8192, np.nan, np.nan])  # MANIFEST: 2 cores, 8388608 KB


# --------------------------------------------------------------------------- implausible rows (issue 8 item 18)


def test_a_1970_timestamp_is_dropped_with_one_warning_naming_file_and_line(tmp_path, caplog):
    rows = steady(50)
    rows[10][0] = 1  # line 12 of the file (header, then rows 0..)
    f = write_bb(tmp_path / "1.csv", rows)
    write_bb(tmp_path / "2.csv", steady(50))
    with caplog.at_level("WARNING", logger="rescoin.offline.traces"):
        tr = load_trace(tmp_path)
    assert tr.n_periods == 50  # not 43 years
    assert not np.isnan(tr.demand[10, 0]).any()  # the cell of the dropped row is interpolated
    assert len(tr.warnings) == 1
    assert tr.warnings[0].startswith(f"{f}:12: timestamp 1 (1970-01-01 00:00 UTC)") and "dropped" in tr.warnings[0]
    assert [r.getMessage() for r in caplog.records] == tr.warnings


@pytest.mark.parametrize("bad", [99999999999999, 4102444800 * 100, 4102444800])  # far future, in s or ms
def test_a_far_future_timestamp_is_dropped_not_too_large_to_hold(bad, tmp_path):
    rows = steady(400)
    rows[-1][0] = bad
    f = write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path)
    assert tr.n_periods == 399
    assert len(tr.warnings) == 1 and tr.warnings[0].startswith(f"{f}:401: timestamp {bad} ")


def test_several_outlying_rows_make_one_warning_with_a_count(tmp_path):
    a, b = steady(400), steady(400)
    a[5][0] = a[6][0] = 0
    b[7][0] = 2
    fa, _ = write_bb(tmp_path / "1.csv", a), write_bb(tmp_path / "2.csv", b)
    tr = load_trace(tmp_path)
    assert tr.n_periods == 400
    assert tr.warnings == [f"{fa}:7: timestamp 0 (1970-01-01 00:00 UTC) lies far outside the file's other rows "
                           "(2013-07-31 22:00 UTC .. 2013-08-02 07:15 UTC); row dropped (3 such rows in 2 files)"]


def test_real_gaps_are_not_outliers(tmp_path):
    """Two long runs days apart, and a short run after a gap shorter than 1000 steps, are all kept."""
    two_runs = steady(300) + [bb_row(T0 + 300 * i + 10 * 86400) for i in range(300)]
    write_bb(tmp_path / "a" / "1.csv", two_runs)
    tr = load_trace(tmp_path / "a")
    assert tr.warnings == [] and tr.n_periods == 10 * 288 + 300
    late_start = steady(2000) + [bb_row(T0 + 300 * (2000 + 900 + i)) for i in range(3)]
    write_bb(tmp_path / "b" / "1.csv", late_start)
    tr = load_trace(tmp_path / "b")
    assert tr.warnings == [] and tr.n_periods == 2903


def test_memory_beyond_size_is_clipped_and_impossible_values_are_unknown(tmp_path, caplog):
    rows = steady(30)
    rows[3][6] = 1e30  # Memory usage [KB]: no VM has that
    rows[8][6] = 5 * 1024 * 1024.0  # 5 GiB in a 4 GiB VM
    rows[12][7] = 1e30  # Disk read throughput [KB/s]
    f = write_bb(tmp_path / "1.csv", rows)
    tr = load_trace(tmp_path)
    mem, disk = tr.demand[:, 0, MEMORY], tr.demand[:, 0, DISK]
    assert np.nanmax(mem) == 4096.0 and mem[8] == 4096.0  # clipped to the VM's size
    assert mem[3] == pytest.approx(2.0) and disk[12] == pytest.approx(7.0)  # unknown, then interpolated
    assert sorted(tr.warnings) == sorted([
        f"{f}:5: memory usage 1e+30 KB is above the plausible maximum 68,719,476,736 KB; treated as unknown",
        f"{f}:10: memory usage 5,242,880 KB is above the VM's provisioned memory, 4,194,304 KB; clipped to it",
        f"{f}:14: disk read throughput 1e+30 KB/s is above the plausible maximum 100,000,000 KB/s; "
        "treated as unknown",
    ])


def test_one_huge_memory_value_no_longer_ruins_every_policy(tmp_path):
    from rescoin.offline.simulate import simulate

    rows = [[bb_row(T0 + 300 * i, mem=2048.0 * 1024 + 1024.0 * (i % 7)) for i in range(60)] for _ in range(3)]
    rows[1][20][6] = 1e30
    for vm, r in enumerate(rows):
        write_bb(tmp_path / f"{vm + 1}.csv", r)
    res = simulate(load_trace(tmp_path), ["static", "oracle"])
    for name, pol in res["policies"].items():
        assert pol["memory"]["satisfaction"] > 0.9, name


@pytest.mark.parametrize("fields", [6, 12])
def test_short_and_long_rows_are_both_errors_naming_the_line(fields, tmp_path):
    f = write_bb(tmp_path / "1.csv", steady(5))
    lines = f.read_text().splitlines()
    lines[3] = ";\t".join(str(v) for v in (bb_row(T0 + 600) + [1.0])[:fields])
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    assert str(e.value).startswith(f"{f}:4: expected 11 fields, saw {fields}")


def test_blank_lines_are_not_short_rows(tmp_path):
    f = write_bb(tmp_path / "1.csv", steady(5))
    f.write_text(f.read_text().replace("\n", "\n\n", 2) + "\n  \n")
    assert load_trace(tmp_path).n_periods == 5


def test_span_beyond_the_maximum_needs_days(tmp_path):
    from rescoin.offline.tracecheck import MAX_SPAN_DAYS

    n = MAX_SPAN_DAYS + 30
    write_bb(tmp_path / "1.csv", [bb_row(T0 + 86400 * i) for i in range(n)])  # one sample a day
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    assert f"{n - 1} days to replay, more than the {MAX_SPAN_DAYS}" in str(e.value) and "--days" in str(e.value)
    assert load_trace(tmp_path, days=7).n_periods == 7 * 288


def test_messages_use_the_command_line_option_names(tmp_path):
    write_bb(tmp_path / "1.csv", steady(5))
    with pytest.raises(TraceError, match="lower --vms or --vm-offset"):
        load_trace(tmp_path, vms=3)
    with pytest.raises(TraceError, match="choose a smaller --start-day"):
        load_trace(tmp_path, start_day=5)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(traces.grid, "MAX_GRID_BYTES", 64)  # read where the grid is built
    try:
        with pytest.raises(TraceError, match="pass --vms or --days to load less"):
            load_trace(tmp_path)
    finally:
        monkey.undo()


def test_simulate_prints_the_warning_once(tmp_path):
    """The real program: the warning reaches stderr as one line (logging as the CLI sets it up)."""
    import subprocess
    import sys

    rows = steady(40)
    rows[20][0] = 1
    f = write_bb(tmp_path / "1.csv", rows)
    p = subprocess.run([sys.executable, "-m", "rescoin.cli", "simulate", "--trace", str(tmp_path), "--policies",
                        "static", "--format", "json"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    warned = [line for line in p.stderr.splitlines() if "timestamp 1 " in line]
    assert len(warned) == 1 and f"{f}:22:" in warned[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize("extra", ["short", "long"])
def test_azure_short_and_long_rows_are_both_errors_naming_the_line(extra, tmp_path):
    rows = azure_rows()
    rows[4] = rows[4][:3] if extra == "short" else rows[4] + (7.0,)
    f = write_azure(tmp_path, "vm_cpu_readings-file-1-of-1.csv", rows)
    with pytest.raises(TraceError) as e:
        load_trace(tmp_path)
    assert str(e.value).startswith(f"{f}:5: expected 5 fields")
