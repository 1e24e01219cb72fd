"""PlanetLab as shipped with CloudSim: day folders ``YYYYMMDD`` of 288-line CPU-% files, one per VM."""
from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rescoin.core.resources import CPU, N_RES
from rescoin.offline.traces.files import (
    clip_negative,
    natural_key,
    pick,
    read_first_line,
    visible,
)
from rescoin.offline.traces.model import (
    PERIOD,
    Progress,
    Samples,
    TraceError,
)

PLANETLAB_LINES = 288
_DAY_RE = re.compile(r"\d{8}")


def _day_start(d: Path) -> float | None:
    """Epoch seconds of a ``YYYYMMDD`` folder's date at 00:00 UTC, None if not a date."""
    if not (d.is_dir() and _DAY_RE.fullmatch(d.name)):
        return None
    try:
        return datetime.strptime(d.name, "%Y%m%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _vm_files(day: Path) -> list[Path]:
    return [f for f in day.iterdir() if f.is_file() and visible(f)]


def planetlab_days(p: Path) -> list[Path]:
    """Day folders of a PlanetLab trace (``p`` itself if it is one), [] if not PlanetLab."""
    days = [p] if _day_start(p) is not None else sorted(d for d in p.iterdir() if _day_start(d) is not None)
    for d in days:
        files = _vm_files(d)
        if files:
            first = min(files, key=lambda f: natural_key(f.name))
            return days if read_first_line(first).strip().lstrip("-").isdigit() else []
    if days:
        raise TraceError(f"{p}: the PlanetLab day folders ({days[0].name}, ...) hold no VM files")
    return []


def _read_planetlab_vm(p: Path) -> np.ndarray:
    """288 CPU-% integers of one VM-day; any other content is an error naming the line."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not a text file") from None
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror or e}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise TraceError(f"{p}: empty file; expected {PLANETLAB_LINES} lines of CPU %")
    arr = np.char.strip(np.array(lines, dtype=str))
    ok = np.char.isdigit(np.char.lstrip(arr, "-")) & (arr != "-")
    if not ok.all():
        i = int(np.argmin(ok))
        raise TraceError(f"{p}:{i + 1}: {lines[i]!r} is not an integer CPU %")
    if len(lines) != PLANETLAB_LINES:
        where = f"{p}:{len(lines) + 1}" if len(lines) < PLANETLAB_LINES else f"{p}:{PLANETLAB_LINES + 1}"
        raise TraceError(f"{where}: expected {PLANETLAB_LINES} lines of CPU %, found {len(lines)}")
    return arr.astype(np.int64).astype(np.float64)


def load_planetlab(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> Samples:
    all_days = planetlab_days(root)
    first = int(np.floor(start_day))
    if first >= len(all_days):
        raise TraceError(
            f"{root}: --start-day {start_day:g} is beyond the end of the trace ({len(all_days)} day folders)"
        )
    last = len(all_days) if days is None else min(len(all_days), int(np.ceil(start_day + days)))
    sel = all_days[first:last]
    names = sorted((f.name for f in _vm_files(sel[0])), key=natural_key)
    if not names:
        raise TraceError(f"{sel[0]}: day folder holds no VM files")
    ids = pick(names, vms, vm_offset, sel[0])

    t0 = _day_start(sel[0])
    assert t0 is not None
    cpu = np.full((len(sel), len(ids), PLANETLAB_LINES), np.nan)
    todo = [(d, j) for d in range(len(sel)) for j in range(len(ids)) if (sel[d] / ids[j]).is_file()]
    for k, (d, j) in enumerate(todo):
        cpu[d, j] = _read_planetlab_vm(sel[d] / ids[j])
        if progress is not None:
            progress(k + 1, len(todo))

    notes = ["CPU-only trace: memory, disk and network demand unknown (NaN); 1 vCPU per VM"]
    missing = len(sel) * len(ids) - len(todo)
    if missing:
        notes.append(f"{missing} VM-days without a file: NaN")
    if len(sel) > 1:
        notes.append(f"day folders {', '.join(d.name for d in sel)} placed back to back")
    n_neg = clip_negative(cpu)
    n_over = int((cpu > 100).sum())
    cpu = np.minimum(cpu, 100.0)
    if n_over:
        notes.append(f"clipped {n_over} CPU samples above capacity (100 %)")
    if n_neg:
        notes.append(f"clipped {n_neg} negative values to 0")

    # long form: cell k of day d sits at t0 + (d * 288 + k) * 300
    d_idx, j_idx, k_idx = np.nonzero(np.isfinite(cpu))
    values = np.full((d_idx.size, N_RES), np.nan)
    values[:, CPU] = cpu[d_idx, j_idx, k_idx] / 100.0
    sizes = np.full((len(ids), N_RES), np.nan)
    sizes[:, CPU] = 1.0
    ts = t0 + (d_idx * PLANETLAB_LINES + k_idx) * PERIOD
    label = sel[0].name if len(sel) == 1 else f"{sel[0].name}..{sel[-1].name}"
    return Samples("planetlab", label, ids, j_idx, ts, values, sizes, notes, start_day - first)

