"""Load public VM traces onto one 5-minute grid.

Three formats are read, chosen by looking at the files' content:

- Bitbrains GWA-T-12: one ``;``-separated CSV per VM (cpu, memory, disk, net);
- PlanetLab as shipped with CloudSim: day folders ``YYYYMMDD`` holding one
  file of 288 CPU-% lines per VM;
- Azure Public Dataset v1 ``vm_cpu_readings``: headerless CSV rows of
  ``timestamp, vm id, min, max, avg cpu %``, with an optional ``vmtable``.

Every loader turns its rows into long-form samples (vm, timestamp, values);
one resampler then averages them into 5-minute cells, interpolates short gaps
and cuts the requested days. Values are in the units of
:mod:`rescoin.core.resources`. Anything unreadable raises :class:`TraceError` with
the file (and line) at fault, never a bare pandas/gzip traceback. Implausible
rows (wrong field count, outlying timestamps, values no VM can have) follow the
rules of :mod:`rescoin.offline.tracecheck`: refused, dropped or clipped, each kind said
once with its file and line (logged, and kept in ``Trace.warnings``).
"""
from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.errors import RescoinError
from rescoin.offline.tracecheck import (
    MAX_SPAN_DAYS,
    MAX_THROUGHPUT_KBS,
    MAX_VM_CORES,
    MAX_VM_MEMORY_KB,
    Findings,
    above,
    drop_outlying_timestamps,
    wrong_field_count,
)
from rescoin.shipped import SAMPLE_TRACE_DIR

log = logging.getLogger("rescoin.offline.traces")

PERIOD = 300.0  #: grid step, seconds
CELLS_PER_DAY = int(86400 / PERIOD)
MAX_FILL = 12  #: gaps of up to this many cells are interpolated (one hour)
EDGE_HOLD = 1  #: empty cells at a series' ends held at the nearest value (grid rounding)
PLANETLAB_LINES = 288
AZURE_CHUNK_ROWS = 1_000_000
MAX_GRID_BYTES = 4 << 30  #: refuse to build a demand array larger than this

Progress = Callable[[int, int], None]

FORMATS = ("bitbrains", "planetlab", "azure")
_EXPECTED = (
    "expected Bitbrains GWA-T-12 (;-separated CSV per VM), "
    "PlanetLab (day folders of 288-line files) or Azure v1 vm_cpu_readings"
)

# Bitbrains header names, keyed by the role they play here
_BB_COLUMNS = {
    "ts": "Timestamp [ms]",
    "cores": "CPU cores",
    "cap": "CPU capacity provisioned [MHZ]",
    "cpu": "CPU usage [MHZ]",
    "mem_cap": "Memory capacity provisioned [KB]",
    "mem": "Memory usage [KB]",
    "disk_r": "Disk read throughput [KB/s]",
    "disk_w": "Disk write throughput [KB/s]",
    "net_rx": "Network received throughput [KB/s]",
    "net_tx": "Network transmitted throughput [KB/s]",
}
_DAY_RE = re.compile(r"\d{8}")
_AZURE_OVER_BUCKETS = {">24": 30.0, ">64": 70.0}  # open-ended vmtable buckets


class TraceError(RescoinError, ValueError):
    """A trace that cannot be read; the message names the file (and line) and says what to do."""


@dataclass
class Trace:
    """Per-VM demand on a regular grid, ready to replay on a simulated host."""

    name: str
    source_format: str
    vm_ids: list[str]
    start: float
    period: float
    demand: np.ndarray  # (n_periods, n_vms, N_RES), NaN = not known
    sizes: np.ndarray  # (n_vms, N_RES): vCPUs, memory MiB, NaN for disk/net
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # implausible rows dropped or clipped (also logged)

    def __post_init__(self) -> None:
        if self.demand.ndim != 3 or self.demand.shape[1:] != (len(self.vm_ids), N_RES):
            raise ValueError(
                f"demand shape {self.demand.shape} does not match {len(self.vm_ids)} VMs x {N_RES}"
            )
        if self.sizes.shape != (len(self.vm_ids), N_RES):
            raise ValueError(f"sizes shape {self.sizes.shape} does not match {len(self.vm_ids)} VMs")

    @property
    def n_periods(self) -> int:
        return int(self.demand.shape[0])

    @property
    def n_vms(self) -> int:
        return int(self.demand.shape[1])

    @property
    def days(self) -> float:
        return self.n_periods * self.period / 86400.0


@dataclass
class _Samples:
    """What a format loader hands to the common resampler."""

    source_format: str
    label: str
    vm_ids: list[str]
    vm: np.ndarray  # (n,) VM column of each sample
    ts: np.ndarray  # (n,) seconds
    values: np.ndarray  # (n, N_RES)
    sizes: np.ndarray  # (n_vms, N_RES)
    notes: list[str]
    start_day: float = 0.0  # days still to skip once on the grid
    off: np.ndarray | None = None  # (n,) samples saying the VM was not running: no gap filling over them
    warnings: list[str] = field(default_factory=list)  # file:line of implausible values, one per kind


# --------------------------------------------------------------------------- public API


def sample_trace_path() -> Path:
    """Directory of the Bitbrains sample shipped with the package (24 VMs, 7 days)."""
    return SAMPLE_TRACE_DIR


def detect_format(path: str | Path) -> str:
    """Name the trace format of ``path`` from what its files contain."""
    p = _existing(path)
    if p.is_file():
        fmt = _sniff_file(p)
        if fmt is None:
            raise TraceError(f"{p}: unknown trace format; {_EXPECTED}")
        return fmt
    if _planetlab_days(p):
        return "planetlab"
    files = _csv_files(p)
    if not files:
        if not any(_visible(e) for e in p.iterdir()):
            raise TraceError(f"{p}: empty directory; {_EXPECTED}")
        raise TraceError(f"{p}: unknown trace format (no .csv or .csv.gz files); {_EXPECTED}")
    for f in files[:8]:
        fmt = _sniff_file(f)
        if fmt is not None:
            return fmt
    raise TraceError(f"{p}: unknown trace format; {_EXPECTED}")


def load_trace(
    path: str | Path,
    *,
    vms: int | None = None,
    vm_offset: int = 0,
    days: float | None = None,
    start_day: float = 0.0,
    progress: Progress | None = None,
) -> Trace:
    """Load ``vms`` VMs (after skipping ``vm_offset``) for ``days`` days from ``start_day``.

    VMs are taken in natural id order (Bitbrains, PlanetLab) or order of first
    appearance (Azure); only the files needed are read.
    """
    _check_selection(vms, vm_offset, days, start_day)
    p = _existing(path)
    fmt = detect_format(p)
    loader = {"bitbrains": _load_bitbrains, "planetlab": _load_planetlab, "azure": _load_azure}[fmt]
    s = loader(p, vms, vm_offset, days, start_day, progress)
    demand, start, notes = _resample(s, days, p)
    n_days = demand.shape[0] * PERIOD / 86400.0
    for w in s.warnings:
        log.warning("%s", w)
    return Trace(
        name=f"{fmt} {s.label} ({len(s.vm_ids)} VMs, {n_days:.1f} days)",
        source_format=fmt,
        vm_ids=s.vm_ids,
        start=start,
        period=PERIOD,
        demand=demand,
        sizes=s.sizes,
        notes=s.notes + notes,
        warnings=list(s.warnings),
    )


# --------------------------------------------------------------------------- argument checks


def _check_selection(vms: int | None, vm_offset: int, days: float | None, start_day: float) -> None:
    if vms is not None and vms < 1:
        raise TraceError(f"vms must be at least 1, got {vms}")
    if vm_offset < 0:
        raise TraceError(f"vm_offset must be 0 or more, got {vm_offset}")
    if days is not None and not days > 0:
        raise TraceError(f"days must be positive, got {days}")
    if not start_day >= 0:
        raise TraceError(f"start_day must be 0 or more, got {start_day}")


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory; give the path of a trace directory")
    return p


def _pick(ids: list[str], vms: int | None, vm_offset: int, where: Path) -> list[str]:
    """The ``vms`` ids after ``vm_offset``, or a clear error if there are too few."""
    if vm_offset >= len(ids) or (vms is not None and vm_offset + vms > len(ids)):
        want = f"{vms} VMs" if vms is not None else "VMs"
        raise TraceError(
            f"{where}: asked for {want} after skipping {vm_offset}, but the trace has only "
            f"{len(ids)} VMs; lower --vms or --vm-offset"
        )
    return ids[vm_offset : None if vms is None else vm_offset + vms]


# --------------------------------------------------------------------------- files


def _natural_key(name: str) -> tuple:
    """Sort key putting 'vm2' before 'vm10' and numeric ids in numeric order."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_csv(p: Path) -> bool:
    n = p.name.lower()
    return p.is_file() and _visible(p) and (n.endswith(".csv") or n.endswith(".csv.gz"))


def _stem(p: Path) -> str:
    n = p.name
    for suffix in (".csv.gz", ".csv", ".gz"):
        if n.lower().endswith(suffix):
            return n[: -len(suffix)]
    return n


def _csv_files(root: Path, depth: int = 2) -> list[Path]:
    """CSV files in ``root`` and up to ``depth`` folder levels below, shallow ones first."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        subdirs: list[Path] = []
        for d in level:
            entries = sorted(d.iterdir(), key=lambda e: _natural_key(e.name))
            found += [e for e in entries if _is_csv(e)]
            subdirs += [e for e in entries if e.is_dir() and _visible(e)]
        level = subdirs
    return found


def _open_text(p: Path) -> IO[str]:
    """Open a possibly gzip-compressed text file."""
    if p.name.lower().endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def _first_line(p: Path) -> str:
    try:
        with _open_text(p) as f:
            return f.readline()
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise TraceError(f"{p}: not a valid gzip file (truncated?)") from None
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not a text file") from None
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror or e}") from None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _sniff_file(p: Path) -> str | None:
    """Format of one CSV file from its first line, or None if it is neither."""
    if not _is_csv(p) or _stem(p).lower().startswith("vmtable"):
        return None
    line = _first_line(p)
    if ";" in line and "timestamp" in line.lower():
        return "bitbrains"
    fields = [f.strip() for f in line.split(",")]
    if len(fields) == 5 and _is_number(fields[0]) and fields[1] and all(map(_is_number, fields[2:])):
        return "azure"
    return None


def _csv_error(p: Path, e: Exception) -> TraceError:
    """Turn a pandas/gzip/IO exception into a TraceError naming the file (and line)."""
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return TraceError(f"{p}: not a valid gzip file (truncated?)")
    if isinstance(e, pd.errors.EmptyDataError):
        return TraceError(f"{p}: empty file; expected a header line and rows")
    if isinstance(e, pd.errors.ParserError):
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            return TraceError(f"{p}:{m[2]}: expected {m[1]} fields, saw {m[3]}")
        return TraceError(f"{p}: cannot parse: {str(e).strip()}")
    if isinstance(e, UnicodeDecodeError):
        return TraceError(f"{p}: not a text file")
    if isinstance(e, OSError):
        return TraceError(f"{p}: cannot read: {e.strerror or e}")
    return TraceError(f"{p}: cannot read: {e}")


_READ_ERRORS = (
    EOFError, zlib.error, OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError
)


def _read_csv(p: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(p, engine="c", skip_blank_lines=False, **kw)
    except _READ_ERRORS as e:
        raise _csv_error(p, e) from None


def _iter_csv(p: Path, chunksize: int, **kw) -> Iterator[pd.DataFrame]:
    """Chunks of a big CSV; errors raised mid-file are translated too."""
    try:
        with pd.read_csv(p, engine="c", skip_blank_lines=False, chunksize=chunksize, **kw) as reader:
            yield from reader
    except _READ_ERRORS as e:
        raise _csv_error(p, e) from None


def _numeric(df: pd.DataFrame, col, p: Path, first_line: int, label: str | None = None) -> np.ndarray:
    """Column as float64; a non-number raises TraceError with its file line."""
    s = df[col]
    if pd.api.types.is_numeric_dtype(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # writable (copy-on-write)
    num = pd.to_numeric(s, errors="coerce")
    bad = np.flatnonzero(num.isna().to_numpy() & s.notna().to_numpy())
    if bad.size:
        i = int(bad[0])
        name = label if label is not None else col
        value = str(s.iloc[i]).strip()
        raise TraceError(f"{p}:{first_line + i}: {value!r} is not a number in column {name!r}")
    return num.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)


def _clip_negative(values: np.ndarray) -> int:
    """Set negative samples to 0 in place; returns how many there were."""
    neg = values < 0
    n = int(neg.sum())
    values[neg] = 0.0
    return n


# --------------------------------------------------------------------------- Bitbrains


def _bitbrains_files(root: Path) -> tuple[dict[str, Path], str]:
    """Per-VM files by id, and a label (the month folder's name)."""
    if root.is_file():
        return {_stem(root): root}, root.parent.name
    groups: dict[Path, list[Path]] = {}
    for f in _csv_files(root):
        groups.setdefault(f.parent, []).append(f)
    main = max(groups, key=lambda d: len(groups[d]))
    by_id: dict[str, Path] = {}
    for f in groups[main]:
        vm_id = _stem(f)
        if vm_id in by_id:
            raise TraceError(f"{main}: VM {vm_id} appears twice ({by_id[vm_id].name}, {f.name}); keep one")
        by_id[vm_id] = f
    for d, files in groups.items():
        if d != main and len(files) > 1 and {_stem(f) for f in files} & by_id.keys():
            raise TraceError(
                f"{root}: several folders hold the same VMs ({main.name}, {d.name}); "
                "point at one month folder"
            )
    return by_id, main.name


def _bitbrains_columns(df: pd.DataFrame, p: Path) -> dict[str, str]:
    """Map our roles to the file's header names; error lists the missing ones."""
    by_lower = {c.strip().lower(): c for c in df.columns}
    cols, missing = {}, []
    for role, name in _BB_COLUMNS.items():
        if name.lower() in by_lower:
            cols[role] = by_lower[name.lower()]
        else:
            missing.append(name)
    if missing:
        raise TraceError(
            f"{p}:1: header lacks column(s) {', '.join(repr(m) for m in missing)}; "
            "is this a Bitbrains GWA-T-12 file?"
        )
    return cols


def _mode_positive(x: np.ndarray) -> float:
    """Most common positive value (smallest on ties), NaN if none."""
    x = x[np.isfinite(x) & (x > 0)]
    if x.size == 0:
        return np.nan
    vals, counts = np.unique(x, return_counts=True)
    return float(vals[np.argmax(counts)])


def _read_bytes(p: Path) -> bytes:
    """The whole (decompressed) file; gzip and I/O errors become TraceErrors naming it."""
    try:
        data = p.read_bytes()
        return gzip.decompress(data) if p.name.lower().endswith(".gz") else data
    except _READ_ERRORS as e:
        raise _csv_error(p, e) from None


def _read_bitbrains_csv(p: Path) -> pd.DataFrame:
    """A Bitbrains file as read by pandas, after checking every row has as many fields as the header.

    pandas pads a short row with NaN but refuses a long one: both are the same fault (a torn or
    mangled line), so both are an error naming the line.
    """
    data = _read_bytes(p)
    wrong = wrong_field_count(data, b";")
    if wrong is not None:
        line, expected, seen = wrong
        raise TraceError(f"{p}:{line}: expected {expected} fields, saw {seen}; every row needs one value "
                         "per header column")
    try:
        return pd.read_csv(io.BytesIO(data), sep=";", skipinitialspace=True, engine="c", skip_blank_lines=False)
    except _READ_ERRORS as e:
        raise _csv_error(p, e) from None


def _read_bitbrains_vm(p: Path, counts: dict[str, int], findings: Findings
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One VM file -> (timestamps, values (n, N_RES), sizes (N_RES,), not-running rows (n,))."""
    df = _read_bitbrains_csv(p)
    cols = _bitbrains_columns(df, p)
    raw = {role: _numeric(df, c, p, 2, _BB_COLUMNS[role]) for role, c in cols.items()}
    ts = raw.pop("ts")
    drop_outlying_timestamps(ts, p, findings)
    for v in raw.values():
        counts["negative"] += _clip_negative(v)
    # values no VM can have are unknown; memory above the VM's provisioned size is that size
    unknown = "treated as unknown"
    raw["cores"][above(findings, p, raw["cores"], MAX_VM_CORES, "cores", "CPU cores", "", unknown)] = np.nan
    for role, what in (("mem_cap", "provisioned memory"), ("mem", "memory usage")):
        raw[role][above(findings, p, raw[role], MAX_VM_MEMORY_KB, role, what, "KB", unknown)] = np.nan
    for role in ("disk_r", "disk_w", "net_rx", "net_tx"):
        name = _BB_COLUMNS[role].split(" [")[0].lower()
        raw[role][above(findings, p, raw[role], MAX_THROUGHPUT_KBS, "throughput", name, "KB/s",
                               unknown)] = np.nan

    cores, cap = raw["cores"], raw["cap"]
    ok = (cores > 0) & (cap > 0)
    # nothing provisioned at all (no cores, no CPU, no memory): the VM was not
    # running, so its zero memory and I/O are no measurement either
    off = ~ok & ~(raw["mem_cap"] > 0) & np.isfinite(ts)
    counts["not_running"] += int(off.sum())
    counts["no_capacity"] += int((~ok & ~off & np.isfinite(ts)).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu = np.where(ok, raw["cpu"] * cores / cap, np.nan)
    over = cpu > cores
    counts["clipped_cpu"] += int(over.sum())
    cpu = np.where(over, cores, cpu)

    values = np.empty((ts.size, N_RES))
    values[:, CPU] = cpu
    values[:, MEMORY] = raw["mem"] / 1024.0
    values[:, DISK] = raw["disk_r"] + raw["disk_w"]
    values[:, NET] = raw["net_rx"] + raw["net_tx"]
    values[off] = np.nan

    mem_cap = raw["mem_cap"][np.isfinite(raw["mem_cap"]) & (raw["mem_cap"] > 0)]
    sizes = np.full(N_RES, np.nan)
    sizes[CPU] = _mode_positive(cores)
    sizes[MEMORY] = mem_cap.max() / 1024.0 if mem_cap.size else np.nan
    if mem_cap.size:
        over = above(findings, p, raw["mem"], float(mem_cap.max()), "mem_size", "memory usage", "KB",
                     "clipped to it", bound="the VM's provisioned memory,")
        values[over & ~off, MEMORY] = sizes[MEMORY]
    return ts, values, sizes, off


def _load_bitbrains(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> _Samples:
    by_id, label = _bitbrains_files(root)
    ids = _pick(sorted(by_id, key=_natural_key), vms, vm_offset, root)
    counts = {"negative": 0, "no_capacity": 0, "not_running": 0, "clipped_cpu": 0}
    findings = Findings()
    parts_ts, parts_vm, parts_val, parts_off = [], [], [], []
    sizes = np.full((len(ids), N_RES), np.nan)
    for i, vm_id in enumerate(ids):
        ts, values, sizes[i], off = _read_bitbrains_vm(by_id[vm_id], counts, findings)
        parts_off.append(off)
        parts_ts.append(ts)
        parts_vm.append(np.full(ts.size, i, dtype=np.int64))
        parts_val.append(values)
        if progress is not None:
            progress(i + 1, len(ids))
    ts = np.concatenate(parts_ts)
    notes = []
    if np.isfinite(ts).any() and np.nanmedian(ts) > 1e11:  # the header says ms; real files hold seconds
        ts = ts / 1000.0
        notes.append("timestamps looked like milliseconds; divided by 1000")
    if counts["no_capacity"]:
        notes.append(
            f"{counts['no_capacity']} rows (in the files read) with zero CPU cores or capacity: CPU unknown"
        )
    if counts["not_running"]:
        notes.append(
            f"{counts['not_running']} rows (in the files read) with nothing provisioned: the VM was not "
            "running (absent from the simulated host)"
        )
    if counts["clipped_cpu"]:
        notes.append(
            f"clipped {counts['clipped_cpu']} CPU samples (in the files read) above capacity "
            "to the vCPU count"
        )
    if counts["negative"]:
        notes.append(f"clipped {counts['negative']} negative values to 0")
    vm, values = np.concatenate(parts_vm), np.concatenate(parts_val)
    return _Samples("bitbrains", label, ids, vm, ts, values, sizes, notes, start_day, np.concatenate(parts_off),
                    findings.messages())


# --------------------------------------------------------------------------- PlanetLab


def _day_start(d: Path) -> float | None:
    """Epoch seconds of a ``YYYYMMDD`` folder's date at 00:00 UTC, None if not a date."""
    if not (d.is_dir() and _DAY_RE.fullmatch(d.name)):
        return None
    try:
        return datetime.strptime(d.name, "%Y%m%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _vm_files(day: Path) -> list[Path]:
    return [f for f in day.iterdir() if f.is_file() and _visible(f)]


def _planetlab_days(p: Path) -> list[Path]:
    """Day folders of a PlanetLab trace (``p`` itself if it is one), [] if not PlanetLab."""
    days = [p] if _day_start(p) is not None else sorted(d for d in p.iterdir() if _day_start(d) is not None)
    for d in days:
        files = _vm_files(d)
        if files:
            first = min(files, key=lambda f: _natural_key(f.name))
            return days if _first_line(first).strip().lstrip("-").isdigit() else []
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


def _load_planetlab(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> _Samples:
    all_days = _planetlab_days(root)
    first = int(np.floor(start_day))
    if first >= len(all_days):
        raise TraceError(
            f"{root}: --start-day {start_day:g} is beyond the end of the trace ({len(all_days)} day folders)"
        )
    last = len(all_days) if days is None else min(len(all_days), int(np.ceil(start_day + days)))
    sel = all_days[first:last]
    names = sorted((f.name for f in _vm_files(sel[0])), key=_natural_key)
    if not names:
        raise TraceError(f"{sel[0]}: day folder holds no VM files")
    ids = _pick(names, vms, vm_offset, sel[0])

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
    n_neg = _clip_negative(cpu)
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
    return _Samples("planetlab", label, ids, j_idx, ts, values, sizes, notes, start_day - first)


# --------------------------------------------------------------------------- Azure


def _azure_files(root: Path) -> tuple[list[Path], Path | None]:
    """Reading files (natural order) and the vmtable beside them, if any."""
    files = [root] if root.is_file() else [f for f in _csv_files(root) if _sniff_file(f) == "azure"]
    if not files:
        raise TraceError(f"{root}: no vm_cpu_readings files found; {_EXPECTED}")
    folder = files[0].parent
    table = next((folder / n for n in ("vmtable.csv", "vmtable.csv.gz") if (folder / n).is_file()), None)
    return files, table


class _FirstSeen:
    """Ids in order of first appearance, up to ``limit`` of them (vectorised per chunk)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.index = pd.Index([], dtype=object)

    def update(self, ids: pd.Series) -> None:
        if self.limit is not None and len(self.index) >= self.limit:
            return
        uniq = pd.Index(pd.unique(ids.to_numpy(dtype=object)), dtype=object)
        new = uniq[~uniq.isin(self.index)]
        if self.limit is not None:
            new = new[: self.limit - len(self.index)]
        if len(new):
            self.index = self.index.append(new)

    def positions(self, ids: pd.Series) -> np.ndarray:
        return self.index.get_indexer(ids.to_numpy(dtype=object))


def _read_azure_readings(
    files: list[Path], seen: _FirstSeen, vm_offset: int, progress: Progress | None, total: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Timestamps, VM columns and avg CPU % of the selected VMs; and rows dropped."""
    parts_ts, parts_vm, parts_cpu = [], [], []
    dropped = 0
    for n_file, p in enumerate(files):
        line = 1
        for chunk in _iter_csv(p, AZURE_CHUNK_ROWS, header=None, dtype={1: str}):
            if chunk.shape[1] != 5:
                raise TraceError(
                    f"{p}: expected 5 columns (timestamp, vm id, min, max, avg cpu %), "
                    f"found {chunk.shape[1]}"
                )
            ts = _numeric(chunk, 0, p, line, "timestamp")
            avg = _numeric(chunk, 4, p, line, "avg cpu %")
            short = np.flatnonzero(np.isnan(avg) & chunk.notna().any(axis=1).to_numpy())  # pandas pads short rows
            if short.size:  # ... and refuses long ones: both are errors
                raise TraceError(f"{p}:{line + int(short[0])}: expected 5 fields (timestamp, vm id, min, max, "
                                 "avg cpu %), the last is missing")
            line += len(chunk)
            ids = chunk[1]
            keep = np.isfinite(ts) & ids.notna().to_numpy()
            dropped += int((~keep).sum())
            ids = ids[keep]
            seen.update(ids)
            pos = seen.positions(ids)
            mine = pos >= vm_offset
            parts_ts.append(ts[keep][mine])
            parts_vm.append(pos[mine] - vm_offset)
            parts_cpu.append(avg[keep][mine])
        if progress is not None:
            progress(n_file + 1, total)
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.empty(0, dtype=dt)  # noqa: E731
    return cat(parts_ts, float), cat(parts_vm, np.int64), cat(parts_cpu, float), dropped


def _bucket(values: pd.Series, lines: np.ndarray, p: Path, what: str) -> np.ndarray:
    """vmtable size buckets ('2', '>24', ...) as numbers; ``lines`` are their file lines."""
    s = values.astype(str).str.strip()
    over = s.map(_AZURE_OVER_BUCKETS)
    num = pd.to_numeric(s.where(over.isna()), errors="coerce").fillna(over)
    bad = np.flatnonzero(num.isna().to_numpy())
    if bad.size:
        i = int(bad[0])
        raise TraceError(f"{p}:{lines[i]}: {s.iloc[i]!r} is not a {what} bucket")
    return num.to_numpy(dtype=np.float64)


def _read_vmtable(p: Path, ids: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Cores and memory GB of ``ids`` (NaN where the table lacks a VM)."""
    cores = np.full(len(ids), np.nan)
    mem_gb = np.full(len(ids), np.nan)
    line = 1
    for chunk in _iter_csv(p, AZURE_CHUNK_ROWS, header=None, dtype=str):
        if chunk.shape[1] != 11:
            raise TraceError(f"{p}: expected 11 columns in the Azure v1 vmtable, found {chunk.shape[1]}")
        pos = ids.get_indexer(chunk[0].to_numpy(dtype=object))
        hit = np.flatnonzero(pos >= 0)
        if hit.size:
            rows = chunk.iloc[hit]
            cores[pos[hit]] = _bucket(rows[9], line + hit, p, "core count")
            mem_gb[pos[hit]] = _bucket(rows[10], line + hit, p, "memory")
        line += len(chunk)
    return cores, mem_gb


def _load_azure(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> _Samples:
    files, table = _azure_files(root)
    total = len(files) + (table is not None)
    seen = _FirstSeen(None if vms is None else vm_offset + vms)
    ts, vm, avg, dropped = _read_azure_readings(files, seen, vm_offset, progress, total)
    ids = _pick(list(seen.index), vms, vm_offset, root)

    notes = ["CPU-only trace: memory, disk and network demand unknown (NaN)"]
    if dropped:
        notes.append(f"dropped {dropped} rows without timestamp or vm id")
    cores = np.full(len(ids), np.nan)
    mem_gb = np.full(len(ids), np.nan)
    if table is not None:
        cores, mem_gb = _read_vmtable(table, pd.Index(ids, dtype=object))
        if progress is not None:
            progress(total, total)
    unknown = np.isnan(cores)
    if table is None:
        notes.append("no vmtable beside the readings: assumed 1 core per VM")
    elif unknown.any():
        notes.append(f"{int(unknown.sum())} VMs missing from {table.name}: assumed 1 core")
    cores = np.where(unknown, 1.0, cores)

    n_neg = _clip_negative(avg)
    n_over = int((avg > 100).sum())
    avg = np.minimum(avg, 100.0)
    if n_over:
        notes.append(f"clipped {n_over} CPU samples above capacity (100 %)")
    if n_neg:
        notes.append(f"clipped {n_neg} negative values to 0")

    values = np.full((ts.size, N_RES), np.nan)
    values[:, CPU] = avg / 100.0 * cores[vm]
    sizes = np.full((len(ids), N_RES), np.nan)
    sizes[:, CPU] = cores
    sizes[:, MEMORY] = mem_gb * 1024.0
    label = files[0].parent.name if len(files) > 1 else _stem(files[0])
    return _Samples("azure", label, ids, vm, ts, values, sizes, notes, start_day)


# --------------------------------------------------------------------------- resampling


def _resample(
    s: _Samples, days: float | None, where: Path
) -> tuple[np.ndarray, float, list[str]]:
    """Average samples into 5-minute cells, interpolate short gaps, keep the asked days.

    Only the kept window plus a margin of MAX_FILL + 1 cells is built: gaps
    that touch the window are still filled from their true neighbours, and a
    week of a month-long trace costs a week of work.
    """
    n_vms = len(s.vm_ids)
    ok = np.isfinite(s.ts)
    ts, vm, values = s.ts[ok], s.vm[ok], s.values[ok]
    off = np.zeros(ts.size, dtype=bool) if s.off is None else s.off[ok]
    if ts.size == 0:
        raise TraceError(f"{where}: the selected VMs have no samples")
    start = float(np.floor(ts.min() / PERIOD) * PERIOD)
    cell = np.rint((ts - start) / PERIOD).astype(np.int64)
    notes: list[str] = []
    first, last = _window(int(cell.max()) + 1, days, s.start_day, where, notes)
    lo = max(0, first - MAX_FILL - 1)
    hi = last + MAX_FILL + 1
    keep = (cell >= lo) & (cell < hi)
    cell, vm, values, off = cell[keep] - lo, vm[keep], values[keep], off[keep]
    n_cells = int(cell.max()) + 1 if cell.size else 0
    if n_cells * n_vms * N_RES * 8 > MAX_GRID_BYTES:
        raise TraceError(
            f"{where}: {n_vms} VMs x {n_cells} periods is too large to hold; pass --vms or --days to load less"
        )

    flat = cell * n_vms + vm
    size = n_cells * n_vms
    demand = np.empty((size, N_RES))
    for r in range(N_RES):
        known = np.isfinite(values[:, r])
        total = np.bincount(flat, weights=np.where(known, values[:, r], 0.0), minlength=size)
        count = np.bincount(flat, weights=known, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            demand[:, r] = np.where(count > 0, total / count, np.nan)
    shared = flat.size - np.count_nonzero(np.bincount(flat, minlength=size))
    if shared:
        notes.append(f"averaged {shared} samples that shared a 5-minute cell with another")

    # a cell where the VM said "not running" and nothing else is no gap: it stays empty
    stopped = np.bincount(flat[off], minlength=size) > 0
    running = np.bincount(flat[~off], minlength=size) > 0
    demand, filled = _fill_gaps(demand.reshape(n_cells, n_vms, N_RES))
    demand = np.ascontiguousarray(demand)  # so that the reshape below is a view
    demand.reshape(size, N_RES)[stopped & ~running] = np.nan
    notes += filled
    out = np.full((last - first, n_vms, N_RES), np.nan)
    got = demand[first - lo : last - lo]
    out[: got.shape[0]] = got
    return out, start + first * PERIOD, notes


def _window(
    n_periods: int, days: float | None, start_day: float, where: Path, notes: list[str]
) -> tuple[int, int]:
    """Grid cells [first, last) holding ``days`` days from ``start_day``."""
    first = int(round(start_day * CELLS_PER_DAY))
    if first >= n_periods:
        raise TraceError(
            f"{where}: --start-day {start_day:g} is beyond the end of the trace "
            f"({n_periods * PERIOD / 86400:.2f} days); choose a smaller --start-day"
        )
    want = None if days is None else int(round(days * CELLS_PER_DAY))
    last = n_periods if want is None else min(n_periods, first + want)
    if last - first > MAX_SPAN_DAYS * CELLS_PER_DAY:
        raise TraceError(
            f"{where}: {(last - first) / CELLS_PER_DAY:.0f} days to replay, more than the {MAX_SPAN_DAYS} "
            "rescoin replays at once; pass --days (and --start-day) to replay part of the trace"
        )
    if want is not None and last - first < want:
        notes.append(f"asked for {days:g} days but only {(last - first) * PERIOD / 86400:.2f} remain")
    return first, max(last, first + 1)


def _fill_gaps(demand: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Interpolate interior gaps of up to MAX_FILL cells per VM and resource.

    Longer gaps stay NaN (the VM may have been off). At a series' ends, a run
    of at most EDGE_HOLD empty cells takes the nearest value: flooring the grid
    start can leave the first cell empty for every VM. Works on runs of
    missing cells, so the cost follows the number of gaps, not the grid size.
    """
    T = demand.shape[0]
    if T == 0:
        return demand, []
    a = np.ascontiguousarray(demand.reshape(T, -1).T)  # one row per (VM, resource) series
    padded = np.zeros((a.shape[0], T + 2), dtype=np.int8)
    padded[:, 1:-1] = np.isnan(a)
    edges = np.diff(padded, axis=1)
    row, t0 = np.nonzero(edges == 1)  # each missing run is row[i], cells [t0[i], t1[i])
    _, t1 = np.nonzero(edges == -1)
    length = t1 - t0
    has_prev, has_next = t0 > 0, t1 < T
    interior = has_prev & has_next
    short = interior & (length <= MAX_FILL)
    lead = ~has_prev & has_next & (length <= EDGE_HOLD)
    trail = has_prev & ~has_next & (length <= EDGE_HOLD)

    fill = short | lead | trail
    n = length[fill]
    run = np.repeat(np.flatnonzero(fill), n)  # run of each filled cell
    t = t0[run] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    r = row[run]
    v_prev = a[r, np.maximum(t0[run] - 1, 0)]
    v_next = a[r, np.minimum(t1[run], T - 1)]
    w = (t - t0[run] + 1) / (length[run] + 1)
    a[r, t] = np.where(lead[run], v_next, np.where(trail[run], v_prev, v_prev + (v_next - v_prev) * w))

    notes = []
    if short.any():
        notes.append(
            f"filled {int(short.sum())} gaps ({int(length[short].sum())} cells, per VM and resource) "
            "by linear interpolation"
        )
    long_gaps = interior & ~short
    if long_gaps.any():
        notes.append(
            f"left {int(long_gaps.sum())} gaps longer than {MAX_FILL} cells as NaN "
            f"({int(length[long_gaps].sum())} cells, per VM and resource)"
        )
    if lead.any() or trail.any():
        held = int(length[lead].sum() + length[trail].sum())
        notes.append(f"held {held} empty cells at series ends at the nearest value")
    return a.T.reshape(demand.shape), notes
