"""Regenerate the SYNTHETIC Azure v1-format sample in this folder.

Nothing here is real Azure data: ids, sizes and CPU values are made up with
a fixed seed, only the file layout follows the Azure Public Dataset v1
(`vm_cpu_readings-file-*-of-*.csv.gz` and `vmtable.csv`, no header).
Run: python tests/data/synthetic_azure/make_synthetic.py
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PERIOD = 300
DAYS = 2
# id, first and last timestamp (s), core bucket, memory bucket (GB)
VMS = [
    ("synthetic-vm-0+web/AAAA", 0, DAYS * 86400 - PERIOD, "2", "4"),
    ("synthetic-vm-1+db/BBBBB", 0, DAYS * 86400 - PERIOD, "8", "32"),
    ("synthetic-vm-2+batch/CC", 0, DAYS * 86400 - PERIOD, ">24", ">64"),
    ("synthetic-vm-3+idle/DDD", 0, DAYS * 86400 - PERIOD, "1", "2"),
    ("synthetic-vm-4+late/EEE", 86400, DAYS * 86400 - PERIOD, "4", "8"),  # created on day 2
    ("synthetic-vm-5+gone/FFF", 0, 43200, "2", "8"),  # deleted after 12 h
]


def main() -> None:
    rng = np.random.default_rng(20170101)
    rows = []
    for k, (vm_id, t0, t1, _, _) in enumerate(VMS):
        ts = np.arange(t0, t1 + PERIOD, PERIOD)
        daily = 0.5 + 0.5 * np.sin(2 * np.pi * ts / 86400 + k)
        avg = np.clip(5 + 60 * daily * (k + 1) / len(VMS) + rng.normal(0, 3, ts.size), 0, 100)
        lo = np.clip(avg - rng.uniform(0, 5, ts.size), 0, 100)
        hi = np.clip(avg + rng.uniform(0, 20, ts.size), 0, 100)
        rows += [(int(t), vm_id, a, b, c) for t, a, b, c in zip(ts, lo, hi, avg, strict=False)]
    rows.sort(key=lambda r: r[0])  # the real files are in time order
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:]), start=1):
        text = "".join(f"{t},{v},{a:.6f},{b:.6f},{c:.6f}\n" for t, v, a, b, c in part)
        with open(HERE / f"vm_cpu_readings-file-{n}-of-2.csv.gz", "wb") as f:
            f.write(gzip.compress(text.encode(), mtime=0))
    table = "".join(
        f"{vm_id},synthetic-sub-{k % 2},synthetic-dep-{k},{t0},{t1 + PERIOD},100.0,20.0,80.0,"
        f"{'Interactive' if k % 2 else 'Delay-insensitive'},{cores},{mem}\n"
        for k, (vm_id, t0, t1, cores, mem) in enumerate(VMS)
    )
    (HERE / "vmtable.csv").write_text(table)


if __name__ == "__main__":
    main()
